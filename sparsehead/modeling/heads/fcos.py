"""FCOS heads: the fine-grained dynamic head (gated or fixed) and torchvision's plain head, with costs.

Both are drop-in ``head=`` modules for :class:`torchvision.models.detection.FCOS`: ``forward`` returns
exactly ``cls_logits`` (N, HWA, K), ``bbox_regression`` (N, HWA, 4) and ``bbox_ctrness`` (N, HWA, 1)
(FCOS splits every returned tensor per level in eval mode), and ``compute_loss`` follows torchvision's
(focal, GIoU and centerness losses); the dynamic head adds ``loss_budget``.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOSHead

from ..cost import collect_cost, conv_macs_per_pixel, dense_cost
from ..tower import DynamicTower, ExecutionMixin

__all__ = ["FCOSDynamicHead", "FCOSPlainHead", "build_tower", "flatten_level", "rename_legacy_keys"]


def flatten_level(x: Tensor, size: int) -> Tensor:
    """(N, A * size, H, W) → (N, H * W * A, size), the layout FCOS expects."""
    n, _, h, w = x.shape
    return x.view(n, -1, size, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, size)


def build_tower(channels: int, num_routers: int, **kwargs) -> DynamicTower:
    """The heads' default tower: a 2D :class:`DynamicTower` (``kwargs`` are its keyword arguments)."""
    return DynamicTower(channels, num_routers, ndim=2, **kwargs)


def rename_legacy_keys(
    renames: dict[str, str], state_dict: dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys,
    error_msgs,
) -> None:
    """``load_state_dict`` pre-hook: rename ``prefix + old`` keys to ``prefix + new`` for each ``old -> new``
    of ``renames`` when the new key is absent (state dicts of earlier versions)."""
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        for old, new in renames.items():
            if rest.startswith(old) and prefix + new + rest[len(old):] not in state_dict:
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                break


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

    It is torchvision's :class:`~torchvision.models.detection.fcos.FCOSHead` with ``num_convs=0``: its
    sub-heads hold the dense 3×3 prediction convs (``classification_head.cls_logits``,
    ``regression_head.bbox_reg`` and ``regression_head.bbox_ctrness``), its box coder and ``compute_loss``
    are used as they are, and the two towers run in front of the sub-heads over the whole pyramid (their
    scale paths mix neighbouring levels, so they cannot be the sub-heads' per-level ``conv``). Box
    regression is ``relu(scale_l * bbox_reg(x))`` with a learnable scale per level (``scales``).

    State dicts written before the prediction convs moved into the sub-heads (keys ``cls_logits.*``,
    ``bbox_reg.*``, ``bbox_ctrness.*``) load unchanged: they are renamed on load.
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
        if budget_weight < 0:
            raise ValueError(f"budget_weight must be >= 0, got {budget_weight}")
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"prior_prob must lie in (0, 1), got {prior_prob}")
        super().__init__(in_channels, num_anchors, num_classes, num_convs=0)
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.gated = gated
        self.budget_weight = budget_weight
        self.scales = nn.Parameter(torch.ones(num_levels))
        self.cls_tower = cls_tower if cls_tower is not None else build_tower(
            in_channels, num_routers, tau=tau, num_levels=num_levels, gated=gated, gate_activation=gate_activation,
            gate_init=gate_init, gn_groups=gn_groups, execution=execution,
        )
        self.reg_tower = reg_tower if reg_tower is not None else build_tower(
            in_channels, num_routers, tau=tau, num_levels=num_levels, gated=gated, gate_activation=gate_activation,
            gate_init=gate_init, gn_groups=gn_groups, execution=execution,
        )
        # Parameters in the order of earlier versions (scales, towers, prediction convs), so that the
        # optimizer state of their checkpoints still lines up with the parameters.
        for name in ("classification_head", "regression_head"):
            self._modules[name] = self._modules.pop(name)  # re-inserted last
        nn.init.constant_(self.classification_head.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        self._register_load_state_dict_pre_hook(partial(rename_legacy_keys, LEGACY_KEYS))
        self.last_cost = None

    def _predictor_macs(self) -> int:
        convs = (self.classification_head.cls_logits, self.regression_head.bbox_reg, self.regression_head.bbox_ctrness)
        return sum(c.in_channels * c.out_channels * 9 for c in convs)

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        """FPN maps (N, C, H_l, W_l), finest first → ``cls_logits`` (N, ΣHWA, K), ``bbox_regression``
        (N, ΣHWA, 4) and ``bbox_ctrness`` (N, ΣHWA, 1)."""
        cls_feats = self.cls_tower(x)
        reg_feats = self.reg_tower(x)
        reg = self.regression_head
        boxes, ctrness = [], []
        for level, r in enumerate(reg_feats):
            boxes.append(flatten_level(torch.relu(self.scales[level] * reg.bbox_reg(r)), 4))
            ctrness.append(flatten_level(reg.bbox_ctrness(r), 1))
        self.last_cost = dense_cost(x, self._predictor_macs())
        return {
            "cls_logits": self.classification_head(cls_feats),
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
        """torchvision's FCOS losses, plus ``loss_budget`` when the towers are gated."""
        losses = super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        if self.gated:
            cost = collect_cost(self.cls_tower) + collect_cost(self.reg_tower)
            losses["loss_budget"] = cost.budget_loss(self.budget_weight)
        return losses


# Keys of the prediction convs before they moved into torchvision's sub-heads -> their keys now.
LEGACY_KEYS = {
    "cls_logits.": "classification_head.cls_logits.",
    "bbox_reg.": "regression_head.bbox_reg.",
    "bbox_ctrness.": "regression_head.bbox_ctrness.",
}


class FCOSPlainHead(FCOSHead):
    """torchvision's FCOS head (the paper's "D2" baseline) that records its cost like the others."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4) -> None:
        super().__init__(in_channels, num_anchors, num_classes, num_convs)
        self.last_cost = None

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        out = super().forward(x)
        self.last_cost = dense_cost(x, conv_macs_per_pixel(self))
        return out
