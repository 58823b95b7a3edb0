"""Sparse building blocks: row layout, spconv submanifold convs, gathered-neighbour convs, dilation.

Layout. A dense map (N, C, *spatial) and its "rows" (N * prod(spatial), C) are two views of one
channels-last tensor; the sparse mode keeps maps channels-last so that gathering the rows of active
pixels is an ``index_select`` on a view and scattering them back an ``index_add``. Active pixels are
given by ``indices`` (R, 1 + ndim) int (batch, then spatial coordinates), as in spconv.

Algorithms. spconv runs only ``ConvAlgo.Native`` on CPU; on CUDA its implicit-GEMM kernels
(``MaskImplicitGemm``) are faster. :class:`SubMConv` picks the algorithm from the device of each input.
Its weight is stored the spconv way, (C_out, *kernel, C_in); :meth:`SubMConv.dense_weight` gives the
torch layout for the dense mode.

spconv has no grouped convolution. :func:`depthwise_conv_rows` computes a depthwise 3^ndim conv at
chosen output pixels by gathering each output's neighbours from the rows of a dense map.

Exact output sets. A submanifold conv computes at every input pixel. When a conv's outputs are needed on
a smaller set than the pixels it reads (the depth path's first conv reads the 3×3 dilation of its
outputs), :func:`neighbour_table` lists, for each wanted output, the rows its kernel taps read, and
:func:`gather_conv` multiplies the gathered neighbours by the weight: no work on pixels whose result
would be thrown away. This is the depth path's CPU implementation: spconv's only CPU algorithm
(Native, a gather-GEMM-scatter per kernel offset) runs about a third slower than one GEMM over
gathered columns there.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import spconv.pytorch as spconv
import torch
import torch.nn.functional as F
from spconv.core import ConvAlgo
from spconv.pytorch.conv import SparseConvolution

__all__ = [
    "SubMConv",
    "conv_algo",
    "to_rows",
    "channels_last",
    "from_rows",
    "flat_index",
    "mask_indices",
    "dilate",
    "depthwise_conv_rows",
    "kernel_offsets",
    "neighbour_table",
    "gather_conv",
]


def conv_algo(device: torch.device) -> ConvAlgo:
    """spconv algorithm for tensors on ``device``: Native on CPU, MaskImplicitGemm on CUDA."""
    return ConvAlgo.MaskImplicitGemm if device.type == "cuda" else ConvAlgo.Native


class SubMConv(SparseConvolution):
    """Submanifold ``kernel_size``^ndim convolution without bias, algorithm chosen per device.

    Args:
        ndim: spatial dimensions.
        in_channels, out_channels: channels.
        kernel_size: odd kernel size (padding keeps the index set).
        indice_key: rulebook key; convs with the same key on the same index set share one rulebook.
    """

    def __init__(
        self, ndim: int, in_channels: int, out_channels: int, kernel_size: int = 3, indice_key: str | None = None
    ) -> None:
        # Bias stays off: spconv's CPU path rejects bias under no_grad, and a norm follows anyway.
        super().__init__(
            ndim, in_channels, out_channels, kernel_size, stride=1, padding=kernel_size // 2,
            bias=False, subm=True, indice_key=indice_key, algo=ConvAlgo.Native,
        )

    def forward(self, x: spconv.SparseConvTensor) -> spconv.SparseConvTensor:
        # spconv 2.x stores every algorithm's weight as (C_out, *kernel, C_in), so switching is safe.
        self.algo = conv_algo(x.features.device)
        return super().forward(x)

    def dense_weight(self) -> torch.Tensor:
        """The weight in torch's (C_out, C_in, *kernel) layout (differentiable)."""
        return self.weight.movedim(-1, 1)

    def macs_per_pixel(self) -> int:
        return self.in_channels * self.out_channels * math.prod(self.kernel_size)


def to_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) → (N * prod(spatial), C); a view when ``x`` is channels-last."""
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def from_rows(rows: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(N * prod(spatial), C) → (N, C, *spatial) channels-last view, ``shape`` = (N, C, *spatial)."""
    n, c, *spatial = shape
    return rows.view(n, *spatial, c).movedim(-1, 1)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, *spatial) with channels-last memory (no copy when it already is)."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def flat_index(indices: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Row numbers (R,) int64 of ``indices`` (R, 1 + ndim) in the rows of a (N, C, *spatial) map."""
    idx = indices.long()
    flat = idx[:, 0]
    for d, size in enumerate(spatial_shape):
        flat = flat * size + idx[:, d + 1]
    return flat


