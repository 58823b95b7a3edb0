"""Run a trained detector over image files and write its detections as COCO results.

``sparsehead-predict CONFIG --weights CKPT --input IMAGE_OR_DIR [...] --out preds.json [--score-thresh T]
[--draw DIR] [--ann-file ANN] [--batch-size N] [key=value ...]`` runs :func:`main`:

- ``--out`` gets the COCO results list (``image_id``, ``category_id``, ``bbox`` as ``[x, y, w, h]`` in
  pixels of the image as displayed, ``score``), which ``pycocotools.COCO.loadRes`` reads as it is. With
  ``--ann-file`` the image and category ids are the file's (matched by ``file_name``, or by its base
  name); without it ``image_id`` is the image's file name and ``category_id`` the model's class index.
- Beside it, ``<out stem>_images.json`` records per image the file, ``image_id``, size, number of
  detections and the realised head GMACs, the images that could not be read (with why), and the average
  GMACs.
- ``--draw DIR`` writes each image with its detections drawn (``DIR/<image stem>.png``).

Images are read as in training (EXIF orientation applied, 16-bit by bit depth) and run in batches of
``--batch-size`` (default ``test.ims_per_batch``). An image that cannot be read is reported and counted,
and the others are still predicted; the exit status is 1 only when no image could be read.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm import tqdm

__all__ = ["main", "parse_args", "run"]

logger = logging.getLogger("sparsehead")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Detect objects in images with a trained model; write COCO results and head GMACs per image."
    )
    parser.add_argument("config", help="YAML config the weights were trained with (a file or a packaged name)")
    parser.add_argument("overrides", nargs="*", help="config overrides as dotted.key=value")
    parser.add_argument("--weights", required=True, help="checkpoint.pth / model_final.pth or a state dict")
    parser.add_argument("--input", required=True, nargs="+", metavar="IMAGE_OR_DIR",
                        help="image files and/or folders of images")
    parser.add_argument("--out", required=True, help="COCO results JSON to write (e.g. preds.json)")
    parser.add_argument("--score-thresh", type=float, default=None,
                        help="keep detections scoring at least this (default: model.score_thresh)")
    parser.add_argument("--draw", metavar="DIR", help="also write each image with its detections drawn")
    parser.add_argument("--ann-file", help="COCO annotation file whose image and category ids to use")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward (default: test.ims_per_batch)")
    return parser.parse_intermixed_args(argv)


def _image_ids(ann_file: str, files: list[Path]) -> tuple[list[Any], list[int], list[str]]:
    """(image id per file, category ids, category names) from ``ann_file``; every file must be listed."""
    from sparsehead.data import load_annotations

    data = load_annotations(ann_file)
    by_name: dict[str, Any] = {}
    for img in data["images"]:
        by_name.setdefault(img["file_name"], img["id"])
        by_name.setdefault(Path(img["file_name"]).name, img["id"])
    missing = [f.name for f in files if f.name not in by_name]
    if missing:
        raise ValueError(f"--ann-file {ann_file} does not list {len(missing)} input image(s), e.g. {missing[:5]}")
    cats = sorted(data["categories"], key=lambda c: c["id"])
    return [by_name[f.name] for f in files], [c["id"] for c in cats], [c["name"] for c in cats]


def _draw(image: torch.Tensor, det: dict, names: list[str], path: Path) -> None:
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes

    from sparsehead.utils.file_io import atomic_write

    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    labels = [f"{names[int(label)]} {score:.2f}" for label, score in zip(det["labels"], det["scores"].tolist())]
    drawn = draw_bounding_boxes(pixels, det["boxes"].cpu(), labels=labels, colors="red", width=2)
    picture = Image.fromarray(drawn.permute(1, 2, 0).numpy())
    atomic_write(path, lambda f: picture.save(f, format="PNG"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Check every argument, load the model, predict; returns the summary written beside ``--out``."""
    from sparsehead import collect_cost
    from sparsehead.config import load_config
    from sparsehead.data import DatasetError, load_image
    from sparsehead.visualization import _class_names, find_images

    from .checkpoint import atomic_write_json, load_trained_model
    from .distributed import configure_cpu, resolve_device

    cfg = load_config(args.config, args.overrides)
    if not Path(args.weights).is_file():
        raise FileNotFoundError(f"--weights file not found: {args.weights}")
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the JSON file to write, e.g. {out / 'preds.json'}")
    if args.draw and Path(args.draw).exists() and not Path(args.draw).is_dir():
        raise ValueError(f"--draw {args.draw} exists and is not a folder")
    thresh = cfg.model.score_thresh if args.score_thresh is None else args.score_thresh
    if not 0.0 <= thresh <= 1.0:
        raise ValueError(f"--score-thresh must be in [0, 1], got {thresh}")
    batch = args.batch_size or cfg.test.ims_per_batch
    if batch < 1:
        raise ValueError(f"--batch-size must be positive, got {batch}")
    files = find_images(args.input)
    if args.ann_file:
        ids, cat_ids, names = _image_ids(args.ann_file, files)
    else:
        ids, cat_ids, names = [f.name for f in files], [], []

    configure_cpu(cfg.num_threads, cfg.cpu_allocator)
    device = resolve_device(cfg.device)
    model = load_trained_model(cfg, args.weights).to(device).eval()
    num_classes = cfg.model.num_classes
    if args.ann_file and len(cat_ids) != num_classes:
        raise ValueError(f"--ann-file {args.ann_file} has {len(cat_ids)} categories, the model {num_classes}")
    cat_ids = cat_ids or list(range(num_classes))
    names = names or _class_names(cfg)

    results: list[dict] = []
    images: list[dict] = []
    bad: list[dict] = []
    used_names: set[str] = set()
    bar = tqdm(total=len(files), desc="predict", unit="img", dynamic_ncols=True)
    for start in range(0, len(files), batch):
        chunk, tensors = [], []
        for f, image_id in zip(files[start:start + batch], ids[start:start + batch]):
            try:
                tensors.append(load_image(str(f)))
                chunk.append((f, image_id))
            except DatasetError as e:
                bad.append({"file_name": str(f), "error": str(e).removeprefix(f"{f}: ")})
        if tensors:
            with torch.no_grad():
                outputs = model([t.to(device) for t in tensors])
            gmacs = (collect_cost(model.head).realized.double().cpu() / 1e9).tolist()
            for (f, image_id), image, det, cost in zip(chunk, tensors, outputs, gmacs):
                keep = det["scores"] >= thresh
                det = {k: v[keep].cpu() for k, v in det.items()}
                for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
                    x0, y0, x1, y1 = box
                    results.append({"image_id": image_id, "category_id": cat_ids[int(label)],
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
                images.append({"file_name": str(f), "image_id": image_id, "width": image.shape[2],
                               "height": image.shape[1], "num_detections": len(det["scores"]),
                               "head_gmacs": cost})
                if args.draw:
                    stem, k = f.stem, 1
                    while f"{stem}.png" in used_names:
                        stem, k = f"{f.stem}_{k}", k + 1
                    used_names.add(f"{stem}.png")
                    _draw(image, det, names, Path(args.draw) / f"{stem}.png")
        bar.update(len(files[start:start + batch]))
    bar.close()

    gmacs = [r["head_gmacs"] for r in images]
    summary = {
        "weights": str(args.weights),
        "score_thresh": thresh,
        "num_images": len(images),
        "num_bad_images": len(bad),
        "num_detections": len(results),
        "head_gmacs_avg": sum(gmacs) / len(gmacs) if gmacs else None,
        "images": images,
        "bad_images": bad,
    }
    atomic_write_json(results, out)
    atomic_write_json(summary, images_file(out))
    if bad:
        logger.warning("%d image(s) could not be read and were skipped: %s", len(bad),
                       "; ".join(f"{b['file_name']} ({b['error']})" for b in bad[:10]))
    return summary


def images_file(out: Path) -> Path:
    """The per-image record written beside the results ``out`` (``preds.json`` -> ``preds_images.json``)."""
    return out.with_name(f"{out.stem}_images.json")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (1 after ``error: ...`` or when no image was read)."""
    from sparsehead.config import ConfigError

    from .logger import setup_logging

    args = parse_args(argv)
    setup_logging(None)
    try:
        summary = run(args)
    except (ConfigError, ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    avg = summary["head_gmacs_avg"]
    print(
        f"[sparsehead] {args.out}: {summary['num_detections']} detection(s) in {summary['num_images']} image(s)"
        + (f", head GMACs/img avg {avg:.3f}" if avg is not None else "")
        + (f"; {summary['num_bad_images']} unreadable image(s) skipped" if summary["num_bad_images"] else ""),
        flush=True,
    )
    return 0 if summary["num_images"] else 1
