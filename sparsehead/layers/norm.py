"""GroupNorm over rows whose statistics cover only the pixels a gated path computes, per segment.

Every execution mode uses the same definition, so training (dense or sparse) and inference compute one
function: for each segment (an image at one pyramid level, see :mod:`sparsehead.layers.sites`) and
channel group the mean and variance are taken over the segment's *active* rows only (all channels of the
group), then the usual affine transform is applied to every row. A segment with no active row gets
mean 0 and variance 0; its outputs are never used.

:class:`MaskedGroupNorm` holds the parameters; :func:`group_norm_rows` is the computation.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["MaskedGroupNorm", "group_norm_rows"]


def group_norm_rows(
    rows: torch.Tensor,
    segment: torch.Tensor,
    num_segments: int,
    groups: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    mask: torch.Tensor | None = None,
    overwrite: bool = False,
) -> torch.Tensor:
    """GroupNorm of rows (M, C) with statistics per segment over the rows where ``mask`` (M,) is set.

    Args:
        rows: (M, C).
        segment: (M,) int64 in ``[0, num_segments)``, each row's segment.
        num_segments: ``S``.
        groups: channel groups (must divide C).
        weight, bias: (C,), or (S, C) for a per-segment affine transform.
        eps: added to the variance.
        mask: (M,) bool, the rows that enter the statistics; None: all.
        overwrite: the caller does not read ``rows`` again, so without autograd they are changed in place.

    Returns:
        (M, C). Statistics are two-pass (mean, then the centred squares), so data far from zero mean keeps
        its precision.
    """
    m, c = rows.shape
    cg = c // groups
    inplace = overwrite and not torch.is_grad_enabled() and rows.is_contiguous()
    xs = rows.reshape(m, groups, cg)
    w = None if mask is None else mask.to(rows.dtype)[:, None]
    count = torch.bincount(segment, weights=None if w is None else w[:, 0], minlength=num_segments)
    count = (count.to(rows.dtype) * cg).clamp_min(1.0)[:, None]  # (S, 1)
    sums = xs.sum(dim=2)
    if w is not None:
        sums = sums * w
    mean = rows.new_zeros(num_segments, groups).index_add_(0, segment, sums) / count
    shift = mean.index_select(0, segment)[:, :, None]
    centred = xs.sub_(shift) if inplace else xs - shift
    squares = centred.square().sum(dim=2)
    if w is not None:
        squares = squares * w
    var = rows.new_zeros(num_segments, groups).index_add_(0, segment, squares) / count
    scale = (var + eps).rsqrt()[:, :, None] * weight.view(-1, groups, cg)  # (S or 1, G, cg)
    scale = scale.expand(num_segments, -1, -1).reshape(num_segments, c).index_select(0, segment)
    centred = centred.reshape(m, c)
    per_segment_bias = bias.dim() == 2
    if inplace:
        centred.mul_(scale)
        return centred.add_(bias.index_select(0, segment) if per_segment_bias else bias)
    return torch.addcmul(bias.index_select(0, segment) if per_segment_bias else bias, centred, scale)


class MaskedGroupNorm(nn.Module):
    """GroupNorm over ``num_channels`` in ``num_groups`` groups with statistics over active rows.

    Args:
        num_groups: groups of channels sharing statistics (must divide ``num_channels``).
        num_channels: channels ``C``.
        eps: added to the variance.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"num_groups ({num_groups}) must divide num_channels ({num_channels})")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward_rows(
        self,
        rows: torch.Tensor,
        segment: torch.Tensor,
        num_segments: int,
        mask: torch.Tensor | None = None,
        overwrite: bool = False,
    ) -> torch.Tensor:
        """:func:`group_norm_rows` of rows (M, C) with this module's affine parameters."""
        return group_norm_rows(
            rows, segment, num_segments, self.num_groups, self.weight, self.bias, self.eps, mask, overwrite
        )

    def macs_per_pixel(self) -> int:
        """One multiply-add per element once the statistics are folded into scale and shift."""
        return self.num_channels

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"
