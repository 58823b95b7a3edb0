"""COCO-format detection dataset for torchvision detection models.

Targets are ``{"boxes": (K, 4) float xyxy pixels, "labels": (K,) int64 in 0..num_classes-1,
"image_id": int}``. COCO category ids (possibly non-contiguous) map to contiguous labels through
``cat_ids``: label ``i`` <-> category id ``cat_ids[i]`` (sorted ascending).

Input is validated at construction so that a bad file fails before any training starts:
missing/invalid annotation file, missing keys, unknown category or image ids, and (with ``train=True``)
a training set without a single usable box all raise ``DatasetError``. Every listed image is checked
once by reading its header: a missing or unreadable file, an unsupported pixel format, or a size that
differs from the annotation's ``width``/``height`` is a *bad image*; all bad images are reported in one
``DatasetError``, or, with ``skip_bad_images=True``, left out (with their annotations) and counted.

Images are read the way they are displayed: the EXIF orientation tag is applied (as detectron2's and
OpenCV's readers do, and as annotation tools show the image), so sizes and boxes refer to the rotated
image. 16-bit images are scaled by their bit depth (value / 65535).

Crowd annotations (``iscrowd=1``) are left out of the targets (they stay in ``coco`` for evaluation).
Boxes are clipped to the image; boxes with zero or negative width or height after clipping are
skipped, with one warning per dataset.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from typing import Any, Callable

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from pycocotools.coco import COCO

logger = logging.getLogger("sparsehead.data")

Target = dict[str, Any]


class DatasetError(ValueError):
    """Invalid or unreadable dataset input (annotation file, image file, or dataset contents)."""


def _require(entry: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise DatasetError(f"{where}: missing required key(s) {missing}")


def _load_json(ann_file: str) -> dict:
    if os.path.isdir(ann_file):
        raise DatasetError(f"{ann_file}: is a directory; expected a COCO annotation JSON file")
    if not os.path.isfile(ann_file):
        raise DatasetError(f"{ann_file}: annotation file not found")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{ann_file}: not valid JSON ({e})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{ann_file}: cannot read annotation file ({e})") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: expected a JSON object at top level")
    _require(data, ("images", "annotations", "categories"), ann_file)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise DatasetError(f"{ann_file}: '{key}' must be a list")
    return data


def _validate(data: dict, ann_file: str) -> None:
    """Check entries and fill the optional COCO fields (``area``, ``iscrowd``) in place."""
    cat_ids = set()
    for i, cat in enumerate(data["categories"]):
        _require(cat, ("id", "name"), f"{ann_file}: categories[{i}]")
        if cat["id"] in cat_ids:
            raise DatasetError(f"{ann_file}: categories[{i}]: duplicate category id {cat['id']}")
        cat_ids.add(cat["id"])
    image_ids = set()
    for i, img in enumerate(data["images"]):
        where = f"{ann_file}: images[{i}]"
        _require(img, ("id", "file_name", "width", "height"), where)
        if img["id"] in image_ids:
            raise DatasetError(f"{where}: duplicate image id {img['id']}")
        image_ids.add(img["id"])
    ann_ids = set()
    for i, ann in enumerate(data["annotations"]):
        where = f"{ann_file}: annotations[{i}] (id {ann.get('id') if isinstance(ann, dict) else '?'})"
        _require(ann, ("id", "image_id", "category_id", "bbox"), where)
        if ann["id"] in ann_ids:
            raise DatasetError(f"{where}: duplicate annotation id")
        ann_ids.add(ann["id"])
        if ann["category_id"] not in cat_ids:
            raise DatasetError(f"{where}: category_id {ann['category_id']} is not in 'categories'")
        if ann["image_id"] not in image_ids:
            raise DatasetError(f"{where}: image_id {ann['image_id']} is not in 'images'")
        bbox = ann["bbox"]
        if (
            not isinstance(bbox, (list, tuple))
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
        ):
            raise DatasetError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(bbox[2]) * float(bbox[3]))


def load_annotations(ann_file: str) -> dict:
    """A COCO annotation file, checked (``DatasetError`` naming the file and entry) and with the optional
    fields (``area``, ``iscrowd``) filled in."""
    data = _load_json(ann_file)
    _validate(data, ann_file)
    return data


def _quiet_coco(data: dict) -> COCO:
    """Build a ``COCO`` index from an in-memory dict, routing its prints to the logger."""
    coco = COCO()
    coco.dataset = data
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco.createIndex()
    if buf.getvalue().strip():
        logger.debug(buf.getvalue().strip())
    return coco


# Pixel formats of 16-bit single-channel files (PNG, TIFF); "I" is how PNG's 16-bit grayscale may open.
_MODES_16BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_EXIF_ORIENTATION = ExifTags.Base.Orientation
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _check_mode(img: Image.Image, path: str) -> None:
    if img.mode in ("F",) or (img.mode == "I" and img.format != "PNG"):
        raise DatasetError(
            f"{path}: unsupported pixel format {img.mode!r} (32-bit integer or float, no known bit depth); "
            "convert it to an 8- or 16-bit image"
        )


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag read from the header (1 when absent)."""
    if img.format == "PNG":  # PNG's getexif() decodes the whole file to look for a trailing eXIf chunk
        exif = Image.Exif()
        if img.info.get("exif"):
            exif.load(img.info["exif"])
    else:
        exif = img.getexif()
    value = exif.get(_EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) else 1


