"""Tests for the COCO-format detection dataset."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from sparsehead.data import CocoDetection, DatasetError, build_transforms, collate_fn, load_image


def _write_image(path, size, mode="RGB", fmt=None):
    w, h = size
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        img = img.convert("RGBA")
    elif mode == "P":
        img = img.convert("P")
    img.save(path, format=fmt)


def _dataset(tmp_path, images=None, annotations=None, categories=None):
    """Write a small COCO file (and its images) under tmp_path; return (ann_file, img_dir)."""
    img_dir = tmp_path / "img"
    img_dir.mkdir(exist_ok=True)
    if images is None:
        images = [
            {"id": 10, "file_name": "rgb.png", "width": 40, "height": 30, "_mode": "RGB"},
            {"id": 11, "file_name": "gray.png", "width": 33, "height": 21, "_mode": "L"},
            {"id": 12, "file_name": "rgba.png", "width": 25, "height": 27, "_mode": "RGBA"},
            {"id": 13, "file_name": "photo.jpg", "width": 31, "height": 19, "_mode": "RGB"},
            {"id": 14, "file_name": "pal.png", "width": 20, "height": 20, "_mode": "P"},
        ]
    for img in images:
        mode = img.pop("_mode", "RGB")
        if mode is not None:
            _write_image(img_dir / img["file_name"], (img["width"], img["height"]), mode)
    if categories is None:
        categories = [{"id": 7, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 42, "name": "bird"}]
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 10, "category_id": 42, "bbox": [1, 2, 10, 5], "area": 50, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 2, "bbox": [5, 5, 8, 8], "area": 64, "iscrowd": 1},
            {"id": 3, "image_id": 10, "category_id": 7, "bbox": [35, -4, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 4, "image_id": 11, "category_id": 2, "bbox": [0, 0, 33, 21], "area": 693, "iscrowd": 0},
            {"id": 5, "image_id": 12, "category_id": 7, "bbox": [3, 3, 4, 4]},
            {"id": 6, "image_id": 13, "category_id": 42, "bbox": [2, 2, 3, 3], "area": 9, "iscrowd": 0},
        ]
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(ann_file), str(img_dir)


def test_label_mapping_and_targets(tmp_path):
    ds = CocoDetection(*_dataset(tmp_path))
    assert ds.cat_ids == [2, 7, 42]
    assert ds.class_names == ["dog", "cat", "bird"]
    assert ds.num_classes == 3
    assert ds.ids == [10, 11, 12, 13, 14]
    assert len(ds) == 5
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert target["image_id"] == 10
    # crowd annotation 2 excluded; annotation 3 clipped to the image (x1 40, y0 0)
    assert target["labels"].tolist() == [2, 1]
    assert target["labels"].dtype == torch.int64
    assert target["boxes"].dtype == torch.float32
    assert torch.equal(target["boxes"], torch.tensor([[1.0, 2.0, 11.0, 7.0], [35.0, 0.0, 40.0, 6.0]]))
    # crowd annotations stay available to evaluation
    assert 2 in ds.coco.anns and ds.coco.anns[2]["iscrowd"] == 1


def test_image_formats_load_as_rgb(tmp_path):
    ds = CocoDetection(*_dataset(tmp_path))
    expected = {10: (30, 40), 11: (21, 33), 12: (27, 25), 13: (19, 31), 14: (20, 20)}
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, *expected[target["image_id"]])
        assert image.dtype == torch.float32
    gray, _ = ds[1]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    rgb = np.array(Image.open(tmp_path / "img" / "rgb.png"))
    assert torch.allclose(ds[0][0], torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)


def test_image_without_annotations_kept(tmp_path):
    ds = CocoDetection(*_dataset(tmp_path), train=True)
    image, target = ds[4]
    assert target["image_id"] == 14
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    images, targets = collate_fn([ds[0], ds[4]])
    assert len(images) == 2 and targets[1]["boxes"].shape == (0, 4)


def test_degenerate_boxes_single_warning(tmp_path, caplog):
    anns = [
        {"id": 100 + i, "image_id": 10, "category_id": 7, "bbox": bbox, "iscrowd": 0}
        for i, bbox in enumerate(
            [[1, 1, 0, 5], [1, 1, 5, -2], [45, 3, 5, 5], [3, 31, 4, 4], [-9, 0, 4, 4], [2, 2, 6, 6]]
        )
    ]
    with caplog.at_level(logging.WARNING, logger="sparsehead.data"):
        ds = CocoDetection(*_dataset(tmp_path, annotations=anns))
    records = [r for r in caplog.records if r.name == "sparsehead.data"]
    assert len(records) == 1
    assert "5 degenerate" in records[0].getMessage() and "100" in records[0].getMessage()
    assert ds.num_degenerate == 5
    _, target = ds[0]
    assert target["boxes"].tolist() == [[2.0, 2.0, 8.0, 8.0]]


def test_flip_transform_applied(tmp_path):
    ann_file, img_dir = _dataset(tmp_path)
    ds = CocoDetection(ann_file, img_dir, transforms=build_transforms(True, flip_prob=1.0))
    plain = CocoDetection(ann_file, img_dir)
    image, target = ds[0]
    ref_image, ref_target = plain[0]
    assert torch.equal(image, ref_image.flip(-1))
    assert target["boxes"].tolist() == [[29.0, 2.0, 39.0, 7.0], [0.0, 0.0, 5.0, 6.0]]


# ---------------------------------------------------------------- errors raised at construction


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match="nope.json"):
        CocoDetection(str(tmp_path / "nope.json"), str(tmp_path))


def test_invalid_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="bad.json.*not valid JSON"):
        CocoDetection(str(bad), str(tmp_path))


def test_missing_top_level_key(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DatasetError, match="bad.json.*categories"):
        CocoDetection(str(bad), str(tmp_path))


def test_missing_entry_key(tmp_path):
    anns = [{"id": 9, "image_id": 10, "category_id": 7}]
    with pytest.raises(DatasetError, match=r"ann.json.*annotations\[0\].*bbox"):
        CocoDetection(*_dataset(tmp_path, annotations=anns))


def test_unknown_category(tmp_path):
    anns = [{"id": 9, "image_id": 10, "category_id": 3, "bbox": [0, 0, 2, 2]}]
    with pytest.raises(DatasetError, match=r"ann.json.*id 9.*category_id 3"):
        CocoDetection(*_dataset(tmp_path, annotations=anns))


def test_unknown_image(tmp_path):
    anns = [{"id": 9, "image_id": 99, "category_id": 7, "bbox": [0, 0, 2, 2]}]
    with pytest.raises(DatasetError, match=r"ann.json.*image_id 99"):
        CocoDetection(*_dataset(tmp_path, annotations=anns))


def test_missing_image_file(tmp_path):
    images = [
        {"id": 1, "file_name": "here.png", "width": 8, "height": 8},
        {"id": 2, "file_name": "gone.png", "width": 8, "height": 8, "_mode": None},
    ]
    with pytest.raises(DatasetError, match=r"ann.json.*gone\.png"):
        CocoDetection(*_dataset(tmp_path, images=images, annotations=[]))


def test_empty_training_set(tmp_path):
    anns = [{"id": 1, "image_id": 10, "category_id": 7, "bbox": [0, 0, 5, 5], "iscrowd": 1}]
    args = _dataset(tmp_path, annotations=anns)
    assert len(CocoDetection(*args)) == 5  # fine for evaluation
    with pytest.raises(DatasetError, match="ann.json.*empty training set"):
        CocoDetection(*args, train=True)


def test_bad_images_reported_together_before_use(tmp_path):
    ann_file, img_dir = _dataset(tmp_path)
    (tmp_path / "img" / "gray.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "img" / "photo.jpg").write_bytes(b"not an image at all")
    _write_image(tmp_path / "img" / "pal.png", (21, 20), "P")  # annotated as 20x20
    with pytest.raises(DatasetError) as err:
        CocoDetection(ann_file, img_dir)
    msg = str(err.value)
    assert "3 of 5 image(s)" in msg and "data.skip_bad_images=true" in msg
    assert "gray.png: cannot read image" in msg and "photo.jpg: cannot read image" in msg
    assert "pal.png: is 21x20" in msg and "says 20x20" in msg


def test_skip_bad_images_counts_and_drops_their_annotations(tmp_path, caplog):
    ann_file, img_dir = _dataset(tmp_path)
    (tmp_path / "img" / "gray.png").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="sparsehead.data"):
        ds = CocoDetection(ann_file, img_dir, skip_bad_images=True)
    assert ds.num_skipped == 1 and len(ds) == 4 and ds.skipped[0].startswith("gray.png")
    assert 11 not in ds.coco.imgs and all(a["image_id"] != 11 for a in ds.coco.dataset["annotations"])
    assert sum("skipped 1 bad image" in r.getMessage() for r in caplog.records) == 1
    for i in range(len(ds)):
        ds[i]


def test_actual_size_differs_from_annotation_is_an_error(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 20, "height": 20}]
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [5, 5, 15, 15]}]
    ann_file, img_dir = _dataset(tmp_path, images=images, annotations=anns)
    _write_image(tmp_path / "img" / "a.png", (12, 16))
    with pytest.raises(DatasetError, match=r"a\.png: is 12x16 .* annotation says 20x20"):
        CocoDetection(ann_file, img_dir)


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_orientation_applied(tmp_path, orientation):
    # A picture as displayed: 30 wide, 20 high, a bright square at x 2..8, y 3..9. Stored rotated/flipped
    # with the EXIF tag that tells viewers how to turn it back.
    shown = np.zeros((20, 30, 3), np.uint8)
    shown[3:9, 2:8] = 255
    stored_of = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}
    stored = Image.fromarray(shown).transpose(stored_of[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    stored.save(img_dir / "p.jpg", quality=100, exif=exif)
    images = [{"id": 1, "file_name": "p.jpg", "width": 30, "height": 20}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 6, 6]}]
    (tmp_path / "a.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    image, target = CocoDetection(str(tmp_path / "a.json"), str(img_dir))[0]
    assert image.shape == (3, 20, 30)
    x0, y0, x1, y1 = target["boxes"][0].int().tolist()
    inside = image[:, y0:y1, x0:x1].mean().item()
    assert inside > 0.9 and image.mean().item() < 0.1  # the box covers the bright square


def test_16bit_png_scaled_by_bit_depth(tmp_path):
    for name, peak in (("dark.png", 200), ("bright.png", 60000)):
        arr = np.full((4, 5), peak // 2, np.uint16)
        arr[0, 0] = peak
        Image.fromarray(arr).save(tmp_path / name)
        img = load_image(str(tmp_path / name))
        assert img.shape == (3, 4, 5)
        assert img[0, 0, 0].item() == pytest.approx(peak / 65535, rel=1e-6)
        assert img[0, 1, 1].item() == pytest.approx((peak // 2) / 65535, rel=1e-6)


def test_annotation_file_that_is_a_directory(tmp_path):
    with pytest.raises(DatasetError, match="is a directory"):
        CocoDetection(str(tmp_path), str(tmp_path))
