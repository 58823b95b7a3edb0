"""RetinaNet heads: two dynamic towers (gated or fixed), and torchvision's plain head with costs.

Both are drop-in ``head=`` modules for :class:`torchvision.models.detection.RetinaNet`.

``forward`` returns exactly ``cls_logits`` (N, HWA, K) and ``bbox_regression`` (N, HWA, 4) (RetinaNet splits
every returned tensor per level in eval mode); ``compute_loss`` is torchvision's (sigmoid focal loss and L1
box loss on the encoded deltas), plus ``loss_budget`` when the towers are gated.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

from torch import Tensor, nn
from torchvision.models.detection.retinanet import RetinaNetHead

from ..cost import conv_macs_per_pixel, dense_cost
from ..tower import DynamicTower
from .towers import DynamicHeadMixin, check_head_args

__all__ = ["RetinaNetDynamicHead", "RetinaNetPlainHead"]


class RetinaNetDynamicHead(DynamicHeadMixin, RetinaNetHead):
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

    It is torchvision's :class:`~torchvision.models.detection.retinanet.RetinaNetHead`: its sub-heads'
    ``forward`` and ``compute_loss`` run as they are, with the sub-heads' per-level ``conv`` stacks
    replaced by the two towers, which run in front of them over the whole pyramid (their scale paths mix
    neighbouring levels). The sub-heads hold the dense 3×3 prediction convs ``classification_head.cls_logits``
    (C → A·K) and ``regression_head.bbox_reg`` (C → A·4); their cost is recorded in ``last_cost`` at every
    pixel of every level.

    State dicts written before the prediction convs moved into the sub-heads (keys ``cls_logits.*`` and
    ``bbox_reg.*``) load unchanged: they are renamed on load.
    """

    # Keys of the prediction convs before they moved into torchvision's sub-heads -> their keys now.
    LEGACY_KEYS = {"cls_logits.": "classification_head.cls_logits.", "bbox_reg.": "regression_head.bbox_reg."}

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
        cls_tower: Optional[DynamicTower] = None,
        reg_tower: Optional[DynamicTower] = None,
    ) -> None:
        check_head_args(budget_weight, prior_prob)
        super().__init__(in_channels, num_anchors, num_classes)
        # torchvision's sub-heads always build four per-level convs; the towers take their place.
        self.classification_head.conv = nn.Sequential()
        self.regression_head.conv = nn.Sequential()
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self._add_towers(
            in_channels, num_routers, gated, budget_weight, prior_prob, cls_tower, reg_tower, tau=tau,
            num_levels=num_levels, gate_activation=gate_activation, gate_init=gate_init, gn_groups=gn_groups,
            execution=execution, resample=resample, scale_bias=scale_bias,
        )

    def _predictor_macs(self) -> int:
        convs = (self.classification_head.cls_logits, self.regression_head.bbox_reg)
        return sum(c.in_channels * c.out_channels * 9 for c in convs)

    def forward(self, x: list[Tensor], valid_sizes: Optional[list[tuple[int, int]]] = None) -> dict[str, Tensor]:
        """FPN maps (N, C, H_l, W_l), finest first → ``cls_logits`` (N, ΣHWA, K), ``bbox_regression`` (N, ΣHWA, 4).
        ``valid_sizes``: each image's size at the first level in a padded batch."""
        # torchvision's RetinaNetHead.forward feeds both sub-heads the same maps; here each gets its tower's.
        cls_feats = self.cls_tower(x, valid_sizes)
        reg_feats = self.reg_tower(x, valid_sizes)
        self.last_cost = dense_cost(x, self._predictor_macs(), valid_sizes)
        return {"cls_logits": self.classification_head(cls_feats), "bbox_regression": self.regression_head(reg_feats)}

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

    def forward(self, x: list[Tensor], valid_sizes: Optional[list[tuple[int, int]]] = None) -> dict[str, Tensor]:
        out = super().forward(x)
        self.last_cost = dense_cost(x, conv_macs_per_pixel(self), valid_sizes)
        return out