def mask_indices(mask: torch.Tensor) -> torch.Tensor:
    """Indices (R, 1 + ndim) int32 of the True pixels of ``mask`` (N, 1, *spatial), row-major order."""
    # spconv reads indices as a contiguous int32 buffer and silently misreads strided ones.
    return torch.nonzero(mask[:, 0]).int().contiguous()


def dilate(mask: torch.Tensor) -> torch.Tensor:
    """3^ndim dilation of a bool mask (N, 1, *spatial): the pixels a 3^ndim conv reads."""
    pool = F.max_pool2d if mask.dim() == 4 else F.max_pool3d
    return pool(mask.to(torch.uint8 if mask.device.type == "cuda" else torch.float32), 3, 1, 1) > 0


def kernel_offsets(ndim: int, kernel_size: int = 3) -> torch.Tensor:
    """Offsets (K, ndim) int64 of a kernel_size^ndim kernel, in the order torch's weights use."""
    r = kernel_size // 2
    return torch.tensor(list(itertools.product(range(-r, r + 1), repeat=ndim)), dtype=torch.int64)


def neighbour_table(
    out_indices: torch.Tensor,
    spatial_shape: Sequence[int],
    lookup: torch.Tensor | None = None,
    kernel_size: int = 3,
) -> torch.Tensor:
    """For each chosen output pixel, the input row each kernel tap reads.

    Entry ``[i, k]`` is the row holding pixel ``out_indices[i] + offset_k``: the pixel's flat number in
    the full grid when ``lookup`` is None (the input is a whole map's rows), else ``lookup[flat]`` (an
    int64 map from flat pixel number to input row, -1 where there is none).

    Args:
        out_indices: output pixels (R, 1 + ndim).
        spatial_shape: the grid's spatial size.
        lookup: optional (N * prod(spatial),) int64 row map.
        kernel_size: odd kernel size.

    Returns:
        (R, K) int64 with K = kernel_size^ndim, offsets in the order of :func:`kernel_offsets`; -1 where
        the neighbour is outside the grid or missing (zero padding).
    """
    src, valid = _neighbours(out_indices, spatial_shape, kernel_size)
    if lookup is not None:
        src = lookup[src]
    return src.masked_fill_(~valid, -1)