def read_image_size(path: str) -> tuple[int, int]:
    """(width, height) of the image file as displayed (EXIF orientation applied), from its header.

    Raises ``DatasetError`` naming the file when it cannot be read or has an unsupported pixel format.
    """
    try:
        with Image.open(path) as img:
            _check_mode(img, path)
            width, height = img.size
            if _orientation(img) in _TRANSPOSED:
                width, height = height, width
    except DatasetError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read image ({e})") from e
    return width, height


def load_image(path: str) -> torch.Tensor:
    """Read an image file as an RGB float tensor (3, H, W) in [0, 1], as displayed.

    The EXIF orientation tag is applied. Grayscale, RGBA, palette and 16-bit images are converted to RGB
    (alpha is dropped); 16-bit values are divided by 65535 whatever the image's content.
    """
    try:
        with Image.open(path) as img:
            _check_mode(img, path)
            sixteen_bit = img.mode in _MODES_16BIT or img.mode == "I"  # "I" only for PNG (checked above)
            img.load()
            img = ImageOps.exif_transpose(img)
            if sixteen_bit:
                arr = np.asarray(img, dtype=np.float32)
                arr = np.clip(arr / 65535.0, 0.0, 1.0)
                return torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(0).expand(3, -1, -1).clone()
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            rgb = img.convert("RGB")
    except DatasetError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read image ({e})") from e
    arr = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def find_bad_images(data: dict, img_dir: str) -> dict[int, str]:
    """Image id -> what is wrong, for every image of ``data`` whose file is missing, unreadable or of another
    size (as displayed) than its ``width``/``height``. Reads each file's header only."""
    bad = {}
    for info in data["images"]:
        path = os.path.join(img_dir, info["file_name"])
        if not os.path.isfile(path):
            bad[info["id"]] = f"{info['file_name']}: missing"
            continue
        try:
            width, height = read_image_size(path)
        except DatasetError as e:
            bad[info["id"]] = f"{info['file_name']}: {str(e).removeprefix(path + ': ')}"
            continue
        if (width, height) != (info["width"], info["height"]):
            bad[info["id"]] = (
                f"{info['file_name']}: is {width}x{height} (EXIF orientation applied) but the annotation says "
                f"{info['width']}x{info['height']}"
            )
    return bad


