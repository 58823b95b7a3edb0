"""Resampling by a factor of 2 between neighbouring pyramid levels, for full maps and for rows.

Pyramid sizes follow FPN: a level is half the size of the one below, rounded up (13×19 → 7×10).
The same two definitions hold in both execution modes:

- ``downsample``: the mean of each 2^ndim block, where the block of an odd-sized border counts the
  missing pixels as zeros (the map is zero-padded at the end of each odd dimension, then 2^ndim
  average-pooled). Output size ``ceil(size / 2)``.
- ``upsample``: nearest neighbour, ``out[i] = in[i // 2]``, cropped to the finer level's size.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["downsample", "upsample", "downsample_rows", "upsample_rows", "half_size"]


def half_size(size: Sequence[int]) -> list[int]:
    """The next coarser level's spatial size: each dimension halved, rounded up."""
    return [(s + 1) // 2 for s in size]


def downsample(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) → (N, C, *half_size(spatial)), mean of 2^ndim blocks with zero padding."""
    spatial = x.shape[2:]
    pad = []
    for s in reversed(spatial):
        pad += [0, s % 2]
    if any(pad):
        x = F.pad(x, pad)
    pool = F.avg_pool2d if len(spatial) == 2 else F.avg_pool3d
    return pool(x, kernel_size=2, stride=2)


def upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, C, *spatial) → (N, C, *size), nearest neighbour ×2 then cropped to ``size``."""
    out = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return out[(slice(None), slice(None)) + tuple(slice(0, s) for s in size)]


def downsample_rows(indices: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (R, C) at ``indices`` (R, 1 + ndim) → their contributions to the coarser level.

    Returns ``(indices // 2, rows / 2^ndim)``: adding them up per coarse pixel (``index_add``) gives
    :func:`downsample` of the map that holds ``rows`` at ``indices`` and zeros elsewhere.
    """
    ndim = indices.shape[1] - 1
    coarse = indices.clone()
    coarse[:, 1:] = torch.div(indices[:, 1:], 2, rounding_mode="floor")
    return coarse, rows * (1.0 / 2**ndim)


def upsample_rows(
    indices: torch.Tensor, rows: torch.Tensor, size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (R, C) at ``indices`` → the rows of their 2^ndim children on the finer level of ``size``.

    Children outside ``size`` (the crop of an odd-sized finer level) are dropped, as in :func:`upsample`.
    """
    ndim = indices.shape[1] - 1
    offsets = torch.tensor(list(itertools.product((0, 1), repeat=ndim)), device=indices.device, dtype=indices.dtype)
    child = indices[:, None, :].repeat(1, offsets.shape[0], 1)  # (R, 2^ndim, 1 + ndim)
    child[..., 1:] = child[..., 1:] * 2 + offsets
    limit = torch.tensor(list(size), device=indices.device, dtype=indices.dtype)
    valid = (child[..., 1:] < limit).all(dim=-1)  # (R, 2^ndim)
    keep = valid.reshape(-1)
    src = torch.arange(rows.shape[0], device=rows.device).repeat_interleave(offsets.shape[0])[keep]
    return child.reshape(-1, ndim + 1)[keep], rows.index_select(0, src)
