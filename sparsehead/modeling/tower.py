"""DynamicTower: a stack of routers over a feature pyramid, with checked inputs and switchable execution.

The tower packs its input once into :class:`~sparsehead.layers.sites.SiteRows` (all levels and images as
rows of one tensor), runs every router on the rows, and returns views of the result: maps for maps, spconv
tensors on the same indices for spconv tensors (see :mod:`sparsehead.modeling.sparse_input`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..layers.sites import SiteRows
from .router import Router, check_execution
from .sparse_input import forward_sparse, is_sparse_tensor

__all__ = ["DynamicTower", "ExecutionMixin", "set_execution"]


def set_execution(module: nn.Module, mode: str) -> None:
    """Set the execution mode (``dense``, ``sparse`` or ``auto``) of every router inside ``module``."""
    check_execution(mode)
    for m in module.modules():
        if isinstance(m, Router):
            m.execution = mode


class ExecutionMixin:
    """Adds ``set_execution(mode)`` to a module that contains gated paths."""

    def set_execution(self, mode: str) -> None:
        """Switch every gated path inside to ``dense``, ``sparse`` or ``auto`` execution."""
        set_execution(self, mode)  # type: ignore[arg-type]


class DynamicTower(ExecutionMixin, nn.Module):
    """A stack of ``num_routers`` routers applied to all levels of a pyramid (shared weights).

    Args:
        channels: channels ``C`` of every level.
        num_routers: routers in the stack ("D4" in the paper has 4).
        ndim: spatial dimensions: 2 for (N, C, H, W) maps, 3 for (N, C, D, H, W) volumes.
        tau: GeReTanH temperature shift.
        num_levels: pyramid levels expected (5 for P3–P7); None accepts any number (the weights are shared
            across levels).
        gated: False gives the ungated "Fixed" tower (same paths, always computed).
        gate_activation: ``geretanh``, ``retanh``, ``sigmoid`` or ``softmax``.
        gate_init: initial gate value.
        gate_groups: gate maps per path (each gates ``C // gate_groups`` channels).
        coarse_gate: one gate value per image and path (global average of the gate logits).
        gn_groups: GroupNorm groups (default: 32, or the largest divisor of ``C`` below it).
        execution: ``dense``, ``sparse`` or ``auto``.
        auto_threshold: active fraction up to which ``auto`` runs a path sparse.
        resample: ``pool`` (2^ndim block mean down, nearest up) or ``bilinear`` (the paper's reference:
            bilinear/trilinear interpolation with aligned corners both ways); see
            :mod:`sparsehead.layers.resample`.
        scale_bias: the scale units' depthwise convs have a bias (as in the paper's reference code).

    ``tower(features)`` takes a list of tensors (N, C, *spatial), finest first, each level half the size
    of the previous one (rounded up), and returns a list of the same shapes (channels-last views of one
    buffer); or spconv tensors, see :meth:`forward`.
    """

    def __init__(
        self,
        channels: int,
        num_routers: int,
        ndim: int = 2,
        tau: float = 1.5,
        num_levels: int | None = None,
        gated: bool = True,
        gate_activation: str = "geretanh",
        gate_init: float = 0.99,
        gate_groups: int = 1,
        coarse_gate: bool = False,
        gn_groups: int | None = None,
        execution: str = "sparse",
        auto_threshold: float = 0.5,
        resample: str = "pool",
        scale_bias: bool = False,
    ) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        if channels < 1 or num_routers < 1 or (num_levels is not None and num_levels < 1):
            raise ValueError(
                f"channels, num_routers and num_levels must be positive, got {channels}, {num_routers}, {num_levels}"
            )
        check_execution(execution)
        self.channels = channels
        self.ndim = ndim
        self.num_levels = num_levels
        self.resample = resample
        gn_groups = gn_groups or math.gcd(32, channels)
        self.routers = nn.ModuleList(
            Router(
                channels, ndim, gated=gated, tau=tau, gate_activation=gate_activation, gate_init=gate_init,
                gate_groups=gate_groups, coarse_gate=coarse_gate, gn_groups=gn_groups, execution=execution,
                auto_threshold=auto_threshold, resample=resample, scale_bias=scale_bias, name=f"router{i}",
            )
            for i in range(num_routers)
        )

    @property
    def execution(self) -> str:
        return self.routers[0].execution

    def check_levels(self, count: int) -> None:
        """Raise a ValueError if ``count`` levels are not what the tower expects."""
        if self.num_levels is not None and count != self.num_levels:
            raise ValueError(f"features must have {self.num_levels} levels, got {count}")
        if count < 1:
            raise ValueError("features must have at least one level")

    def check_features(self, features: Sequence[torch.Tensor]) -> None:
        """Raise a ValueError/TypeError naming the problem if ``features`` is not a valid pyramid."""
        if isinstance(features, torch.Tensor) or not isinstance(features, (list, tuple)):
            expected = f"{self.num_levels} tensors" if self.num_levels else "tensors"
            raise TypeError(f"features must be a list of {expected}, got {type(features).__name__}")
        self.check_levels(len(features))
        first = features[0]
        for i, x in enumerate(features):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"features[{i}] must be a tensor, got {type(x).__name__}")
            if not x.is_floating_point():
                raise TypeError(f"features[{i}] must be floating point, got {x.dtype}")
            if x.dim() != self.ndim + 2:
                raise ValueError(
                    f"features[{i}] must have shape (N, C, {'D, ' if self.ndim == 3 else ''}H, W) "
                    f"({self.ndim + 2} dims), got {tuple(x.shape)}"
                )
            if x.shape[1] != self.channels:
                raise ValueError(f"features[{i}] must have {self.channels} channels, got {x.shape[1]}")
            if x.shape[0] != first.shape[0]:
                raise ValueError(
                    f"features[{i}] has batch size {x.shape[0]} but features[0] has {first.shape[0]}"
                )
            if x.device != first.device or x.dtype != first.dtype:
                raise ValueError(
                    f"features[{i}] is {x.dtype} on {x.device}, features[0] is {first.dtype} on {first.device}"
                )
            if i:
                expected = tuple((s + 1) // 2 for s in features[i - 1].shape[2:])
                if tuple(x.shape[2:]) != expected:
                    raise ValueError(
                        f"features[{i}] must be half the size of features[{i - 1}] (rounded up): "
                        f"expected spatial size {expected}, got {tuple(x.shape[2:])}"
                    )

    def forward(self, features, valid_sizes: Optional[Sequence[Sequence[int]]] = None):
        """Dense maps in, dense maps out; or SparseConvTensors in, SparseConvTensors out.

        ``features``: a list of (N, C, *spatial) tensors, or (for voxel detectors) one
        ``spconv.pytorch.SparseConvTensor`` (a single level) or a list of them; see
        :mod:`sparsehead.modeling.sparse_input`. ``valid_sizes``: for maps of a padded batch, each image's
        size at the first level; the rest is padding, where no path runs, outputs are zero and no cost
        is counted (coarser levels: halved, rounding up).
        """
        if is_sparse_tensor(features):
            if valid_sizes is not None:
                raise ValueError("valid_sizes applies to maps; spconv tensors hold only their sites")
            return forward_sparse(self, features)
        self.check_features(features)
        if valid_sizes is not None and len(valid_sizes) != features[0].shape[0]:
            raise ValueError(f"valid_sizes has {len(valid_sizes)} entries for a batch of {features[0].shape[0]}")
        return self.run(SiteRows.from_maps(list(features), self.resample, valid_sizes)).to_maps()

    def run(self, x: SiteRows) -> SiteRows:
        """Every router on packed rows ``x``, which the tower owns (they may be overwritten without autograd)."""
        for router in self.routers:
            x = router(x, overwrite_inputs=True)
        return x
