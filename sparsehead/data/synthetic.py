"""Synthetic COCO-format detection dataset of coloured shapes on a cluttered background.

Each class is a distinct shape drawn in a distinct (jittered) saturated colour: circle/red,
square/green, triangle/blue, ring/yellow, cross/magenta, diamond/cyan, hexagon/orange, star/white.
Category ids are non-contiguous (1, 3, 5, ...) so that label <-> category id mapping is exercised.

Rendering rules:

* Background: a gradient between two low-saturation colours, smooth low-frequency blotches, pixel
  noise and small grey distractor marks (dots and thin strokes) that are not objects.
* Object sizes are log-uniform between 8 px and 80 % of the shorter image side, so every FPN level
  P3-P7 receives objects. Larger objects are drawn first so smaller ones sit on top.
* Occlusion: an object is only placed if every object already drawn keeps at least
  ``MIN_VISIBLE`` of its pixels visible; otherwise another position is tried and, after a few tries,
  the object is left out. So no object is ever mostly hidden, and every drawn object is annotated.
  Objects of the same class never overlap (their boxes stay ``SAME_CLASS_GAP`` px apart), so two
  same-coloured shapes never merge into one blob.
* Boxes are the exact extents of each object's *visible* pixels: ``bbox = [x0, y0, w, h]`` where
  pixel columns ``x0 .. x0 + w - 1`` and rows ``y0 .. y0 + h - 1`` contain the object, and the first
  and last of those rows and columns contain at least one object pixel. ``area`` is ``w * h``.
* Image width and height are drawn independently from ``[0.8, 1.0] * image_size``.

Generation is deterministic given ``seed`` (every image has its own seeded generator) and atomic:
the dataset is written into a temporary directory beside ``root`` and renamed at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..utils.file_io import default_mode
from .coco import DatasetError

logger = logging.getLogger("sparsehead.data")

FORMAT_VERSION = 1
META_FILE = "synthetic.json"
MIN_SIZE = 8.0
MAX_REL_SIZE = 0.8
MIN_VISIBLE = 0.6
MAX_OBJECTS = 8
PLACE_TRIES = 20
SAME_CLASS_GAP = 2

# (name, base RGB colour); the order fixes label -> category id (label i <-> id 2 * i + 1).
CLASSES: list[tuple[str, tuple[int, int, int]]] = [
    ("circle", (220, 40, 40)),
    ("square", (40, 190, 60)),
    ("triangle", (40, 80, 235)),
    ("ring", (235, 215, 40)),
    ("cross", (215, 50, 215)),
    ("diamond", (40, 215, 225)),
    ("hexagon", (245, 140, 30)),
    ("star", (245, 245, 245)),
]
_SPLITS = {"train": 0, "val": 1}


def category_id(label: int) -> int:
    """COCO category id of contiguous label ``label`` (1, 3, 5, ...)."""
    return 2 * label + 1


def _polygon(cx: float, cy: float, rx: float, ry: float, n: int, phase: float) -> list[tuple[float, float]]:
    return [
        (cx + rx * math.cos(phase + 2 * math.pi * k / n), cy + ry * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _shape_mask(
    label: int, width: int, height: int, cx: float, cy: float, rx: float, ry: float
) -> np.ndarray:
    """Boolean (height, width) mask of shape ``label`` centred at (cx, cy) with half-extents (rx, ry)."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    box = [cx - rx, cy - ry, cx + rx, cy + ry]
    name = CLASSES[label][0]
    if name == "circle":
        draw.ellipse(box, fill=255)
    elif name == "square":
        draw.rectangle(box, fill=255)
    elif name == "triangle":
        draw.polygon([(cx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry)], fill=255)
    elif name == "ring":
        draw.ellipse(box, fill=255)
        ix, iy = 0.55 * rx, 0.55 * ry
        draw.ellipse([cx - ix, cy - iy, cx + ix, cy + iy], fill=0)
    elif name == "cross":
        tx, ty = max(0.34 * rx, 1.0), max(0.34 * ry, 1.0)
        draw.rectangle([cx - rx, cy - ty, cx + rx, cy + ty], fill=255)
        draw.rectangle([cx - tx, cy - ry, cx + tx, cy + ry], fill=255)
    elif name == "diamond":
        draw.polygon([(cx, cy - ry), (cx + rx, cy), (cx, cy + ry), (cx - rx, cy)], fill=255)
    elif name == "hexagon":
        draw.polygon(_polygon(cx, cy, rx, ry, 6, 0.0), fill=255)
    elif name == "star":
        outer = _polygon(cx, cy, rx, ry, 5, -math.pi / 2)
        inner = _polygon(cx, cy, 0.45 * rx, 0.45 * ry, 5, -math.pi / 2 + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=255)
    else:  # pragma: no cover - CLASSES and this switch are kept in step
        raise ValueError(f"unknown shape {name!r}")
    return np.asarray(mask) > 0


