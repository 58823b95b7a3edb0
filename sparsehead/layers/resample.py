"""Resampling by a factor of 2 between neighbouring pyramid levels: on maps, and as tables on rows.

Pyramid sizes follow FPN: a level is half the size of the one below, rounded up (13×19 → 7×10). Two
definitions (``resample``), the same in every execution mode:

- ``pool`` (default): ``downsample`` is the mean of each 2^ndim block, where the block of an odd-sized
  border counts the missing pixels as zeros (the map is zero-padded at the end of each odd dimension,
  then 2^ndim average-pooled); ``upsample`` is nearest neighbour, ``out[i] = in[i // 2]``, cropped to the
  finer level's size.
- ``bilinear``: the paper's reference: ``F.interpolate(x, size, mode="bilinear", align_corners=True)``
  (trilinear in 3D) in both directions, output pixel ``o`` sampling the input at ``o · (n_in - 1) /
  (n_out - 1)``; downsampling by 2 is then point sampling between neighbours, not a block mean.

Both are linear maps that act on each dimension separately. On rows (the sparse engine) they are tables:
for each source pixel, the destination pixels it contributes to, with weights (``fan_out``); a row's
contribution is added into its targets (``index_add``). :func:`grid_tables` builds them for whole maps,
:func:`index_tables` for sparse index sets (voxels), where a target that is not a site receives nothing.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "RESAMPLE_MODES", "downsample", "upsample", "resample_map", "half_size", "fan_out", "grid_tables", "index_tables",
]

RESAMPLE_MODES = ("pool", "bilinear")


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


def resample_map(x: torch.Tensor, size: Sequence[int], mode: str, down: bool) -> torch.Tensor:
    """``x`` (N, C, *spatial) resampled to the neighbouring level's ``size`` by ``mode`` (``down``: the
    coarser level)."""
    _check_mode(mode)
    if mode == "bilinear":
        return F.interpolate(x, size=tuple(size), mode="bilinear" if x.dim() == 4 else "trilinear",
                             align_corners=True)
    return downsample(x) if down else upsample(x, size)


def _check_mode(mode: str) -> None:
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"resample must be one of {RESAMPLE_MODES}, got {mode!r}")


def _fan_out_1d(n_in: int, n_out: int, mode: str, down: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one dimension: for each input index, the output indices it contributes to and the weights,
    ``(targets (n_in, f), weights (n_in, f))``, padded with weight 0."""
    i = torch.arange(n_in)
    if mode == "bilinear":
        return _bilinear_fan_out(n_in, n_out)
    if down:  # the half of a 2-block mean
        return (i // 2)[:, None], torch.full((n_in, 1), 0.5, dtype=torch.float64)
    t = torch.stack([2 * i, 2 * i + 1], dim=1)  # nearest: both children, the one past the end cropped
    return t.clamp_max(n_out - 1), (t < n_out).double()


def _bilinear_fan_out(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear interpolation with aligned corners, as torch's upsampling kernels compute it: output ``o``
    reads ``i0 = min(floor(src), n_in - 1)`` and ``i0 + 1`` (when it exists) at ``src = o · scale``,
    ``scale = (n_in - 1) / (n_out - 1)``, with weights ``1 - λ`` and ``λ = clamp(src - i0, 0, 1)``."""
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        src = scale * o
        i0 = min(math.floor(src), n_in - 1)
        lam = min(max(src - i0, 0.0), 1.0)
        i1 = i0 + (1 if i0 < n_in - 1 else 0)
        matrix[o, i0] += 1.0 - lam
        matrix[o, i1] += lam
    width = max(1, int((matrix != 0).sum(dim=0).max()))
    targets = torch.zeros(n_in, width, dtype=torch.int64)
    weights = torch.zeros(n_in, width, dtype=torch.float64)
    for i in range(n_in):
        outs = (matrix[:, i] != 0).nonzero()[:, 0]
        targets[i, : outs.numel()] = outs
        weights[i, : outs.numel()] = matrix[outs, i]
    return targets, weights


def fan_out(
    coords: torch.Tensor, src: Sequence[int], dst: Sequence[int], mode: str = "pool", down: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of the pixels at ``coords`` (P, ndim) of a ``src``-shaped map in the ``dst``-shaped
    neighbour level (``down``: ``dst`` is the coarser one; shapes alone are ambiguous for size-1 levels).

    Returns ``(targets (P, F) int64, weights (P, F) float64)``: row-major flat pixel numbers in ``dst``,
    weight 0 where a pixel has fewer than ``F`` targets. The map is separable: ``F`` is the product of
    the per-dimension fan-outs.
    """
    _check_mode(mode)
    coords = coords.long().cpu()
    targets = torch.zeros(coords.shape[0], 1, dtype=torch.int64)
    weights = torch.ones(coords.shape[0], 1, dtype=torch.float64)
    for d, (n_in, n_out) in enumerate(zip(src, dst)):
        t, w = _fan_out_1d(n_in, n_out, mode, down)
        t, w = t[coords[:, d]], w[coords[:, d]]  # (P, f_d)
        targets = (targets[:, :, None] * n_out + t[:, None, :]).flatten(1)
        weights = (weights[:, :, None] * w[:, None, :]).flatten(1)
    return targets, weights


def _grid_coords(shape: Sequence[int]) -> torch.Tensor:
    axes = [torch.arange(s) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))


def grid_tables(
    batch: int, shapes: Sequence[Sequence[int]], offsets: Sequence[int], mode: str, device: torch.device
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Down and up tables over the packed rows of whole maps (see :mod:`sparsehead.layers.sites`):
    ``(index (R, F), weight (R, F))`` each, index a global row, weight 0 where there is no target."""
    levels = len(shapes)
    tables = []
    for down in (True, False):
        parts_i, parts_w = [], []
        for lvl, shape in enumerate(shapes):
            dst = lvl + 1 if down else lvl - 1
            pix = math.prod(shape)
            if not 0 <= dst < levels:
                parts_i.append(torch.zeros(batch * pix, 1, dtype=torch.int64))
                parts_w.append(torch.zeros(batch * pix, 1, dtype=torch.float64))
                continue
            t, w = fan_out(_grid_coords(shape), shape, shapes[dst], mode, down)
            base = offsets[dst] + torch.arange(batch)[:, None, None] * math.prod(shapes[dst])
            parts_i.append((t[None] + base).reshape(-1, t.shape[1]))
            parts_w.append(w[None].expand(batch, -1, -1).reshape(-1, w.shape[1]))
        tables.append(_stack_tables(parts_i, parts_w, device))
    return tables[0], tables[1]


def _stack_tables(parts_i, parts_w, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.shape[1] for p in parts_i)
    index = torch.cat([F.pad(p, (0, width - p.shape[1])) for p in parts_i])
    weight = torch.cat([F.pad(p, (0, width - p.shape[1])) for p in parts_w])
    return index.to(device), weight.to(device)


def index_tables(images, coords, shapes, lookups, offsets, mode: str):
    """Down and up tables over the packed rows of sparse levels: as :func:`grid_tables`, with targets that
    are not sites of the destination level dropped (weight 0). ``lookups[l](image, coords)`` gives the
    global row of a site of level ``l`` or ``R``."""
    levels = len(shapes)
    device = coords[0].device
    total = offsets[-1]
    tables = []
    for down in (True, False):
        parts_i, parts_w = [], []
        for lvl, shape in enumerate(shapes):
            dst = lvl + 1 if down else lvl - 1
            rows = coords[lvl].shape[0]
            if not 0 <= dst < levels or rows == 0:
                parts_i.append(torch.zeros(rows, 1, dtype=torch.int64, device=device))
                parts_w.append(torch.zeros(rows, 1, dtype=torch.float64, device=device))
                continue
            t, w = fan_out(coords[lvl], shape, shapes[dst], mode, down)
            t, w = t.to(device), w.to(device)  # (R_l, F)
            dst_coords = _unflat(t, shapes[dst])  # (R_l, F, ndim)
            target = lookups[dst](images[lvl][:, None].expand_as(t), dst_coords)
            w = w * (target < total)
            parts_i.append(target.masked_fill(target >= total, 0))
            parts_w.append(w)
        tables.append(_stack_tables(parts_i, parts_w, device))
    return tables[0], tables[1]


def _unflat(flat: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    out = []
    for s in reversed(shape):
        out.append(flat % s)
        flat = torch.div(flat, s, rounding_mode="floor")
    return torch.stack(out[::-1], dim=-1)
