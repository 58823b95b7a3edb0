"""COCO box evaluation (mAP) with pycocotools.

Predictions use contiguous labels ``0..K-1`` and xyxy boxes; they are converted to COCO results
(``[x, y, w, h]``, ``category_id = cat_ids[label]``). Evaluation always covers *every* image of the
ground truth: an image that never received predictions counts as all misses.

Returned metrics are pycocotools' ``COCOeval.stats[0:6]`` as fractions: ``bbox_mAP`` (IoU .50:.95),
``bbox_mAP_50``, ``bbox_mAP_75``, ``bbox_mAP_s``, ``bbox_mAP_m``, ``bbox_mAP_l``. As in
pycocotools, a metric is ``-1.0`` when the ground truth holds no object of that kind (e.g. no small
objects). With no detections at all the metrics are ``0.0`` (``-1.0`` where there is no ground truth).

For distributed evaluation, gather each process's ``results`` and ``extend`` one evaluator with
them. Results are kept per image: an image id that already has results ignores later ones, so
images duplicated across processes (padding of a distributed sampler) are counted once.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

logger = logging.getLogger("sparsehead.evaluation")

METRIC_NAMES = ["bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l"]


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


@contextlib.contextmanager
def _stdout_to_log(level: int = logging.INFO):
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        text = buf.getvalue().rstrip()
        if text:
            logger.log(level, "%s", text)


class CocoEvaluator:
    """Accumulate detections and compute COCO box mAP.

    Args:
        coco_gt: ground truth (e.g. ``CocoDetection.coco``).
        cat_ids: category id of each contiguous label (``cat_ids[label]``).
    """

    def __init__(self, coco_gt: COCO, cat_ids: list[int]) -> None:
        unknown = [c for c in cat_ids if c not in coco_gt.cats]
        if unknown:
            raise ValueError(f"category ids {unknown} are not in the ground truth")
        self.coco_gt = coco_gt
        self.cat_ids = [int(c) for c in cat_ids]
        self._by_image: dict[int, list[dict]] = {}
        self.coco_eval: COCOeval | None = None

    def reset(self) -> None:
        """Forget all predictions."""
        self._by_image.clear()
        self.coco_eval = None

    def update(self, predictions: dict[int, dict]) -> None:
        """Add predictions ``{image_id: {"boxes": (K, 4) xyxy, "scores": (K,), "labels": (K,)}}``."""
        new: dict[int, list[dict]] = {}
        for image_id, pred in predictions.items():
            image_id = int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"image id {image_id} is not in the ground truth")
            boxes = _as_numpy(pred["boxes"]).astype(np.float64).reshape(-1, 4)
            scores = _as_numpy(pred["scores"]).astype(np.float64).reshape(-1)
            labels = _as_numpy(pred["labels"]).astype(np.int64).reshape(-1)
            if not len(boxes) == len(scores) == len(labels):
                raise ValueError(
                    f"image {image_id}: boxes, scores and labels differ in length "
                    f"({len(boxes)}, {len(scores)}, {len(labels)})"
                )
            if len(labels) and (labels.min() < 0 or labels.max() >= len(self.cat_ids)):
                raise ValueError(
                    f"image {image_id}: labels must be in [0, {len(self.cat_ids)}), "
                    f"got range [{labels.min()}, {labels.max()}]"
                )
            xywh = boxes.copy()
            xywh[:, 2:] -= xywh[:, :2]
            new[image_id] = [
                {
                    "image_id": image_id,
                    "category_id": self.cat_ids[int(label)],
                    "bbox": [float(v) for v in box],
                    "score": float(score),
                }
                for box, score, label in zip(xywh, scores, labels)
            ]
        self._add(new)

    def extend(self, results: Iterable[dict]) -> None:
        """Add COCO results (dicts with image_id, category_id, bbox xywh, score), e.g. from ``results``."""
        new: dict[int, list[dict]] = {}
        for r in results:
            image_id = int(r["image_id"])
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"image id {image_id} is not in the ground truth")
            if r["category_id"] not in self.coco_gt.cats:
                raise ValueError(f"category id {r['category_id']} is not in the ground truth")
            new.setdefault(image_id, []).append(r)
        self._add(new)

    def _add(self, new: dict[int, list[dict]]) -> None:
        for image_id, dets in new.items():
            if image_id in self._by_image:
                logger.debug("image %d already has results; ignoring the repeated ones", image_id)
                continue
            self._by_image[image_id] = dets

    @property
    def results(self) -> list[dict]:
        """All COCO results so far (xywh boxes, COCO category ids)."""
        return [r for dets in self._by_image.values() for r in dets]

    @property
    def image_ids(self) -> list[int]:
        """Image ids that received predictions (possibly empty ones)."""
        return list(self._by_image)

    def _load_results(self, results: list[dict]) -> COCO:
        if results:
            with _stdout_to_log(logging.DEBUG):
                return self.coco_gt.loadRes(copy.deepcopy(results))
        # COCO.loadRes([]) raises; an empty result set is a COCO index with no annotations.
        coco_dt = COCO()
        coco_dt.dataset = {
            "images": list(self.coco_gt.dataset.get("images", [])),
            "categories": copy.deepcopy(self.coco_gt.dataset.get("categories", [])),
            "annotations": [],
        }
        with _stdout_to_log(logging.DEBUG):
            coco_dt.createIndex()
        return coco_dt

    def summarize(self) -> dict[str, float]:
        """Run COCOeval over all ground-truth images; return the six box mAP metrics (fractions)."""
        results = self.results
        coco_dt = self._load_results(results)
        coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
        with _stdout_to_log(logging.DEBUG):
            coco_eval.evaluate()
            coco_eval.accumulate()
        with _stdout_to_log(logging.INFO):
            coco_eval.summarize()
        self.coco_eval = coco_eval
        stats = [float(s) for s in coco_eval.stats[: len(METRIC_NAMES)]]
        if not results:
            logger.info("no detections: mAP is 0")
        return dict(zip(METRIC_NAMES, stats))

    def per_class_ap(self) -> dict[str, float]:
        """AP@[.5:.95] per category name from the last ``summarize`` (-1 where no ground truth)."""
        if self.coco_eval is None:
            raise RuntimeError("call summarize() first")
        precision = self.coco_eval.eval["precision"]  # (T, R, K, A, M)
        out = {}
        for k, cat_id in enumerate(self.coco_eval.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            out[self.coco_gt.cats[cat_id]["name"]] = float(p.mean()) if p.size else -1.0
        return out