def _neighbours(
    out_indices: torch.Tensor, spatial_shape: Sequence[int], kernel_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat pixel numbers (R, K) of each output's kernel taps, clamped into the grid, and (R, K) in-grid."""
    ndim = len(spatial_shape)
    offsets = kernel_offsets(ndim, kernel_size).to(out_indices.device)  # (K, ndim)
    coords = out_indices[:, None, 1:].long() + offsets[None]  # (R, K, ndim)
    size = torch.tensor(list(spatial_shape), device=out_indices.device)
    valid = ((coords >= 0) & (coords < size)).all(dim=-1)  # (R, K)
    src = out_indices[:, 0].long()[:, None].expand_as(valid)
    for d in range(ndim):
        src = src * spatial_shape[d] + coords[..., d].clamp(0, spatial_shape[d] - 1)
    return src, valid


def depthwise_conv_rows(
    rows: torch.Tensor,
    indices: torch.Tensor,
    spatial_shape: Sequence[int],
    weight: torch.Tensor,
) -> torch.Tensor:
    """Depthwise 3^ndim conv (zero padding 1) of a dense map, evaluated at ``indices`` only.

    Args:
        rows: the map's rows (N * prod(spatial), C) (see :func:`to_rows`).
        indices: output pixels (R, 1 + ndim).
        spatial_shape: the map's spatial size.
        weight: (C, 1, *kernel) as ``torch.nn.Conv2d(C, C, 3, groups=C)`` holds it.

    Returns:
        (R, C): the same values ``F.conv2d(x, weight, padding=1, groups=C)`` has at those pixels.
    """
    r, c = indices.shape[0], rows.shape[1]
    if r == 0:
        return rows.new_zeros(0, c)
    flat, valid = _neighbours(indices, spatial_shape, weight.shape[-1])  # (R, K) each
    w = weight.reshape(c, -1).t()  # (K, C)
    # One offset at a time: out += w_k * rows[neighbour_k]; a clamped out-of-grid neighbour is added,
    # then taken out again below (zero padding), so no (R, K, C) tensor is ever built.
    out = rows.new_zeros(r, c)
    for k in range(w.shape[0]):
        out.addcmul_(rows.index_select(0, flat[:, k]), w[k])
    outside = (~valid).nonzero()  # (M, 2): (row, offset) pairs that read padding
    if outside.shape[0]:
        row, k = outside[:, 0], outside[:, 1]
        out.index_add_(0, row, rows.index_select(0, flat[row, k]) * w.index_select(0, k), alpha=-1)
    return out


# Bytes of gathered input per GEMM in :func:`gather_conv`: large enough for MKL to run near its peak,
# small enough to stay out of fresh pages (one (R, K * C) buffer for a whole level is slower on CPU).
_GATHER_CHUNK_BYTES = 8 << 20


def _gather_chunks(table: torch.Tensor, row_bytes: int) -> list[tuple[int, int, torch.Tensor]]:
    """Row ranges ``[a, b)`` of a (R, K) neighbour table for one GEMM each, with the (row - a, tap) pairs
    of that range whose neighbour is missing (-1), (M, 2) int64."""
    step = max(1, _GATHER_CHUNK_BYTES // row_bytes)
    starts = list(range(0, table.shape[0], step))
    missing = (table < 0).nonzero()  # (M, 2), ordered by row
    bounds = torch.searchsorted(missing[:, 0], torch.tensor(starts + [table.shape[0]], device=table.device))
    bounds = bounds.tolist()
    out = []
    for i, a in enumerate(starts):
        pairs = missing[bounds[i]:bounds[i + 1]]
        out.append((a, min(a + step, table.shape[0]), pairs - pairs.new_tensor([a, 0])))
    return out


def _zero_pairs(cols: torch.Tensor, pairs: torch.Tensor, taps: int) -> torch.Tensor:
    """Zero the (row, tap) blocks ``pairs`` (M, 2) of columns (r, taps * C) in place."""
    if pairs.shape[0]:
        cols.view(cols.shape[0], taps, -1)[pairs[:, 0], pairs[:, 1]] = 0
    return cols


def _gather_columns(features: torch.Tensor, safe: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """(r, K * C) rows of neighbour features for a (r, K) table chunk, zeros at the missing ``pairs``."""
    r, k = safe.shape
    return _zero_pairs(features.index_select(0, safe.reshape(-1)).view(r, -1), pairs, k)


class _GatherConv(torch.autograd.Function):
    """Gather-GEMM conv on a neighbour table, chunked; the backward recomputes the gathered columns."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        c_out = weight.shape[0]
        w = weight.reshape(c_out, -1)  # (C_out, K * C_in): taps major, as the columns
        safe = table.clamp_min(0)
        chunks = _gather_chunks(table, w.shape[1] * features.element_size())
        out = features.new_empty(table.shape[0], c_out)
        for a, b, pairs in chunks:
            torch.mm(_gather_columns(features, safe[a:b], pairs), w.t(), out=out[a:b])
        ctx.save_for_backward(features, weight, safe)
        ctx.chunks = chunks
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        features, weight, safe = ctx.saved_tensors
        c_out, c_in, taps = weight.shape[0], features.shape[1], safe.shape[1]
        w = weight.reshape(c_out, -1)
        grad_out = grad_out.contiguous()
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = torch.zeros_like(features) if need_x else None
        grad_w = torch.zeros_like(w) if need_w else None
        for a, b, pairs in ctx.chunks:
            g = grad_out[a:b]
            if need_w:
                grad_w.addmm_(g.t(), _gather_columns(features, safe[a:b], pairs))
            if need_x:
                cols = _zero_pairs(g @ w, pairs, taps)
                grad_x.index_add_(0, safe[a:b].reshape(-1), cols.view(-1, c_in))
        return grad_x, None if grad_w is None else grad_w.view_as(weight), None


def gather_conv(features: torch.Tensor, weight: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Sparse conv at chosen output pixels: each output row is its neighbours' rows times the weight.

    Args:
        features: input rows (R_in, C_in).
        weight: (C_out, *kernel, C_in), spconv's layout (:class:`SubMConv` holds it so).
        table: (R_out, K) int64 from :func:`neighbour_table`, -1 for a missing neighbour.

    Returns:
        (R_out, C_out). The neighbour rows are gathered into columns (R_out, K * C_in) a chunk at a
        time and multiplied by the weight in one GEMM per chunk: on CPU this runs at about the dense
        conv's MACs per second, where spconv's Native per-offset gather-GEMM-scatter is a third slower.
        Differentiable in ``features`` and ``weight``.
    """
    if table.shape[0] == 0:
        return features.new_zeros(0, weight.shape[0])
    return _GatherConv.apply(features.contiguous(), weight, table)