def _boxes_near(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    """Whether inclusive pixel boxes (x0, y0, x1, y1) overlap or lie within ``gap`` px of each other."""
    return a[0] <= b[2] + gap and b[0] <= a[2] + gap and a[1] <= b[3] + gap and b[1] <= a[3] + gap


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Float (height, width, 3) textured, low-saturation background in [0, 255]."""
    c0 = rng.uniform(70, 170) + rng.uniform(-12, 12, size=3)
    c1 = rng.uniform(70, 170) + rng.uniform(-12, 12, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    # Smooth grey blotches: a coarse random grid upsampled bilinearly.
    coarse = Image.fromarray(rng.uniform(0, 255, size=(6, 6)).astype(np.uint8), mode="L")
    blotch = np.asarray(coarse.resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0 - 0.5
    img += 40.0 * blotch[..., None]
    return img.astype(np.float32)


def _distractors(rng: np.random.Generator, img: np.ndarray) -> None:
    """Draw small grey dots and thin strokes (not objects) onto ``img`` in place."""
    height, width = img.shape[:2]
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(5, 25))):
        grey = int(rng.choice([rng.uniform(20, 60), rng.uniform(190, 230)]))
        colour = tuple(int(np.clip(grey + rng.uniform(-8, 8), 0, 255)) for _ in range(3))
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        if rng.random() < 0.5:
            r = rng.uniform(1, 2.5)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        else:
            length, angle = rng.uniform(5, 25), rng.uniform(0, 2 * math.pi)
            end = (x + length * math.cos(angle), y + length * math.sin(angle))
            draw.line([(x, y), end], fill=colour, width=1)
    img[...] = np.asarray(canvas, dtype=np.float32)


def render_sample(
    rng: np.random.Generator, width: int, height: int, num_classes: int = 5
) -> tuple[np.ndarray, list[dict]]:
    """Render one image and its objects.

    Returns:
        image: uint8 array (height, width, 3), RGB.
        objects: list of dicts with ``label`` (int, contiguous), ``bbox`` ([x, y, w, h], ints, the
            exact extent of the visible pixels) and ``mask`` (bool array (height, width) of the
            object's visible pixels).
    """
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be in [1, {len(CLASSES)}], got {num_classes}")
    img = _background(rng, width, height)
    _distractors(rng, img)

    max_size = MAX_REL_SIZE * min(width, height)
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    sizes = np.exp(rng.uniform(math.log(MIN_SIZE), math.log(max_size), size=count))
    sizes = np.sort(sizes)[::-1]  # large objects first, small ones on top

    owner = np.full((height, width), -1, dtype=np.int16)
    full_area: list[int] = []
    full_box: list[tuple[int, int, int, int]] = []
    labels: list[int] = []
    colours: list[np.ndarray] = []
    for size in sizes:
        label = int(rng.integers(num_classes))
        aspect = math.exp(rng.uniform(math.log(0.75), math.log(1.333)))
        w = min(size * math.sqrt(aspect), width - 2.0)
        h = min(size / math.sqrt(aspect), height - 2.0)
        rx, ry = w / 2, h / 2
        for _ in range(PLACE_TRIES):
            cx = rng.uniform(rx, width - 1 - rx)
            cy = rng.uniform(ry, height - 1 - ry)
            mask = _shape_mask(label, width, height, cx, cy, rx, ry)
            if not mask.any():
                continue
            ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
            box = (int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1]))
            if any(
                labels[j] == label and _boxes_near(box, full_box[j], SAME_CLASS_GAP)
                for j in range(len(labels))
            ):
                continue
            covered = owner[mask]
            hidden = np.bincount(covered[covered >= 0], minlength=len(full_area))
            visible_ok = all(
                (np.count_nonzero(owner == j) - hidden[j]) >= MIN_VISIBLE * full_area[j]
                for j in np.flatnonzero(hidden)
            )
            if visible_ok:
                owner[mask] = len(full_area)
                full_area.append(int(mask.sum()))
                full_box.append(box)
                labels.append(label)
                base = np.array(CLASSES[label][1], dtype=np.float32)
                colours.append(np.clip(base + rng.uniform(-25, 25, size=3), 0, 255))
                break

    objects = []
    for j, label in enumerate(labels):
        mask = owner == j
        img[mask] = colours[j]
        ys, xs = np.nonzero(mask)
        x0, y0 = int(xs.min()), int(ys.min())
        bbox = [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
        objects.append({"label": label, "bbox": bbox, "mask": mask})

    img += rng.normal(0.0, 4.0, size=img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects


def _write_split(
    out: Path, split: str, count: int, image_size: int, num_classes: int, seed: int
) -> dict:
    img_dir = out / split
    img_dir.mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLITS[split], index]))
        width = int(rng.integers(math.ceil(0.8 * image_size), image_size + 1))
        height = int(rng.integers(math.ceil(0.8 * image_size), image_size + 1))
        image, objects = render_sample(rng, width, height, num_classes)
        file_name = f"{index:06d}.png"
        Image.fromarray(image).save(img_dir / file_name, compress_level=1)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            x, y, w, h = obj["bbox"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id(obj["label"]),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": category_id(i), "name": CLASSES[i][0]} for i in range(num_classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _meta(num_train: int, num_val: int, image_size: int, num_classes: int, seed: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "num_classes": num_classes,
        "seed": seed,
    }


def _missing(root: Path) -> list[str]:
    required = ["train", "val", "annotations/train.json", "annotations/val.json"]
    return [name for name in required if not (root / name).exists()]


def generate_dataset(
    root: str | Path,
    num_train: int,
    num_val: int,
    image_size: int = 256,
    num_classes: int = 5,
    seed: int = 0,
) -> None:
    """Write the synthetic dataset to ``root`` (train/, val/, annotations/{train,val}.json).

    ``root`` must not exist or be an empty directory. The data are written into a temporary
    directory beside ``root`` that is renamed to ``root`` at the end, so an interrupted run never
    leaves a partial dataset at ``root``. If another process completes ``root`` first, its copy is
    kept and this one discarded.
    """
    root = Path(root)
    if num_train < 0 or num_val < 0:
        raise ValueError("num_train and num_val must be >= 0")
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be in [1, {len(CLASSES)}], got {num_classes}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(f"{root}: refusing to generate a dataset into an existing non-empty path")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        (tmp / "annotations").mkdir()
        for split, count in (("train", num_train), ("val", num_val)):
            data = _write_split(tmp, split, count, image_size, num_classes, seed)
            with open(tmp / "annotations" / f"{split}.json", "w") as f:
                json.dump(data, f)
        with open(tmp / META_FILE, "w") as f:
            json.dump(_meta(num_train, num_val, image_size, num_classes, seed), f, indent=2)
        tmp.chmod(default_mode(directory=True))  # mkdtemp's own is owner-only
        try:
            os.replace(tmp, root)  # atomic; replaces an empty directory
        except OSError:
            if root.is_dir() and not _missing(root):
                logger.info("%s was completed by another process; discarding this copy", root)
                shutil.rmtree(tmp, ignore_errors=True)
                return
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_dataset(
    root: str | Path,
    num_train: int,
    num_val: int,
    image_size: int = 256,
    num_classes: int = 5,
    seed: int = 0,
) -> Path:
    """Return ``root``, generating the synthetic dataset there first if it does not exist yet.

    * ``root`` complete (train/, val/, annotations/train.json, annotations/val.json): used as is.
      If it carries a ``synthetic.json`` written with different parameters, ``DatasetError`` is raised
      (remove the directory or choose another root).
    * ``root`` missing or an empty directory: generated.
    * ``root`` non-empty but incomplete (or a file): ``DatasetError``; nothing is deleted.
    """
    root = Path(root)
    wanted = _meta(num_train, num_val, image_size, num_classes, seed)
    if root.is_dir() and not _missing(root):
        meta_path = root / META_FILE
        if meta_path.exists():
            try:
                found = json.loads(meta_path.read_text())
            except (OSError, ValueError) as e:
                raise DatasetError(f"{meta_path}: unreadable dataset description ({e})") from e
            if found != wanted:
                diff = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
                raise DatasetError(
                    f"{root}: existing synthetic dataset was generated with different parameters "
                    f"(found, wanted) = {diff}; remove it or choose another root"
                )
            logger.info("Using existing synthetic dataset at %s", root)
        else:
            logger.info("Using existing COCO-format dataset at %s (not generated here)", root)
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(
            f"{root}: exists but is not a complete dataset (missing: {', '.join(_missing(root))}); "
            "remove it or choose another root"
        )
    logger.info(
        "Generating synthetic dataset at %s (%d train, %d val, %d px, %d classes, seed %d)",
        root, num_train, num_val, image_size, num_classes, seed,
    )
    generate_dataset(root, num_train, num_val, image_size, num_classes, seed)
    logger.info("Synthetic dataset written to %s", root)
    return root
