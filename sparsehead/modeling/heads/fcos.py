"""FCOS heads: the fine-grained dynamic head (gated or fixed) and torchvision's plain head, with costs.

Both are drop-in ``head=`` modules for :class:`torchvision.models.detection.FCOS`: ``forward`` returns
exactly ``cls_logits`` (N, HWA, K), ``bbox_regression`` (N, HWA, 4) and ``bbox_ctrness`` (N, HWA, 1)
(FCOS splits every returned tensor per level in eval mode), and ``compute_loss`` follows torchvision's
(focal, GIoU and centerness losses); the dynamic head adds ``loss_budget``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOSHead

from ..cost import collect_cost, conv_macs_per_pixel, dense_cost
from ..tower import DynamicTower, ExecutionMixin

__all__ = ["FCOSDynamicHead", "FCOSPlainHead", "flatten_level"]


def flatten_level(x: Tensor, size: int) -> Tensor:
    """(N, A * size, H, W) → (N, H * W * A, size), the layout FCOS expects."""
    n, _, h, w = x.shape
    return x.view(n, -1, size, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, size)


class FCOSDynamicHead(ExecutionMixin, FCOSHead):
    """FCOS head with two dynamic towers (classification, regression); centerness on regression.

    Args:
        in_channels: FPN channels ``C``.
        num_anchors: anchors per location (1 for FCOS).
        num_classes: classes ``K``.
        num_routers: routers per tower (the paper's "D4" has 4, "D8" 8).
        gated: False gives the paper's "Fixed" head: the same paths, no gates.
        tau: GeReTanH temperature shift.
        gate_activation, gate_init: gate activation name and initial gate value.
        budget_weight: ``lambda`` of the budget loss ``lambda * mean(soft / full)``.
        execution: ``dense``, ``sparse`` or ``auto`` for the towers' gated paths.
        gn_groups: GroupNorm groups in the towers.
        prior_prob: initial foreground probability of the classification logits.
        num_levels: pyramid levels (5 for P3–P7).
        cls_tower, reg_tower: towers to use instead of building them from the arguments above.

    Prediction convs are dense 3×3; box regression is ``relu(scale_l * conv(x))`` with a learnable scale
    per level (torchvision's box coder multiplies by the stride).
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
        self.box_coder = FCOSHead(1, 1, 1, 0).box_coder  # torchvision's coder, reused by compute_loss
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.gated = gated
        self.budget_weight = budget_weight

        def make_tower() -> DynamicTower:
            return DynamicTower(
                in_channels, num_routers, ndim=2, tau=tau, num_levels=num_levels, gated=gated,
                gate_activation=gate_activation, gate_init=gate_init, gn_groups=gn_groups, execution=execution,
            )

        self.cls_tower = cls_tower if cls_tower is not None else make_tower()
        self.reg_tower = reg_tower if reg_tower is not None else make_tower()
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_reg = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        self.bbox_ctrness = nn.Conv2d(in_channels, num_anchors, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(num_levels))
        for conv in (self.cls_logits, self.bbox_reg, self.bbox_ctrness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        self.last_cost = None

    def _predictor_macs(self) -> int:
        return sum(c.in_channels * c.out_channels * 9 for c in (self.cls_logits, self.bbox_reg, self.bbox_ctrness))

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        cls_feats = self.cls_tower(x)
        reg_feats = self.reg_tower(x)
        logits, boxes, ctrness = [], [], []
        for level, (c, r) in enumerate(zip(cls_feats, reg_feats)):
            logits.append(flatten_level(self.cls_logits(c), self.num_classes))
            boxes.append(flatten_level(torch.relu(self.scales[level] * self.bbox_reg(r)), 4))
            ctrness.append(flatten_level(self.bbox_ctrness(r), 1))
        self.last_cost = dense_cost(x, self._predictor_macs())
        return {
            "cls_logits": torch.cat(logits, dim=1),
            "bbox_regression": torch.cat(boxes, dim=1),
            "bbox_ctrness": torch.cat(ctrness, dim=1),
        }

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


class FCOSPlainHead(FCOSHead):
    """torchvision's FCOS head (the paper's "D2" baseline) that records its cost like the others."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4) -> None:
        super().__init__(in_channels, num_anchors, num_classes, num_convs)
        self.last_cost = None

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        out = super().forward(x)
        self.last_cost = dense_cost(x, conv_macs_per_pixel(self))
        return out
