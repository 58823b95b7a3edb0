"""Gate activations and the spatial gate that decides, per pixel, whether a head path runs.

A gate value of exactly 0 switches the path off at that pixel: the sparse execution mode does not
compute it there. GeReTanH (and ReTanH, its tau = 0 case) produce exact zeros; the Sigmoid and
Softmax gates of the paper's ablation never do, so with them every pixel stays active.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .sites import SiteRows
from .sparse import from_rows, matmul_rows, to_rows

__all__ = [
    "GeReTanH", "SigmoidGate", "SoftmaxGate", "SpatialGate", "apply_gates", "build_gate_activation",
    "GATE_ACTIVATIONS", "gate_conv", "conv_taps", "rows_taps", "sum_taps", "gates_from_conv",
]


class GeReTanH(nn.Module):
    """Generalised restricted tanh, Eq. 3 of the paper, applied elementwise.

    ``g = max(0, (tanh(x - tau) + tanh(tau)) / (1 + tanh(tau)))``; ``tau = 0`` is ReTanH,
    ``max(0, tanh(x))``. The output lies in [0, 1) and is exactly 0 for ``x <= 0``.
    """

    def __init__(self, tau: float = 1.5) -> None:
        super().__init__()
        if tau < 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        self.tau = float(tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = math.tanh(self.tau)
        return ((torch.tanh(x - self.tau) + t) / (1.0 + t)).clamp_min(0.0)

    def init_bias(self, value: float) -> float:
        """The pre-activation ``x`` for which the gate equals ``value`` (0 < value < 1)."""
        _check_gate_value(value)
        return 0.5 * math.log((1.0 + value * math.exp(2.0 * self.tau)) / (1.0 - value))

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


class SigmoidGate(nn.Module):
    """``g = sigmoid(x)``: a soft gate for the ablation; it is never exactly zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)

    def init_bias(self, value: float) -> float:
        # The reference implementation writes 0.5 * logit(value) for its sigmoid gates; the paper's
        # ablation inherits that initial value, so keep it.
        _check_gate_value(value)
        return 0.5 * math.log(value / (1.0 - value))


