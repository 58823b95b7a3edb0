"""Visualising a dynamic head: detections, gate maps, work maps and the realised head cost.

``python tools/visualize.py CONFIG --weights CKPT (--input IMAGE_OR_FOLDER ... | --val) --out DIR
[--score-thresh 0.3] [key=value ...]`` runs :func:`main`. Per image it writes ``DIR/<image stem>.png``;
for ``--val``, and whenever there is more than one image, it also writes ``DIR/head_gmacs.png``
(histogram of the realised head GMACs per image), ``DIR/active_fraction.png`` (active fraction per
router × level × path) and ``DIR/summary.json``. Every PNG is 1600 × 900 pixels and is written to a
temporary file, then renamed.

The gate and work maps come from :mod:`.gates` (no matplotlib needed); the drawing is in :mod:`.figures`,
imported only when a figure is made.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .gates import (
    GATE_PATHS,
    PATHS,
    ActiveStats,
    gate_maps,
    head_routers,
    keep_gates,
    max_count,
    path_macs,
    realized_from_work,
    total_count,
    work_maps,
)

__all__ = [
    "GATE_PATHS",
    "IMAGE_EXTENSIONS",
    "PATHS",
    "ActiveStats",
    "VisualizeError",
    "gate_maps",
    "head_routers",
    "keep_gates",
    "main",
    "realized_from_work",
    "run",
    "work_maps",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
HIST_NAME = "head_gmacs.png"
ACTIVE_NAME = "active_fraction.png"
SUMMARY_NAME = "summary.json"


class VisualizeError(ValueError):
    """The tool cannot run; the message says why."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Draw detections, gate maps, work maps and the realised head cost of a dynamic head.",
    )
    parser.add_argument("config", help="YAML config the weights were trained with")
    parser.add_argument("overrides", nargs="*", help="config overrides as dotted.key=value")
    parser.add_argument("--weights", required=True, help="checkpoint.pth / model_final.pth or a state dict")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders of images")
    src.add_argument("--val", action="store_true", help="every image of the config's val split")
    parser.add_argument("--out", required=True, help="folder for the PNGs (created if missing)")
    parser.add_argument("--score-thresh", type=float, default=0.3, help="draw detections scoring at least this")
    return parser.parse_intermixed_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0, or 1 after printing ``error: ...``)."""
    args = parse_args(argv)
    from sparsehead.config import ConfigError

    try:
        written = run(args)
    except (ConfigError, VisualizeError, ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"[sparsehead] wrote {len(written)} file(s) to {args.out}")
    return 0


# -- inputs ------------------------------------------------------------------------------------------------


def find_images(paths: Iterable[str]) -> list[Path]:
    """Image files named by ``paths`` (files, or folders searched one level deep), in order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise VisualizeError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {p}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"--input not found: {p}")
    return out


def _class_names(cfg: Any) -> list[str]:
    """Category names (label order) from the config's annotation files, or ``class i``."""
    for split in ("val", "train"):
        ann = Path(cfg.data[split].ann_file or "")
        if ann.is_file():
            try:
                cats = json.loads(ann.read_text()).get("categories", [])
                names = [c["name"] for c in sorted(cats, key=lambda c: c["id"])]
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            if len(names) == cfg.model.num_classes:
                return names
    return [f"class {i}" for i in range(cfg.model.num_classes)]


def val_dataset(cfg: Any) -> Any:
    from sparsehead.data import CocoDetection

    syn = cfg.data.synthetic
    if syn.enabled:
        from sparsehead.data import ensure_dataset

        ensure_dataset(syn.root, syn.num_train, syn.num_val, image_size=syn.image_size,
                       num_classes=syn.num_classes, seed=syn.seed)
    ann, img_dir = cfg.data.val.ann_file, cfg.data.val.img_dir
    if not Path(ann).is_file():
        raise FileNotFoundError(f"data.val.ann_file not found: {ann}")
    if not Path(img_dir).is_dir():
        raise FileNotFoundError(f"data.val.img_dir is not a directory: {img_dir}")
    ds = CocoDetection(ann, img_dir, transforms=None, train=False, skip_bad_images=cfg.data.skip_bad_images)
    if ds.num_classes != cfg.model.num_classes:
        raise VisualizeError(f"model.num_classes={cfg.model.num_classes} but data.val ({ann}) has "
                             f"{ds.num_classes} categories")
    if len(ds) == 0:
        raise VisualizeError(f"data.val ({ann}) has no images")
    return ds


