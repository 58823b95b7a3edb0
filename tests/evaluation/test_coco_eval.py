"""Tests for COCO box evaluation."""

import contextlib
import copy
import io
import logging

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sparsehead.evaluation import METRIC_NAMES, CocoEvaluator

CAT_IDS = [2, 7, 42]


def _gt(annotations, num_images=3):
    images = [
        {"id": i, "file_name": f"{i}.png", "width": 200, "height": 160} for i in range(1, num_images + 1)
    ]
    anns = []
    for k, (image_id, cat, bbox) in enumerate(annotations, start=1):
        anns.append({"id": k, "image_id": image_id, "category_id": cat, "bbox": list(bbox),
                     "area": bbox[2] * bbox[3], "iscrowd": 0})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": c, "name": f"c{c}"} for c in CAT_IDS]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


GT = [
    (1, 2, (10, 10, 20, 20)),
    (1, 42, (50, 40, 100, 80)),
    (2, 7, (5, 5, 8, 6)),
    (2, 7, (100, 60, 60, 70)),
    (3, 42, (0, 0, 150, 120)),
    (3, 2, (30, 100, 40, 30)),
]


def _xyxy(bbox):
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def _perfect(coco):
    preds = {}
    for image_id in coco.imgs:
        anns = coco.imgToAnns[image_id]
        preds[image_id] = {
            "boxes": torch.tensor([_xyxy(a["bbox"]) for a in anns], dtype=torch.float32).reshape(-1, 4),
            "scores": torch.ones(len(anns)),
            "labels": torch.tensor([CAT_IDS.index(a["category_id"]) for a in anns], dtype=torch.int64),
        }
    return preds


def test_perfect_predictions(capsys, caplog):
    coco = _gt(GT)
    ev = CocoEvaluator(coco, CAT_IDS)
    ev.update(_perfect(coco))
    with caplog.at_level(logging.INFO, logger="sparsehead.evaluation"):
        stats = ev.summarize()
    assert list(stats) == METRIC_NAMES
    assert stats == pytest.approx({k: 1.0 for k in METRIC_NAMES})
    assert capsys.readouterr().out == ""  # pycocotools' prints go to the logger
    assert "Average Precision" in caplog.text


def test_known_half_recall():
    # one category, two objects, one found exactly: precision 1 up to recall 0.5 -> AP = 51/101
    coco = _gt([(1, 7, (10, 10, 60, 60)), (2, 7, (20, 20, 60, 60))], num_images=2)
    ev = CocoEvaluator(coco, CAT_IDS)
    ev.update({1: {"boxes": torch.tensor([[10.0, 10.0, 70.0, 70.0]]), "scores": torch.tensor([0.9]),
                   "labels": torch.tensor([1])}})
    stats = ev.summarize()
    assert stats["bbox_mAP"] == pytest.approx(51 / 101)
    assert stats["bbox_mAP_s"] == -1.0 and stats["bbox_mAP_l"] == -1.0  # no such objects
    assert stats["bbox_mAP_m"] == pytest.approx(51 / 101)


