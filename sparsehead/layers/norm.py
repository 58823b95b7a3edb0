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
        self,
        rows: torch.Tensor,
        batch: torch.Tensor | None,
        batch_size: int,
        mask: torch.Tensor | None = None,
        overwrite: bool = False,
    ) -> torch.Tensor:
        """Normalise rows (R, C) of ``batch_size`` images; ``batch`` (R,) int64 is each row's image (None
        when ``batch_size`` is 1).

        Statistics cover the rows where ``mask`` (R,) bool is True (all rows when None); every row is
        normalised with its image's statistics.
        ``overwrite``: the caller will not read ``rows`` again, so without autograd they may be changed
        in place (the result may or may not share their memory).

        One image on CPU without ``mask`` takes torch's GroupNorm kernel (:meth:`_group_norm_rows`);
        otherwise the statistics are column sums, folded into one scale and shift per image and channel.
        """
        if batch is None and batch_size != 1:
            raise ValueError(f"batch indices are needed for a batch of {batch_size} images")
        c, g = rows.shape[1], self.num_groups
        inplace = overwrite and not torch.is_grad_enabled()
        if batch_size == 1 and mask is None and rows.device.type == "cpu" and rows.shape[0]:
            return self._group_norm_rows(rows, inplace)
        if batch_size == 1:
            # Moments of data shifted by one of its own values per group, so that E[d^2] - E[d]^2 does
            # not cancel; the shift changes the mean only, and is not differentiated (the result does
            # not depend on it).
            stats = rows if mask is None else rows[mask]
            offset = self._offset(stats)  # (C,)
            if mask is None:  # normalise the shifted rows themselves
                rows = rows.sub_(offset) if inplace else rows - offset
                mean, var = self._moments(rows)
            else:  # a copy: shift it in place
                mean, var = self._moments(stats.sub_(offset))
                mean = mean + offset[:: c // g][None]
        else:
            stats_rows, stats_batch = (rows, batch) if mask is None else (rows[mask], batch[mask])
            mean, var = self._batch_moments(stats_rows, stats_batch, batch_size)  # (N, G) each
        scale = (torch.rsqrt(var + self.eps)[:, :, None] * self.weight.view(g, -1)).view(batch_size, c)
        shift = self.bias - (mean[:, :, None] * scale.view(batch_size, g, -1)).view(batch_size, c)  # (N, C)
        if batch_size > 1:
            scale, shift = scale.index_select(0, batch), shift.index_select(0, batch)
        if inplace:
            return rows.mul_(scale).add_(shift)
        return torch.addcmul(shift, rows, scale)

    def _group_norm_rows(self, rows: torch.Tensor, inplace: bool) -> torch.Tensor:
        """All rows (R, C), R > 0, of one image on CPU: torch's channels-last GroupNorm kernel (one fused
        pass for statistics and affine) on the rows shifted by one of their own values per group.

        That kernel takes the variance as E[x^2] - E[x]^2, which cancels for data far from zero mean; the
        shift removes the mean's bulk first and does not change the result (nor its gradient).
        """
        r, c = rows.shape
        g = self.num_groups
        offset = self._offset(rows)
        shifted = rows.sub_(offset) if inplace else rows - offset
        # (R, C) rows are the channels-last layout of a (1, C, 1, R) map: no copy either way. The op itself,
        # not F.group_norm: that refuses a group of one value, which here is a valid (constant) group.
        x = shifted.view(1, 1, r, c).permute(0, 3, 1, 2)
        out = torch.group_norm(x, g, self.weight, self.bias, self.eps, False)
        return out.permute(0, 2, 3, 1).reshape(r, c)

    def _offset(self, rows: torch.Tensor) -> torch.Tensor:
        """(C,): for each channel, the first row's value of its group's first channel (zeros when there is
        no row); a detached copy, so the rows may be shifted by it in place."""
        if rows.shape[0] == 0:
            return rows.new_zeros(rows.shape[1])
        return rows[0, :: rows.shape[1] // self.num_groups].detach().repeat_interleave(rows.shape[1] // self.num_groups)

    def _moments(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (biased) variance per group (1, G) of the rows (R, C) of one image; zeros without rows."""
        g = self.num_groups
        if rows.shape[0] == 0:
            return rows.new_zeros(1, g), rows.new_zeros(1, g)
        # Column sums: several times faster on CPU than var_mean over rows and channels.
        count = float(rows.numel() // g)
        m1 = rows.sum(dim=0).view(g, -1).sum(dim=1) / count
        m2 = rows.square().sum(dim=0).view(g, -1).sum(dim=1) / count
        return m1[None], (m2 - m1.square()).clamp_min(0)[None]

    def _batch_moments(
        self, rows: torch.Tensor, batch: torch.Tensor, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (biased) variance (N, G) per image and group of rows (R, C); zeros for an image
        with no rows."""
        g = self.num_groups
        xs = rows.reshape(rows.shape[0], g, rows.shape[1] // g)
        count = torch.zeros(batch_size, dtype=rows.dtype, device=rows.device).index_add_(
            0, batch, rows.new_ones(rows.shape[0])
        )
        count = (count * xs.shape[2]).clamp_min(1.0)[:, None]  # (N, 1)
        mean = rows.new_zeros(batch_size, g).index_add(0, batch, xs.sum(dim=2)) / count
        centred = xs - mean.index_select(0, batch)[:, :, None]
        var = rows.new_zeros(batch_size, g).index_add(0, batch, centred.square().sum(dim=2)) / count
        return mean, var

    def macs_per_pixel(self) -> int:
        """One multiply-add per element once the statistics are folded into scale and shift."""
        return self.num_channels

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"
