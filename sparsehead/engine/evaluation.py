"""Evaluation loop: COCO box AP and the realised head cost (MACs per image) over a split."""

import logging
import math
import time
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import unwrap
from .distributed import all_gather_object, get_rank

__all__ = ["head_cost", "evaluate", "format_summary", "METRIC_KEYS"]

logger = logging.getLogger("sparsehead")

METRIC_KEYS = (
    "bbox_mAP",
    "bbox_mAP_50",
    "bbox_mAP_75",
    "bbox_mAP_s",
    "bbox_mAP_m",
    "bbox_mAP_l",
    "head_gmacs_avg",
    "head_gmacs_min",
    "head_gmacs_max",
)


def head_cost(model: nn.Module) -> Optional[Any]:
    """Cost record of the last forward of ``model``'s head (``.realized``, ``.soft``, ``.full``)."""
    from sparsehead import collect_cost

    return collect_cost(unwrap(model).head)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, dataset: Any, device: torch.device) -> Dict[str, float]:
    """Run ``model`` over ``loader`` (this rank's share of ``dataset``) and gather all ranks' results.

    Returns the AP metrics of :class:`sparsehead.evaluation.CocoEvaluator` (fractions),
    ``head_gmacs_{avg,min,max}`` (realised head GMACs per image, 1e9 MACs) and, for gated heads,
    ``head_gflops_paper{,_min,_max}`` (the same in the paper's convention: towers' gated paths only,
    MACs / 2^30, see docs/paper_flops.md); all ranks get the same dict. An image's cost counts its own
    pixels, not the batch's padding.
    """
    from sparsehead.evaluation import CocoEvaluator

    net = unwrap(model)
    was_training = net.training
    net.eval()
    evaluator = CocoEvaluator(dataset.coco, dataset.cat_ids)
    gmacs: List[float] = []
    start = time.perf_counter()
    try:
        bar = tqdm(loader, desc="eval", disable=get_rank() != 0, leave=False, dynamic_ncols=True)
        for images, targets in bar:
            images = [img.to(device, non_blocking=True) for img in images]
            outputs = net(images)
            cost = head_cost(net)
            if cost is not None:
                ours = (cost.realized.detach().double().cpu() / 1e9).tolist()
                paper = [math.nan] * len(ours) if cost.paper is None else (
                    cost.paper.realized.detach().double().cpu() / 2**30).tolist()
                gmacs.extend(zip(ours, paper))
            evaluator.update(
                {
                    t["image_id"]: {k: o[k].detach().cpu() for k in ("boxes", "scores", "labels")}
                    for t, o in zip(targets, outputs)
                }
            )
    finally:
        net.train(was_training)

    gathered = all_gather_object((evaluator.results, gmacs))
    if len(gathered) > 1:
        evaluator = CocoEvaluator(dataset.coco, dataset.cat_ids)
        gmacs = []
        for results, costs in gathered:
            evaluator.extend(results)
            gmacs.extend(costs)
    metrics = {k: float(v) for k, v in evaluator.summarize().items()}
    ours = [g for g, _ in gmacs]
    metrics["head_gmacs_avg"] = sum(ours) / len(ours) if ours else math.nan
    metrics["head_gmacs_min"] = min(ours) if ours else math.nan
    metrics["head_gmacs_max"] = max(ours) if ours else math.nan
    paper = [p for _, p in gmacs if not math.isnan(p)]
    if paper:  # gated towers only
        metrics["head_gflops_paper"] = sum(paper) / len(paper)
        metrics["head_gflops_paper_min"] = min(paper)
        metrics["head_gflops_paper_max"] = max(paper)
    metrics["num_images"] = len(gmacs)
    logger.info("Evaluated %d images in %.1fs", len(gmacs), time.perf_counter() - start)
    return metrics


def _percent(value: float) -> str:
    # pycocotools reports -1 where the ground truth has nothing to measure against
    return f"{100 * value:.1f}" if value >= 0 else "n/a (no ground-truth box)"


def format_summary(metrics: Dict[str, float]) -> str:
    """One line: AP figures in percent and the realised head GMACs."""
    return (
        f"mAP {_percent(metrics['bbox_mAP'])} | AP50 {_percent(metrics['bbox_mAP_50'])} | "
        f"AP75 {_percent(metrics['bbox_mAP_75'])} | head GMACs/img avg {metrics['head_gmacs_avg']:.3f} "
        f"(min {metrics['head_gmacs_min']:.3f}, max {metrics['head_gmacs_max']:.3f})"
    )
