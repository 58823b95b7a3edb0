"""FCOS heads: the fine-grained dynamic head (gated or fixed) and torchvision's plain head, with costs.

Both are drop-in ``head=`` modules for :class:`torchvision.models.detection.FCOS`: ``forward`` returns
exactly ``cls_logits`` (N, HWA, K), ``bbox_regression`` (N, HWA, 4) and ``bbox_ctrness`` (N, HWA, 1)
(FCOS splits every returned tensor per level in eval mode), and ``compute_loss`` follows torchvision's
(focal, GIoU and centerness losses); the dynamic head adds ``loss_budget``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOSHead

from ..cost import conv_macs_per_pixel, dense_cost
from ..tower import DynamicTower
from .towers import DynamicHeadMixin, check_head_args

__all__ = ["FCOSDynamicHead", "FCOSPlainHead", "flatten_level", "init_box_bias"]


def flatten_level(x: Tensor, size: int) -> Tensor:
    """(N, A * size, H, W) → (N, H * W * A, size), the layout FCOS expects."""
    n, _, h, w = x.shape
    return x.view(n, -1, size, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, size)


def init_box_bias(head: FCOSHead, box_init: float) -> None:
    """Set the bias of ``head``'s box-regression conv to ``box_init`` (>= 0, in anchor sizes).

    The box output is ``relu(conv(x))`` (times a per-level scale in the dynamic head): where a channel's
    output is negative its gradient is zero. With torchvision's zero bias, the sign of each channel at
    initialisation follows the mean of the tower's non-negative features and can be negative at nearly
    every location, so that training starts with degenerate boxes and no box gradient in that channel. A
    positive ``box_init`` starts every location with a box reaching ``box_init`` anchor sizes to each side.
    """
    if box_init < 0:
        raise ValueError(f"box_init must be >= 0, got {box_init}")
    nn.init.constant_(head.regression_head.bbox_reg.bias, box_init)


class FCOSDynamicHead(DynamicHeadMixin, FCOSHead):
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
        resample, scale_bias: the towers' resampling between levels and scale-unit bias
            (:class:`~sparsehead.DynamicTower`).
        box_init: initial bias of the box-regression conv (:func:`init_box_bias`); 0 is torchvision's.
        cls_tower, reg_tower: towers to use instead of building them from the arguments above.

    It is torchvision's :class:`~torchvision.models.detection.fcos.FCOSHead` with ``num_convs=0``: its
    sub-heads hold the dense 3×3 prediction convs (``classification_head.cls_logits``,
    ``regression_head.bbox_reg`` and ``regression_head.bbox_ctrness``), its box coder and ``compute_loss``
    are used as they are, and the two towers run in front of the sub-heads over the whole pyramid (their
    scale paths mix neighbouring levels, so they cannot be the sub-heads' per-level ``conv``). Box
    regression is ``relu(scale_l * bbox_reg(x))`` with a learnable scale per level (``scales``).

    State dicts written before the prediction convs moved into the sub-heads (keys ``cls_logits.*``,
    ``bbox_reg.*``, ``bbox_ctrness.*``) load unchanged: they are renamed on load.
    """

    # Keys of the prediction convs before they moved into torchvision's sub-heads -> their keys now.
    LEGACY_KEYS = {
        "cls_logits.": "classification_head.cls_logits.",
        "bbox_reg.": "regression_head.bbox_reg.",
        "bbox_ctrness.": "regression_head.bbox_ctrness.",
    }

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
        resample: str = "pool",
        scale_bias: bool = False,
        box_init: float = 0.0,
        cls_tower: Optional[DynamicTower] = None,
        reg_tower: Optional[DynamicTower] = None,
    ) -> None:
        check_head_args(budget_weight, prior_prob)
        super().__init__(in_channels, num_anchors, num_classes, num_convs=0)
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.scales = nn.Parameter(torch.ones(num_levels))
        self._add_towers(
            in_channels, num_routers, gated, budget_weight, prior_prob, cls_tower, reg_tower, tau=tau,
            num_levels=num_levels, gate_activation=gate_activation, gate_init=gate_init, gn_groups=gn_groups,
            execution=execution, resample=resample, scale_bias=scale_bias,
        )
        init_box_bias(self, box_init)

    def _predictor_macs(self) -> int:
        convs = (self.classification_head.cls_logits, self.regression_head.bbox_reg, self.regression_head.bbox_ctrness)
        return sum(c.in_channels * c.out_channels * 9 for c in convs)

    def forward(self, x: list[Tensor], valid_sizes: Optional[list[tuple[int, int]]] = None) -> dict[str, Tensor]:
        """FPN maps (N, C, H_l, W_l), finest first → ``cls_logits`` (N, ΣHWA, K), ``bbox_regression``
        (N, ΣHWA, 4) and ``bbox_ctrness`` (N, ΣHWA, 1). ``valid_sizes``: each image's size at the first
        level in a padded batch (:mod:`sparsehead.modeling.valid_region`)."""
        cls_feats = self.cls_tower(x, valid_sizes)
        reg_feats = self.reg_tower(x, valid_sizes)
        reg = self.regression_head
        boxes, ctrness = [], []
        for level, r in enumerate(reg_feats):
            boxes.append(flatten_level(torch.relu(self.scales[level] * reg.bbox_reg(r)), 4))
            ctrness.append(flatten_level(reg.bbox_ctrness(r), 1))
        self.last_cost = dense_cost(x, self._predictor_macs(), valid_sizes)
        return {
            "cls_logits": self.classification_head(cls_feats),
            "bbox_regression": torch.cat(boxes, dim=1),
            "bbox_ctrness": torch.cat(ctrness, dim=1),
        }

class FCOSPlainHead(FCOSHead):
    """torchvision's FCOS head (the paper's "D2" baseline) that records its cost like the others.

    ``box_init``: initial bias of the box-regression conv (:func:`init_box_bias`); 0 keeps torchvision's.
    """

    def __init__(
        self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4, box_init: float = 0.0
    ) -> None:
        super().__init__(in_channels, num_anchors, num_classes, num_convs)
        init_box_bias(self, box_init)
        self.last_cost = None

    def forward(self, x: list[Tensor], valid_sizes: Optional[list[tuple[int, int]]] = None) -> dict[str, Tensor]:
        out = super().forward(x)
        self.last_cost = dense_cost(x, conv_macs_per_pixel(self), valid_sizes)
        return out
