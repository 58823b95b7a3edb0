"""RetinaNet heads: two dynamic towers (gated or fixed), and torchvision's plain head with costs.

Both are drop-in ``head=`` modules for :class:`torchvision.models.detection.RetinaNet`.

``forward`` returns exactly ``cls_logits`` (N, HWA, K) and ``bbox_regression`` (N, HWA, 4) (RetinaNet splits
every returned tensor per level in eval mode); ``compute_loss`` is torchvision's (sigmoid focal loss and L1
box loss on the encoded deltas), plus ``loss_budget`` when the towers are gated.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.retinanet import (
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
)

from ..cost import collect_cost, conv_macs_per_pixel, dense_cost
from ..tower import DynamicTower, ExecutionMixin
from .fcos import flatten_level

__all__ = ["RetinaNetDynamicHead", "RetinaNetPlainHead"]


class _ClassificationLoss(nn.Module):
    """Parameter-free stand-in for torchvision's classification head: its ``compute_loss`` only."""

    BETWEEN_THRESHOLDS = det_utils.Matcher.BETWEEN_THRESHOLDS
    compute_loss = RetinaNetClassificationHead.compute_loss

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes


class _RegressionLoss(nn.Module):
    """Parameter-free stand-in for torchvision's regression head: its ``compute_loss`` only."""

    compute_loss = RetinaNetRegressionHead.compute_loss

    def __init__(self) -> None:
        super().__init__()
        self.box_coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self._loss_type = "l1"


class RetinaNetDynamicHead(ExecutionMixin, RetinaNetHead):
    """RetinaNet head with a dynamic classification tower and a dynamic regression tower.

    Args:
        in_channels: FPN channels ``C``.
        num_anchors: anchors per location ``A`` (9 for RetinaNet's default generator).
        num_classes: classes ``K``.
        num_routers: routers per tower.
        gated: False gives the "Fixed" head: the same paths, no gates, no budget loss.
        tau: GeReTanH temperature shift.
        gate_activation, gate_init: gate activation name and initial gate value.
        budget_weight: ``lambda`` of the budget loss ``lambda * mean(soft / full)``.
        execution: ``dense``, ``sparse`` or ``auto`` for the towers' gated paths.
        gn_groups: GroupNorm groups in the towers.
        prior_prob: initial foreground probability of the classification logits.
        num_levels: pyramid levels (5 for P3–P7).
        cls_tower, reg_tower: towers to use instead of building them from the arguments above.

    Prediction convs are dense 3×3: ``cls_logits`` (C → A·K) and ``bbox_reg`` (C → A·4); their cost is
    recorded in ``last_cost`` at every pixel of every level.
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        num_routers: int = 4,
        gated: bool = True,
        tau: float = 1.5,
        gate_activation: str = "geretanh",
        gate_init: float = 0.99,
        budget_weight: float = 0.1,
        execution: str = "sparse",
        gn_groups: int = 32,
        prior_prob: float = 0.01,
        num_levels: int = 5,
        cls_tower: Optional[DynamicTower] = None,
        reg_tower: Optional[DynamicTower] = None,
    ) -> None:
        nn.Module.__init__(self)
        if budget_weight < 0:
            raise ValueError(f"budget_weight must be >= 0, got {budget_weight}")
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"prior_prob must lie in (0, 1), got {prior_prob}")
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.gated = gated
        self.budget_weight = budget_weight
        # torchvision's RetinaNetHead.compute_loss calls these two; they hold no parameters.
        self.classification_head = _ClassificationLoss(num_classes)
        self.regression_head = _RegressionLoss()

        def make_tower() -> DynamicTower:
            return DynamicTower(
                in_channels, num_routers, ndim=2, tau=tau, num_levels=num_levels, gated=gated,
                gate_activation=gate_activation, gate_init=gate_init, gn_groups=gn_groups, execution=execution,
            )

        self.cls_tower = cls_tower if cls_tower is not None else make_tower()
        self.reg_tower = reg_tower if reg_tower is not None else make_tower()
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_reg = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        for conv in (self.cls_logits, self.bbox_reg):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        self.last_cost = None

    def _predictor_macs(self) -> int:
        return sum(c.in_channels * c.out_channels * 9 for c in (self.cls_logits, self.bbox_reg))

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        """FPN maps (N, C, H_l, W_l), finest first → ``cls_logits`` (N, ΣHWA, K), ``bbox_regression`` (N, ΣHWA, 4)."""
        cls_feats = self.cls_tower(x)
        reg_feats = self.reg_tower(x)
        logits = [flatten_level(self.cls_logits(c), self.num_classes) for c in cls_feats]
        boxes = [flatten_level(self.bbox_reg(r), 4) for r in reg_feats]
        self.last_cost = dense_cost(x, self._predictor_macs())
        return {"cls_logits": torch.cat(logits, dim=1), "bbox_regression": torch.cat(boxes, dim=1)}

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        losses = super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        if self.gated:
            cost = collect_cost(self.cls_tower) + collect_cost(self.reg_tower)
            losses["loss_budget"] = cost.budget_loss(self.budget_weight)
        return losses


class RetinaNetPlainHead(RetinaNetHead):
    """torchvision's RetinaNet head (four 3×3 convs per tower) that records its cost like the others.

    Args:
        norm: ``"none"``: no normalisation in the towers (torchvision's first RetinaNet head, detectron2's
            and the paper's baseline); ``"gn"``: GroupNorm after each tower conv (torchvision's
            ``retinanet_resnet50_fpn_v2`` head, like FCOS's and the dynamic heads).
        gn_groups: GroupNorm groups when ``norm="gn"``.
    """

    def __init__(
        self, in_channels: int, num_anchors: int, num_classes: int, norm: str = "none", gn_groups: int = 32
    ) -> None:
        if norm not in ("none", "gn"):
            raise ValueError(f"norm must be 'none' or 'gn', got {norm!r}")
        norm_layer = partial(nn.GroupNorm, gn_groups) if norm == "gn" else None
        super().__init__(in_channels, num_anchors, num_classes, norm_layer=norm_layer)
        self.last_cost = None

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        out = super().forward(x)
        self.last_cost = dense_cost(x, conv_macs_per_pixel(self))
        return out
