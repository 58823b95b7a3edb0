"""GroupNorm whose statistics cover only the pixels a gated path computes.

Both execution modes use the same definition, so training (dense or sparse) and inference compute one
function: for image ``n`` and channel group ``k`` the mean and variance are taken over the active
pixels of ``n`` only (all channels of the group), then the usual affine transform is applied. An image
with no active pixel gets mean 0 and variance 0; its outputs are never used.

:class:`MaskedGroupNorm` holds the parameters; ``forward_dense`` takes full maps and a mask,
``forward_rows`` takes the active rows of a sparse tensor and their batch index.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["MaskedGroupNorm"]


class MaskedGroupNorm(nn.Module):
    """GroupNorm over ``num_channels`` in ``num_groups`` groups with statistics over active pixels.

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

    def forward_dense(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalise (N, C, *spatial) maps with statistics over ``mask`` (N, 1, *spatial) bool."""
        n, c = x.shape[:2]
        g = self.num_groups
        xs = x.reshape(n, g, c // g, -1)
        m = mask.reshape(n, 1, 1, -1).to(x.dtype)
        count = (m.sum(dim=(2, 3)) * (c // g)).clamp_min(1.0)  # (N, 1)
        mean = (xs * m).sum(dim=(2, 3)) / count  # (N, G)
        centred = xs - mean[:, :, None, None]
        var = (centred.square() * m).sum(dim=(2, 3)) / count
        out = centred * torch.rsqrt(var + self.eps)[:, :, None, None]
        shape = (1, c) + (1,) * (x.dim() - 2)
        return out.reshape(x.shape) * self.weight.view(shape) + self.bias.view(shape)

    def forward_rows(
        self, rows: torch.Tensor, batch: torch.Tensor, batch_size: int, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Normalise rows (R, C) of ``batch_size`` images; ``batch`` (R,) int64 is each row's image.

        Statistics cover the rows where ``mask`` (R,) bool is True (all rows when None); every row is
        normalised with its image's statistics.
        """
        r, c = rows.shape
        g = self.num_groups
        xs = rows.reshape(r, g, c // g)
        if mask is None:
            w = rows.new_ones(r)
        else:
            w = mask.to(rows.dtype)
        count = torch.zeros(batch_size, dtype=rows.dtype, device=rows.device).index_add_(0, batch, w)
        count = (count * (c // g)).clamp_min(1.0)[:, None]  # (N, 1)
        sums = rows.new_zeros(batch_size, g).index_add(0, batch, xs.sum(dim=2) * w[:, None])
        mean = sums / count  # (N, G)
        centred = xs - mean[batch][:, :, None]
        sq = centred.square().sum(dim=2) * w[:, None]
        var = rows.new_zeros(batch_size, g).index_add(0, batch, sq) / count
        out = centred * torch.rsqrt(var + self.eps)[batch][:, :, None]
        return out.reshape(r, c) * self.weight + self.bias

    def macs_per_pixel(self) -> int:
        """One multiply-add per element once the statistics are folded into scale and shift."""
        return self.num_channels

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"
