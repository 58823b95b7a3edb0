"""Evaluation of detections against COCO-format ground truth."""

from .coco_eval import METRIC_NAMES, CocoEvaluator

__all__ = ["METRIC_NAMES", "CocoEvaluator"]
