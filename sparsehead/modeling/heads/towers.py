"""What the dynamic heads share: two towers in front of torchvision's sub-heads, and the budget loss."""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional

from torch import Tensor, nn

from ..cost import collect_cost
from ..tower import DynamicTower, ExecutionMixin

__all__ = ["DynamicHeadMixin", "build_tower", "check_head_args", "rename_legacy_keys"]


def build_tower(channels: int, num_routers: int, **kwargs: Any) -> DynamicTower:
    """The heads' default tower: a 2D :class:`DynamicTower` (``kwargs`` are its keyword arguments)."""
    return DynamicTower(channels, num_routers, ndim=2, **kwargs)


def check_head_args(budget_weight: float, prior_prob: float) -> None:
    if budget_weight < 0:
        raise ValueError(f"budget_weight must be >= 0, got {budget_weight}")
    if not 0.0 < prior_prob < 1.0:
        raise ValueError(f"prior_prob must lie in (0, 1), got {prior_prob}")


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


class DynamicHeadMixin(ExecutionMixin):
    """Mixed into a subclass of torchvision's FCOSHead / RetinaNetHead, after that class's ``__init__`` ran.

    :meth:`_add_towers` adds ``cls_tower`` and ``reg_tower`` (run in front of the sub-heads over the whole
    pyramid), sets the classification bias from ``prior_prob`` and renames the keys of earlier state dicts
    on load; ``compute_loss`` is the detector's plus ``loss_budget`` when the towers are gated.
    """

    LEGACY_KEYS: dict[str, str] = {}

    def _add_towers(
        self, in_channels: int, num_routers: int, gated: bool, budget_weight: float, prior_prob: float,
        cls_tower: Optional[DynamicTower], reg_tower: Optional[DynamicTower], **tower_kwargs: Any,
    ) -> None:
        self.gated = gated
        self.budget_weight = budget_weight
        self.cls_tower = cls_tower if cls_tower is not None else build_tower(
            in_channels, num_routers, gated=gated, **tower_kwargs
        )
        self.reg_tower = reg_tower if reg_tower is not None else build_tower(
            in_channels, num_routers, gated=gated, **tower_kwargs
        )
        # Parameters in the order of earlier versions (towers, then prediction convs), so that the optimizer
        # state of their checkpoints still lines up with the parameters.
        for name in ("classification_head", "regression_head"):
            self._modules[name] = self._modules.pop(name)  # re-inserted last
        nn.init.constant_(self.classification_head.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        self._register_load_state_dict_pre_hook(partial(rename_legacy_keys, self.LEGACY_KEYS))
        self.last_cost = None

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        """torchvision's losses of the detector, plus ``loss_budget`` when the towers are gated."""
        losses = super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        if self.gated:
            cost = collect_cost(self.cls_tower) + collect_cost(self.reg_tower)
            losses["loss_budget"] = cost.budget_loss(self.budget_weight)
        return losses
