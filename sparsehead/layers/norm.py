"""GroupNorm over rows whose statistics cover only the pixels a gated path computes, per segment.

Every execution mode uses the same definition, so training (dense or sparse) and inference compute one
function: for each segment (an image at one pyramid level, see :mod:`sparsehead.layers.sites`) and
channel group the mean and variance are taken over the segment's *active* rows only (all channels of the
group), then the usual affine transform is applied to every row. A segment with no active row gets
mean 0 and variance 0; its outputs are never used.

:class:`MaskedGroupNorm` holds the parameters; :func:`group_norm_rows` computes it on rows in segments (the
sparse engine), :func:`group_norm_maps` on the maps of one level (dense kernels).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

__all__ = ["MaskedGroupNorm", "group_norm_rows", "group_norm_maps"]


def group_norm_rows(
    rows: torch.Tensor,
    segments: torch.Tensor,
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
        segments: (M, S) one-hot membership of each row in one of ``S`` segments (rows' dtype), e.g. rows of
            :meth:`~sparsehead.layers.sites.SiteLayout.onehot`.
        groups: channel groups (must divide C).
        weight, bias: (C,), or (S, C) for a per-segment affine transform.
        eps: added to the variance.
        mask: (M,) bool, the rows that enter the statistics; None: all.
        overwrite: the caller does not read ``rows`` again, so without autograd they are changed in place.

    Returns:
        (M, C). Statistics are two-pass (mean, then the centred squares), so data far from zero mean keeps
        its precision; segment sums and the scatter back to rows are matrix products with ``segments``.
        Without autograd the same statistics take fewer passes over the rows (in place when ``overwrite``):
        the per-row means are subtracted and the per-row scales applied through matrix products with
        ``segments`` into one buffer, instead of broadcasts over the channel groups; the results agree with
        the autograd path's up to float rounding.
    """
    m, c = rows.shape
    size = c // groups
    stats = segments if mask is None else segments * mask.to(rows.dtype)[:, None]
    count = stats.sum(dim=0).clamp_min(1.0)[:, None]  # (S, 1) rows per segment
    if not torch.is_grad_enabled():
        return _group_norm_rows_inference(rows, segments, stats, count, groups, weight, bias, eps, overwrite)
    mean = (stats.t() @ rows).view(-1, groups, size).mean(dim=2) / count  # (S, G)
    centred = (rows.reshape(m, groups, size) - (segments @ mean)[:, :, None]).view(m, c)  # (M, C)
    var = (stats.t() @ centred.square()).view(-1, groups, size).mean(dim=2) / count  # (S, G)
    scale = ((var + eps).rsqrt()[:, :, None] * weight.view(-1, groups, size)).view(-1, c)  # (S, C)
    if bias.dim() == 2:  # per-segment bias: scattered with the scale
        scale, bias = (segments @ torch.cat([scale, bias], dim=1)).split(c, dim=1)
    else:
        scale = segments @ scale
    return torch.addcmul(bias, centred, scale)


def _group_norm_rows_inference(
    rows: torch.Tensor, segments: torch.Tensor, stats: torch.Tensor, count: torch.Tensor, groups: int,
    weight: torch.Tensor, bias: torch.Tensor, eps: float, overwrite: bool,
) -> torch.Tensor:
    """:func:`group_norm_rows` without autograd: the rows (M, C) are centred in place by one ``addmm_`` with
    the per-segment means spread over their channels, their squares' buffer then takes the per-row scales.
    Group means are matrix products too: a segment's channel sums times :func:`_group_average`."""
    c = rows.shape[1]
    x = rows if overwrite and rows.is_contiguous() else rows.clone(memory_format=torch.contiguous_format)
    average = (stats / count.view(1, -1)).t()  # (S, M): segment means as one product
    spread = None if groups == c else _group_average(groups, c, x.dtype, x.device)

    def group_mean(values: torch.Tensor) -> torch.Tensor:  # (S, C): each channel's group mean per segment
        means = average @ values
        return means if spread is None else means @ spread

    x.addmm_(segments, group_mean(x), alpha=-1.0)  # centred
    buf = x.square()
    scale = group_mean(buf).add_(eps).rsqrt_().mul_(weight)  # (S, C)
    scale = torch.mm(segments, scale, out=buf)  # (M, C): each row's scale
    if bias.dim() == 2:
        return x.mul_(scale).addmm_(segments, bias)
    return torch.addcmul(bias, x, scale, out=x)


@functools.lru_cache(maxsize=32)
def _group_average(groups: int, channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(C, C) block-diagonal matrix: ``values @ it`` replaces each channel of rows (M, C) by the mean of its
    group of ``channels // groups`` channels."""
    size = channels // groups
    block = torch.full((size, size), 1.0 / size, dtype=dtype, device=device)
    return torch.block_diag(*[block] * groups)


def group_norm_maps(
    x: torch.Tensor, mask: torch.Tensor | None, groups: int, weight: torch.Tensor, bias: torch.Tensor,
    eps: float = 1e-5,
) -> torch.Tensor:
    """GroupNorm of maps (N, C, *spatial) with statistics per image over the pixels where ``mask``
    (N, 1, *spatial) is set (the same definition as :func:`group_norm_rows` with one segment per image);
    ``mask`` None: every pixel (torch's GroupNorm). Channels-last maps are read without a copy."""
    if mask is None:
        return torch.group_norm(x, groups, weight, bias, eps, False)
    n, c = x.shape[:2]
    rows = x.movedim(1, -1).reshape(n, -1, groups, c // groups)  # (N, P, G, C / G)
    m = mask.movedim(1, -1).reshape(n, -1, 1, 1).to(x.dtype)
    count = (m.sum(dim=1) * (c // groups)).clamp_min(1.0)  # (N, 1, 1)
    mean = (rows * m).sum(dim=(1, 3)) / count[:, :, 0]  # (N, G)
    centred = rows - mean[:, None, :, None]
    var = (centred.square() * m).sum(dim=(1, 3)) / count[:, :, 0]
    scale = (var + eps).rsqrt()[:, None, :, None] * weight.view(1, 1, groups, -1)
    out = torch.addcmul(bias.view(1, 1, groups, -1), centred, scale)  # (N, P, G, C / G)
    return out.view(n, *x.shape[2:], c).movedim(-1, 1)


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
        self, rows: torch.Tensor, segments: torch.Tensor, mask: torch.Tensor | None = None, overwrite: bool = False
    ) -> torch.Tensor:
        """:func:`group_norm_rows` of rows (M, C) in segments (M, S) with this module's affine parameters."""
        return group_norm_rows(rows, segments, self.num_groups, self.weight, self.bias, self.eps, mask, overwrite)

    def forward_maps(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """:func:`group_norm_maps` of maps (N, C, *spatial) with this module's affine parameters."""
        return group_norm_maps(x, mask, self.num_groups, self.weight, self.bias, self.eps)

    def macs_per_pixel(self) -> int:
        """One multiply-add per element once the statistics are folded into scale and shift."""
        return self.num_channels

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"
