"""Resampling by a factor of 2 between neighbouring pyramid levels, for full maps and for rows.

Pyramid sizes follow FPN: a level is half the size of the one below, rounded up (13×19 → 7×10).
The same two definitions hold in both execution modes:

- ``downsample``: the mean of each 2^ndim block, where the block of an odd-sized border counts the
  missing pixels as zeros (the map is zero-padded at the end of each odd dimension, then 2^ndim
  average-pooled). Output size ``ceil(size / 2)``.
- ``upsample``: nearest neighbour, ``out[i] = in[i // 2]``, cropped to the finer level's size.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["downsample", "upsample", "downsample_parents", "upsample_rows", "half_size"]


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


@functools.lru_cache(maxsize=64)
def _parents(batch: int, size: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(N * prod(size),) int64: the row of each pixel's 2^ndim block on the coarser level."""
    coarse = half_size(size)
    parent = torch.arange(batch * math.prod(coarse), device=device).view(batch, *coarse)
    for d, s in enumerate(size):
        parent = parent.repeat_interleave(2, dim=d + 1).narrow(d + 1, 0, s)
    return parent.reshape(-1)


@functools.lru_cache(maxsize=64)
def _children(batch: int, size: tuple[int, ...], fine: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(N * prod(size), 2^ndim) int64: the rows of each pixel's children on the finer level of size
    ``fine`` (at most twice ``size``), -1 for a child cropped away."""
    ndim = len(size)
    rows = torch.arange(batch * math.prod(fine), device=device).view(batch, *fine)
    pad = []
    for s, f in zip(reversed(size), reversed(fine)):
        pad += [0, 2 * s - f]
    grid = F.pad(rows, pad, value=-1).view(batch, *itertools.chain.from_iterable((s, 2) for s in size))
    order = [0] + [1 + 2 * d for d in range(ndim)] + [2 + 2 * d for d in range(ndim)]
    return grid.permute(order).reshape(-1, 2**ndim)


def downsample_parents(flat: torch.Tensor, batch: int, size: Sequence[int]) -> torch.Tensor:
    """The coarser level's row (R,) of each row number ``flat`` (R,) of a (batch, C, *size) map: its
    2^ndim block's. Rows (R, C) at ``flat``, divided by 2^ndim and added up per parent (``index_add``),
    give :func:`downsample` of the map that holds them at ``flat`` and zeros elsewhere.
    """
    return _parents(batch, tuple(size), flat.device).index_select(0, flat)


def upsample_rows(
    flat: torch.Tensor, rows: torch.Tensor, batch: int, size: Sequence[int], fine: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (R, C) at row numbers ``flat`` of a (batch, C, *size) map → the rows of their 2^ndim
    children on the finer level of size ``fine``, as (child rows, rows).

    Children outside ``fine`` (the crop of an odd-sized finer level) are dropped, as in :func:`upsample`.
    """
    children = _children(batch, tuple(size), tuple(fine), flat.device).index_select(0, flat)  # (R, 2^ndim)
    if bool((children < 0).any()):
        keep = (children >= 0).nonzero()
        return children[keep[:, 0], keep[:, 1]], rows.index_select(0, keep[:, 0])
    return children.reshape(-1), rows.repeat_interleave(children.shape[1], dim=0)