def _batches(args: argparse.Namespace, cfg: Any, files: list[Path], val: Any) -> Iterator[tuple[list, list[str]]]:
    """(images, names): one image per batch for ``--input``; eval's batching for ``--val``."""
    from sparsehead.data import collate_fn, load_image

    if val is None:
        for f in files:
            yield [load_image(str(f))], [f.name]
        return
    from sparsehead.engine.data import build_test_loader

    loader = build_test_loader(val, collate_fn, cfg.test.ims_per_batch, cfg.data.num_workers, 0, 1)
    for images, targets in loader:
        yield images, [val.coco.imgs[t["image_id"]]["file_name"] for t in targets]


# -- model -------------------------------------------------------------------------------------------------


def _load_model(cfg: Any, weights: str, device: torch.device) -> nn.Module:
    from sparsehead.engine.checkpoint import load_trained_model

    model = load_trained_model(cfg, weights)
    if not head_routers(model.head):
        raise VisualizeError(
            f"model.head.kind={cfg.model.head.kind!r} has no routers: there are no gate or work maps to draw"
        )
    return model.to(device).eval()


class _Capture:
    """Keeps the ImageList of the model's last transform (padded size and resized image sizes)."""

    def __init__(self, model: nn.Module) -> None:
        self.image_list: Any = None
        self.handle = model.transform.register_forward_hook(self)

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.image_list = output[0]


# -- per-image panels ---------------------------------------------------------------------------------------


def _panels(i: int, head: nn.Module, work: dict, gates: dict, padded: tuple[int, int],
            resized: tuple[int, int], original: tuple[int, int]) -> tuple[list[dict], np.ndarray, tuple]:
    """Level panels (maps and extents in original image pixels) and the MACs-per-pixel map of image ``i``."""
    levels = work["levels"]
    num = len(levels)
    h0, w0 = levels[0]["depth2"]["count"].shape[-2:]
    sy, sx = padded[0] / h0, padded[1] / w0  # stride of the first level in resized pixels
    fy, fx = original[0] / resized[0], original[1] / resized[1]
    panels = []
    density = torch.zeros(h0, w0, dtype=torch.float64)
    for lvl in range(num):
        hl, wl = levels[lvl]["depth2"]["count"].shape[-2:]
        k = 2**lvl
        panels.append({
            "name": f"P{3 + lvl}",
            "depth": gates["depth"][lvl][i].cpu().numpy(),
            "scale": gates["scale"][lvl][i].cpu().numpy(),
            "work": total_count(work, lvl)[i].cpu().numpy(),
            "max_work": max_count(head, lvl, num),
            "extent": (0.0, wl * k * sx * fx, hl * k * sy * fy, 0.0),
        })
        macs = total_count(work, lvl, weighted=True)[i].cpu()
        density += macs.repeat_interleave(k, 0).repeat_interleave(k, 1)[:h0, :w0] / (k * k)
    density /= sy * sx * fy * fx
    extent = (0.0, w0 * sx * fx, h0 * sy * fy, 0.0)
    return panels, density.numpy(), extent


def _unique_name(stem: str, used: set[str]) -> str:
    name, k = f"{stem}.png", 1
    while name in used or name in (HIST_NAME, ACTIVE_NAME):
        name, k = f"{stem}_{k}.png", k + 1
    used.add(name)
    return name