def test_partial_matches_pycocotools():
    coco = _gt(GT)
    rng = np.random.default_rng(0)
    preds = {}
    for image_id in coco.imgs:
        boxes, scores, labels = [], [], []
        for a in coco.imgToAnns[image_id]:
            x0, y0, x1, y1 = _xyxy(a["bbox"])
            jitter = rng.uniform(-0.15, 0.15, size=4) * [x1 - x0, y1 - y0, x1 - x0, y1 - y0]
            boxes.append([x0, y0, x1, y1] + jitter)
            scores.append(rng.uniform(0.3, 1.0))
            labels.append(CAT_IDS.index(a["category_id"]))
        for _ in range(3):  # false positives, some with a wrong class
            x, y = rng.uniform(0, 150, size=2)
            boxes.append([x, y, x + rng.uniform(5, 50), y + rng.uniform(5, 50)])
            scores.append(rng.uniform(0.0, 0.8))
            labels.append(int(rng.integers(3)))
        preds[image_id] = {"boxes": torch.tensor(np.array(boxes), dtype=torch.float32),
                           "scores": torch.tensor(scores), "labels": torch.tensor(labels)}
    ev = CocoEvaluator(coco, CAT_IDS)
    ev.update(preds)
    stats = ev.summarize()

    results = []
    for image_id, p in preds.items():
        for box, score, label in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            x0, y0, x1, y1 = box
            results.append({"image_id": image_id, "category_id": CAT_IDS[label],
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    with contextlib.redirect_stdout(io.StringIO()):
        ref = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), "bbox")
        ref.evaluate()
        ref.accumulate()
        ref.summarize()
    assert [stats[k] for k in METRIC_NAMES] == pytest.approx(list(ref.stats[:6]), abs=1e-12)
    assert 0.0 < stats["bbox_mAP"] < 1.0
    assert len(ev.results) == len(results)


def test_empty_predictions(capsys):
    coco = _gt(GT)
    ev = CocoEvaluator(coco, CAT_IDS)
    assert ev.summarize()["bbox_mAP"] == 0.0
    ev.update({1: {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0),
                   "labels": torch.zeros(0, dtype=torch.int64)}})
    stats = ev.summarize()
    assert ev.results == []
    assert stats["bbox_mAP"] == 0.0 and stats["bbox_mAP_50"] == 0.0
    assert capsys.readouterr().out == ""


def test_unpredicted_images_count_as_misses():
    coco = _gt(GT)
    ev = CocoEvaluator(coco, CAT_IDS)
    ev.update({k: v for k, v in _perfect(coco).items() if k != 3})
    stats = ev.summarize()
    assert 0.0 < stats["bbox_mAP"] < 1.0


def test_label_to_category_mapping():
    coco = _gt([(1, 42, (10, 10, 50, 50))], num_images=1)
    box = torch.tensor([[10.0, 10.0, 60.0, 60.0]])
    right = CocoEvaluator(coco, CAT_IDS)
    right.update({1: {"boxes": box, "scores": torch.ones(1), "labels": torch.tensor([2])}})
    assert right.results[0]["category_id"] == 42
    assert right.results[0]["bbox"] == [10.0, 10.0, 50.0, 50.0]
    assert right.summarize()["bbox_mAP"] == pytest.approx(1.0)
    wrong = CocoEvaluator(coco, CAT_IDS)
    wrong.update({1: {"boxes": box, "scores": torch.ones(1), "labels": torch.tensor([1])}})
    assert wrong.results[0]["category_id"] == 7
    assert wrong.summarize()["bbox_mAP"] == 0.0


def test_gather_and_extend_ignores_duplicate_images():
    coco = _gt(GT)
    preds = _perfect(coco)
    rank0, rank1 = CocoEvaluator(coco, CAT_IDS), CocoEvaluator(coco, CAT_IDS)
    rank0.update({1: preds[1], 2: preds[2]})
    rank1.update({3: preds[3], 1: preds[1]})  # image 1 repeated (sampler padding)
    rank0.extend(rank1.results)
    assert len(rank0.results) == len(GT)
    assert rank0.summarize()["bbox_mAP"] == pytest.approx(1.0)


def test_invalid_predictions():
    coco = _gt(GT)
    ev = CocoEvaluator(coco, CAT_IDS)
    box = torch.tensor([[0.0, 0.0, 5.0, 5.0]])
    with pytest.raises(ValueError, match="99"):
        ev.update({99: {"boxes": box, "scores": torch.ones(1), "labels": torch.tensor([0])}})
    with pytest.raises(ValueError, match="labels"):
        ev.update({1: {"boxes": box, "scores": torch.ones(1), "labels": torch.tensor([3])}})
    with pytest.raises(ValueError):
        CocoEvaluator(coco, [2, 5])
