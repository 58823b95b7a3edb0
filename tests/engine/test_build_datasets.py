"""The splits a run uses are checked for what would make its numbers meaningless, before any work."""

import json

import numpy as np
import pytest
from PIL import Image

from sparsehead.config import DEFAULT_CONFIG, load_config
from sparsehead.engine.evaluation import format_summary
from sparsehead.engine.trainer import build_datasets, prepare_data


def _split(tmp_path, name, crowd):
    img_dir = tmp_path / name
    img_dir.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img_dir / "a.png")
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8], "iscrowd": int(crowd)}]
    ann = tmp_path / f"{name}.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 16, "height": 16}],
                               "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    return ann, img_dir


def _cfg(tmp_path, val_crowd_only):
    train = _split(tmp_path, "train", crowd=False)
    val = _split(tmp_path, "val", crowd=val_crowd_only)
    return load_config(DEFAULT_CONFIG, [
        f"output_dir={tmp_path / 'out'}", "model.num_classes=null",
        f"data.train.ann_file={train[0]}", f"data.train.img_dir={train[1]}",
        f"data.val.ann_file={val[0]}", f"data.val.img_dir={val[1]}",
    ])


def test_val_split_without_boxes_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"data.val .*val.json.* no box to evaluate against"):
        build_datasets(_cfg(tmp_path, val_crowd_only=True))


def test_num_classes_inferred_from_training_annotations(tmp_path):
    cfg = _cfg(tmp_path, val_crowd_only=False)
    assert cfg.model.num_classes is None
    build_datasets(cfg)
    assert cfg.model.num_classes == 1


def test_annotation_path_that_is_a_directory(tmp_path):
    cfg = _cfg(tmp_path, val_crowd_only=False)
    cfg.data.val.ann_file = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="data.val.ann_file is a directory"):
        prepare_data(cfg, 0)


def test_summary_says_when_ap_is_undefined():
    metrics = {"bbox_mAP": -1.0, "bbox_mAP_50": -1.0, "bbox_mAP_75": 0.25, "head_gmacs_avg": 1.0,
               "head_gmacs_min": 1.0, "head_gmacs_max": 1.0}
    line = format_summary(metrics)
    assert "-100" not in line and "mAP n/a (no ground-truth box)" in line and "AP75 25.0" in line