# -- the run -------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> list[Path]:
    """Check every input, load the model, then write the figures; returns the files written."""
    from sparsehead import collect_cost
    from sparsehead.config import load_config
    from sparsehead.data import load_image
    from sparsehead.engine.checkpoint import atomic_write_json
    from sparsehead.engine.distributed import resolve_device

    from . import figures

    cfg = load_config(args.config, args.overrides)
    if not Path(args.weights).is_file():
        raise FileNotFoundError(f"--weights file not found: {args.weights}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise VisualizeError(f"--out {out} exists and is not a folder")
    files = [] if args.val else find_images(args.input)
    figures.require_matplotlib()
    device = resolve_device(cfg.device)
    model = _load_model(cfg, args.weights, device)  # before the val split may be generated
    head = model.head
    val = None
    if args.val:
        val = val_dataset(cfg)
        class_names = list(val.class_names)
    else:
        for f in files:  # fail on an unreadable image before anything is written
            load_image(str(f))
        class_names = _class_names(cfg)
    capture = _Capture(model)

    title_tail = f"checkpoint {args.weights} · config {Path(args.config).name}"
    stats = ActiveStats()
    gmacs: list[float] = []
    full_gmacs = 0.0
    used: set[str] = set()
    written: list[Path] = []
    try:
        for images, names in _batches(args, cfg, files, val):
            with torch.no_grad(), keep_gates(head):
                dets = model([img.to(device) for img in images])
            cost = collect_cost(head)
            work = work_maps(head)
            gates = gate_maps(head)
            stats.update(head)
            parts = path_macs(work)
            image_list = capture.image_list
            padded = tuple(image_list.tensors.shape[-2:])
            for i, (img, name, det) in enumerate(zip(images, names, dets)):
                realized = float(cost.realized[i]) / 1e9
                full = float(cost.full[i]) / 1e9
                gmacs.append(realized)
                full_gmacs = max(full_gmacs, full)
                keep = det["scores"] >= args.score_thresh
                shown = {k: det[k][keep].detach().cpu().numpy() for k in ("boxes", "scores", "labels")}
                panels, density, extent = _panels(i, head, work, gates, padded, tuple(image_list.image_sizes[i]),
                                                  tuple(img.shape[-2:]))
                g = {k: figures.gmacs_str(float(v[i]) / 1e9) for k, v in parts.items()}
                scale = figures.gmacs_str(float(parts["down"][i] + parts["up"][i]) / 1e9)
                subtitle = (
                    f"realised head {figures.gmacs_str(realized)} GMACs of {figures.gmacs_str(full)} full "
                    f"({realized / max(full, 1e-12):.0%}): depth conv1 {g['depth1']}, conv2 {g['depth2']}, "
                    f"scale units {scale}, gate convs {g['gate']}, prediction convs {g['predict']}"
                )
                fig = figures.image_figure(
                    img.permute(1, 2, 0).cpu().numpy(), shown, class_names, panels, density, extent,
                    f"{name} · {title_tail}", subtitle, args.score_thresh,
                )
                written.append(figures.save_figure(fig, out / _unique_name(Path(name).stem, used)))
    finally:
        capture.handle.remove()

    if args.val or len(gmacs) > 1:
        title = f"{'val split' if args.val else 'inputs'} · {title_tail}"
        fig = figures.cost_figure(gmacs, f"realised head cost per image · {title}", full_gmacs or None)
        written.append(figures.save_figure(fig, out / HIST_NAME))
        levels = [f"P{3 + lvl}" for lvl in range(stats.active["depth"].shape[1])]
        fig = figures.active_figure(stats.fractions(), stats.rows, levels,
                                    f"active fraction per router and level ({stats.images} images) · {title}")
        written.append(figures.save_figure(fig, out / ACTIVE_NAME))
        fractions = {p: np.where(np.isnan(a), None, a).tolist() for p, a in stats.fractions().items()}
        summary = {
            "num_images": len(gmacs),
            "head_gmacs": gmacs,
            "head_gmacs_avg": sum(gmacs) / len(gmacs),
            "head_gmacs_min": min(gmacs),
            "head_gmacs_max": max(gmacs),
            "routers": stats.rows,
            "levels": levels,
            "active_fraction": fractions,
        }
        atomic_write_json(summary, out / SUMMARY_NAME)
        written.append(out / SUMMARY_NAME)
    return written