def clip_boxes_xywh(bboxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """COCO boxes (K, 4) xywh -> boxes (K, 4) xyxy clipped to [0, width] x [0, height]."""
    boxes = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return boxes


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection dataset.

    Args:
        ann_file: COCO annotation JSON.
        img_dir: directory holding the images named by ``file_name``.
        transforms: callable ``(image, target) -> (image, target)`` applied to each sample.
        train: training set; raises ``DatasetError`` if it has no usable box at all.
        skip_bad_images: leave out (and count in ``num_skipped``) images that are missing, unreadable or of
            another size than annotated, instead of raising ``DatasetError`` listing them.

    ``__getitem__(i)`` returns ``image`` (3, H, W) float in [0, 1] and ``target`` with ``boxes``
    (K, 4) float32 xyxy pixels, ``labels`` (K,) int64 and ``image_id`` (int). Images without
    annotations are kept with ``boxes`` of shape (0, 4).
    """

    def __init__(
        self,
        ann_file: str,
        img_dir: str,
        transforms: Callable | None = None,
        train: bool = False,
        skip_bad_images: bool = False,
    ) -> None:
        self.ann_file = str(ann_file)
        self.img_dir = str(img_dir)
        self.transforms = transforms
        self.train = train

        data = load_annotations(self.ann_file)
        if os.path.isdir(self.img_dir):
            bad = find_bad_images(data, self.img_dir)
        else:
            raise DatasetError(f"{self.img_dir}: image directory not found")
        if bad and not skip_bad_images:
            lines = list(bad.values())
            raise DatasetError(
                f"{self.ann_file}: {len(bad)} of {len(data['images'])} image(s) in {self.img_dir} are bad: "
                + "; ".join(lines[:20]) + (f"; ... ({len(lines) - 20} more)" if len(lines) > 20 else "")
                + ". Fix them, or set data.skip_bad_images=true to leave them out"
            )
        self.num_skipped = len(bad)
        self.skipped = sorted(bad.values())
        if bad:
            data["images"] = [i for i in data["images"] if i["id"] not in bad]
            data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in bad]
            logger.warning(
                "%s: skipped %d bad image(s) of %d (data.skip_bad_images), e.g. %s",
                self.ann_file, len(bad), len(data["images"]) + len(bad), "; ".join(self.skipped[:5]),
            )
        self.coco = _quiet_coco(data)

        self.cat_ids: list[int] = sorted(self.coco.getCatIds())
        self.class_names: list[str] = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.num_classes = len(self.cat_ids)
        self.ids: list[int] = sorted(self.coco.imgs.keys())
        label_of = {c: i for i, c in enumerate(self.cat_ids)}

        self._boxes: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        degenerate: list[int] = []
        for image_id in self.ids:
            info = self.coco.imgs[image_id]
            anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
            boxes = clip_boxes_xywh([a["bbox"] for a in anns], info["width"], info["height"])
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            degenerate.extend(a["id"] for a, k in zip(anns, keep) if not k)
            self._boxes.append(boxes[keep].astype(np.float32))
            self._labels.append(np.array([label_of[a["category_id"]] for a, k in zip(anns, keep) if k],
                                         dtype=np.int64))
        self.num_degenerate = len(degenerate)
        if degenerate:
            logger.warning(
                "%s: skipped %d degenerate box(es) (zero or negative width/height after clipping to "
                "the image), e.g. annotation ids %s",
                self.ann_file, len(degenerate), degenerate[:5],
            )
        self.num_boxes = int(sum(len(b) for b in self._boxes))
        if train and self.num_boxes == 0:
            raise DatasetError(
                f"{self.ann_file}: empty training set ({len(self.ids)} image(s), no usable non-crowd box)"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = load_image(os.path.join(self.img_dir, info["file_name"]))
        boxes, labels = self._boxes[index], self._labels[index]
        height, width = image.shape[1:]
        if (width, height) != (info["width"], info["height"]):  # the header said otherwise when checked
            raise DatasetError(
                f"{os.path.join(self.img_dir, info['file_name'])}: is {width}x{height} but the annotation says "
                f"{info['width']}x{info['height']}"
            )
        target: Target = {
            "boxes": torch.from_numpy(boxes.copy()).reshape(-1, 4),
            "labels": torch.from_numpy(labels.copy()),
            "image_id": int(image_id),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate_fn(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Batch of (image, target) pairs -> (list of images, list of targets); sizes may differ."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