class SoftmaxGate(nn.Module):
    """Softmax over the gate groups and an implicit "off" logit fixed at 0, applied along dim 1.

    With ``G`` gate channels ``x_1..x_G`` the gate of group ``i`` is
    ``exp(x_i) / (1 + sum_j exp(x_j))``: the groups compete for the pixel, and the off logit lets all
    of them fall towards 0 together. With one group it equals ``sigmoid(x)``. Never exactly zero.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        off = torch.zeros_like(x[:, :1])
        return torch.softmax(torch.cat([x, off], dim=1), dim=1)[:, :-1]

    def init_bias(self, value: float, num_groups: int = 1) -> float:
        _check_gate_value(value)
        if value * num_groups >= 1.0:
            raise ValueError(f"a softmax gate over {num_groups} groups cannot start at {value} in every group")
        return math.log(value / (1.0 - num_groups * value))


GATE_ACTIVATIONS = ("geretanh", "retanh", "sigmoid", "softmax")


def build_gate_activation(name: str, tau: float = 1.5) -> nn.Module:
    """Gate activation by name: ``geretanh`` (uses ``tau``), ``retanh``, ``sigmoid`` or ``softmax``."""
    key = name.lower()
    if key == "geretanh":
        return GeReTanH(tau)
    if key == "retanh":
        return GeReTanH(0.0)
    if key == "sigmoid":
        return SigmoidGate()
    if key == "softmax":
        return SoftmaxGate()
    raise ValueError(f"gate_activation must be one of {GATE_ACTIVATIONS}, got {name!r}")


def _check_gate_value(value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"initial gate value must lie in (0, 1), got {value}")


class SpatialGate(nn.Module):
    """Per-pixel gate: a 3×3 convolution from ``channels`` to ``num_groups`` maps and an activation.

    Args:
        channels: input channels ``C``.
        num_groups: gate maps; each gates ``C // num_groups`` consecutive channels of its path.
        ndim: spatial dimensions (2 for (N, C, H, W) maps, 3 for (N, C, D, H, W) volumes).
        activation: a gate activation module, or a name for :func:`build_gate_activation`.
        tau: temperature shift of GeReTanH when ``activation`` is a name.
        init_value: the gate's value at initialisation (the conv weight starts near 0, its bias is
            set so the activation returns this value).
        coarse: if True, average the gate logits over all pixels of each image before the
            activation (the paper's coarse-grained variant): one gate value per image and group.

    ``forward(x)`` maps (N, C, *spatial) to gates (N, num_groups, *spatial), or (N, num_groups,
    1, ...) when ``coarse``; on :class:`~sparsehead.layers.sites.SiteRows` (a pyramid's packed rows) it
    returns rows (R, num_groups), a coarse gate repeated over the rows of each image and level. The conv
    is an ordinary ``torch.nn.Conv2d``/``Conv3d`` at ``.conv``. Forward hooks see either kind of input.
    """

    def __init__(
        self,
        channels: int,
        num_groups: int = 1,
        ndim: int = 2,
        activation: nn.Module | str = "geretanh",
        tau: float = 1.5,
        init_value: float = 0.99,
        coarse: bool = False,
    ) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        if num_groups < 1 or channels % num_groups:
            raise ValueError(f"num_groups must divide channels ({channels}), got {num_groups}")
        self.ndim = ndim
        self.channels = channels
        self.num_groups = num_groups
        self.coarse = coarse
        conv_cls = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.conv = conv_cls(channels, num_groups, kernel_size=3, padding=1)
        self.activation = build_gate_activation(activation, tau) if isinstance(activation, str) else activation
        nn.init.normal_(self.conv.weight, std=0.01)
        if isinstance(self.activation, SoftmaxGate):
            bias = self.activation.init_bias(init_value, num_groups)
        else:
            bias = self.activation.init_bias(init_value)
        nn.init.constant_(self.conv.bias, bias)

    def logits(self, x: torch.Tensor | SiteRows) -> torch.Tensor:
        """Pre-activation gate logits, (N, num_groups, *spatial) or rows (R, num_groups)."""
        return self._pool(self._conv(x), x)

    def _conv(self, x: torch.Tensor | SiteRows) -> torch.Tensor:
        if isinstance(x, SiteRows):
            return x.layout.gate_conv(rows_taps(x.buf, self.conv.weight), self.num_groups, self.conv.bias)
        return gate_conv(x, self.conv.weight, self.conv.bias)

    def _pool(self, conv_out: torch.Tensor, x: torch.Tensor | SiteRows) -> torch.Tensor:
        if not self.coarse:
            return conv_out
        if isinstance(x, SiteRows):
            return x.layout.segment_mean(conv_out)
        return conv_out.mean(dim=tuple(range(2, conv_out.dim())), keepdim=True)

    def forward(self, x: torch.Tensor | SiteRows, conv_out: torch.Tensor | None = None) -> torch.Tensor:
        """Gates of ``x``: (N, num_groups, *spatial) for a map, (R, num_groups) for rows. ``conv_out`` is the
        gate conv of ``x`` (same layout) when the caller has computed it already (see :func:`apply_gates`)."""
        return self.activation(self._pool(self._conv(x) if conv_out is None else conv_out, x))

    def macs_per_pixel(self) -> int:
        """Multiply-accumulates of the gate conv at one pixel."""
        return self.channels * self.num_groups * 3**self.ndim


def apply_gates(gates: Sequence[SpatialGate], x: torch.Tensor) -> list[torch.Tensor]:
    """``[gate(x) for gate in gates]`` with one convolution for all of them (same input ``x``).

    The gate convs read the whole map: stacking their weights reads it once instead of once per gate.
    """
    if len(gates) <= 1:
        return [g(x) for g in gates]
    weight = torch.cat([g.conv.weight for g in gates])
    bias = torch.cat([g.conv.bias for g in gates])
    return gates_from_conv(gates, x, gate_conv(x, weight, bias))


def gates_from_conv(gates: Sequence[SpatialGate], x: torch.Tensor, conv_out: torch.Tensor) -> list[torch.Tensor]:
    """Gates of ``x`` from their stacked conv output (N, sum of G, *spatial), through each gate's
    ``__call__`` (its hooks see it)."""
    return [g(x, conv_out=o) for g, o in zip(gates, conv_out.split([g.num_groups for g in gates], dim=1))]


def gate_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """3×3 (3×3×3) convolution with padding 1 of ``x`` (N, C, *spatial) to few maps (N, G, *spatial).

    ``weight`` is (G, C, 3, 3[, 3]). A gate conv has one or two output maps, a shape for which CPU
    convolution kernels are memory-bound and slow; on CPU it runs as one matrix product of the pixels'
    channel rows (P, C) with all taps' weights (C, G · 3^ndim) (:func:`conv_taps`), whose per-tap outputs
    a grouped conv with a one-hot kernel then shifts into place and sums (:func:`sum_taps`). The result
    equals ``conv2d``/``conv3d`` up to float rounding. Other devices use the conv.
    """
    if x.device.type != "cpu":
        conv = F.conv2d if x.dim() == 4 else F.conv3d
        return conv(x, weight, bias, padding=1)
    return sum_taps(conv_taps(x, weight), bias)


def conv_taps(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-tap products (N, G · 3^ndim, *spatial) of ``x`` (N, C, *spatial) with a gate conv's ``weight``
    (G, C, 3, ...): channel ``g · 3^ndim + t`` is tap ``t`` of group ``g`` applied at each pixel, unshifted.

    Linear in ``x``; channels-last memory (its rows are :func:`rows_taps` of ``x``'s rows).
    """
    taps = rows_taps(to_rows(x), weight)
    return from_rows(taps, (x.shape[0], taps.shape[1], *x.shape[2:]))


def rows_taps(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`conv_taps` of pixel rows (R, C): (R, G · 3^ndim)."""
    groups, c = weight.shape[:2]
    taps = weight[0, 0].numel()
    # (G · 3^ndim, C) contiguous, so that the product's right factor is its transpose, a view
    return matmul_rows(rows, weight.reshape(groups, c, taps).transpose(1, 2).reshape(groups * taps, c).t())


def sum_taps(taps: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The gate conv from its per-tap products (N, G · 3^ndim, *spatial): each tap's map shifted to its
    offset and summed per group, plus ``bias`` (G,): (N, G, *spatial)."""
    ndim = taps.dim() - 2
    groups = taps.shape[1] // 3**ndim
    conv = F.conv2d if ndim == 2 else F.conv3d
    return conv(taps, _tap_kernel(ndim, groups, taps.dtype, taps.device), bias, padding=1, groups=groups)


@functools.lru_cache(maxsize=16)
def _tap_kernel(ndim: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(G, 3^ndim, 3, ..., 3) one-hot kernel: input channel t of each group is read at tap t only."""
    taps = 3**ndim
    return torch.eye(taps, dtype=dtype, device=device).view(1, taps, *(3,) * ndim).repeat(groups, *(1,) * (ndim + 1))


def gate_mask(gate: torch.Tensor) -> torch.Tensor:
    """Pixels where any group of ``gate`` (N, G, *spatial) is positive, as (N, 1, *spatial) bool."""
    return (gate > 0).any(dim=1, keepdim=True)


def expand_gate(gate: torch.Tensor, channels: int) -> torch.Tensor:
    """Repeat each of the G gate maps over its ``channels // G`` channels along dim 1."""
    groups = gate.shape[1]
    return gate if groups == 1 else gate.repeat_interleave(channels // groups, dim=1)


def pool_gate(gate: torch.Tensor) -> torch.Tensor:
    """3×3 max-pool (stride 1, padding 1) of gates (N, G, *spatial): the receptive-field rule."""
    pool = F.max_pool2d if gate.dim() == 4 else F.max_pool3d
    return pool(gate, kernel_size=3, stride=1, padding=1)
