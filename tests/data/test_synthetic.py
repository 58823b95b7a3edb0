"""Tests for the synthetic shapes dataset generator."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from sparsehead.data import DatasetError, ensure_dataset, generate_dataset, synthetic


def _read(root, split="train"):
    return json.loads((root / "annotations" / f"{split}.json").read_text())


def test_deterministic_and_seed_dependent(tmp_path):
    generate_dataset(tmp_path / "a", 6, 3, image_size=64, seed=3)
    generate_dataset(tmp_path / "b", 6, 3, image_size=64, seed=3)
    generate_dataset(tmp_path / "c", 6, 3, image_size=64, seed=4)
    for split in ("train", "val"):
        assert _read(tmp_path / "a", split) == _read(tmp_path / "b", split)
    assert _read(tmp_path / "a") != _read(tmp_path / "c")
    a = np.asarray(Image.open(tmp_path / "a" / "train" / "000002.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "train" / "000002.png"))
    assert np.array_equal(a, b)


def test_layout_and_coco_keys(tmp_path):
    root = tmp_path / "ds"
    generate_dataset(root, 5, 2, image_size=80, num_classes=5)
    data = _read(root)
    assert [c["id"] for c in data["categories"]] == [1, 3, 5, 7, 9]
    assert len(data["images"]) == 5 and len(_read(root, "val")["images"]) == 2
    sizes = set()
    for img in data["images"]:
        assert {"id", "file_name", "width", "height"} <= img.keys()
        with Image.open(root / "train" / img["file_name"]) as im:
            assert im.size == (img["width"], img["height"])
            assert im.mode == "RGB"
        assert 64 <= img["width"] <= 80 and 64 <= img["height"] <= 80
        sizes.add((img["width"], img["height"]))
    assert len(sizes) > 1
    for ann in data["annotations"]:
        assert {"id", "image_id", "category_id", "bbox", "area", "iscrowd"} <= ann.keys()
        assert ann["category_id"] in {1, 3, 5, 7, 9}
        x, y, w, h = ann["bbox"]
        assert w >= 1 and h >= 1 and ann["area"] == w * h
    counts = np.bincount([a["image_id"] for a in data["annotations"]], minlength=6)[1:]
    assert counts.min() >= 1 and counts.max() <= synthetic.MAX_OBJECTS


def test_boxes_are_tight_and_objects_visible():
    for i in range(30):
        rng = np.random.default_rng(i)
        image, objects = synthetic.render_sample(rng, 150, 131, num_classes=8)
        assert image.shape == (131, 150, 3) and image.dtype == np.uint8
        assert 1 <= len(objects) <= synthetic.MAX_OBJECTS
        union = np.zeros((131, 150), dtype=int)
        for obj in objects:
            x, y, w, h = obj["bbox"]
            mask = obj["mask"]
            union += mask
            ys, xs = np.nonzero(mask)
            # every visible pixel inside the box ...
            assert xs.min() >= x and xs.max() <= x + w - 1 and ys.min() >= y and ys.max() <= y + h - 1
            # ... and every border row/column of the box touches the object
            assert mask[y, x : x + w].any() and mask[y + h - 1, x : x + w].any()
            assert mask[y : y + h, x].any() and mask[y : y + h, x + w - 1].any()
            # drawn pixels carry the class colour (not the background)
            base = np.array(synthetic.CLASSES[obj["label"]][1])
            mean = image[mask].mean(axis=0)
            assert np.abs(mean - base).max() < 40
        assert union.max() <= 1  # visible masks are disjoint


def test_size_spread_covers_small_and_large(tmp_path):
    generate_dataset(tmp_path / "ds", 40, 0, image_size=128)
    data = _read(tmp_path / "ds")
    dims = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
    small = large = 0
    for ann in data["annotations"]:
        _, _, w, h = ann["bbox"]
        iw, ih = dims[ann["image_id"]]
        small += max(w, h) < 16
        large += max(w / iw, h / ih) > 0.5
    assert small >= 5 and large >= 5, (small, large)


def test_ensure_generates_then_reuses(tmp_path, caplog):
    root = tmp_path / "ds"
    with caplog.at_level(logging.INFO, logger="sparsehead.data"):
        assert ensure_dataset(root, 3, 2, image_size=48) == root
    assert "Generating" in caplog.text
    ann = root / "annotations" / "train.json"
    stamp = ann.stat().st_mtime_ns
    (root / "train" / "000000.png").unlink()  # would be rewritten by a regeneration
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sparsehead.data"):
        ensure_dataset(root, 3, 2, image_size=48)
    assert "Using existing" in caplog.text
    assert ann.stat().st_mtime_ns == stamp
    assert not (root / "train" / "000000.png").exists()
    with pytest.raises(DatasetError, match="different parameters"):
        ensure_dataset(root, 4, 2, image_size=48)


def test_ensure_generates_into_empty_dir(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    ensure_dataset(root, 2, 1, image_size=48)
    assert (root / "annotations" / "val.json").exists()


def test_ensure_refuses_foreign_dir(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("precious")
    with pytest.raises(DatasetError, match="not a complete dataset"):
        ensure_dataset(root, 2, 1, image_size=48)
    assert (root / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]
    with pytest.raises(DatasetError, match="non-empty"):
        generate_dataset(root, 2, 1, image_size=48)


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = synthetic._write_split

    def failing(out, split, *args):
        calls.append(split)
        if split == "val":
            raise KeyboardInterrupt
        return real(out, split, *args)

    monkeypatch.setattr(synthetic, "_write_split", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "ds", 2, 1, image_size=48)
    assert calls == ["train", "val"]
    assert list(tmp_path.iterdir()) == []  # neither root nor the temporary directory remain


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate_dataset(tmp_path / "a", 1, 1, num_classes=len(synthetic.CLASSES) + 1)
    with pytest.raises(ValueError):
        generate_dataset(tmp_path / "b", 1, 1, image_size=16)
