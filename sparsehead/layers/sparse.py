"""Sparse building blocks: row layout, spconv submanifold convs, gathered-neighbour convs, dilation.

Layout. A dense map (N, C, *spatial) and its "rows" (N * prod(spatial), C) are two views of one
channels-last tensor; the sparse mode keeps maps channels-last so that gathering the rows of active
pixels is an ``index_select`` on a view and scattering them back an ``index_add``. Active pixels are
given by ``indices`` (R, 1 + ndim) int (batch, then spatial coordinates), as in spconv, or by their
row numbers and sites on a :class:`Grid` (flat numbers in the zero-padded grid, where a neighbour is a
fixed offset).

Algorithms. spconv runs only ``ConvAlgo.Native`` on CPU; on CUDA its implicit-GEMM kernels
(``MaskImplicitGemm``) are faster. :class:`SubMConv` picks the algorithm from the device of each input.
Its weight is stored the spconv way, (C_out, *kernel, C_in); :meth:`SubMConv.dense_weight` gives the
torch layout for the dense mode.

spconv has no grouped convolution. :func:`depthwise_conv_rows` computes a depthwise 3^ndim conv at
chosen output pixels by gathering each output's neighbours from the rows of a dense map.

Exact output sets. A submanifold conv computes at every input pixel. When a conv's outputs are needed on
a smaller set than the pixels it reads (the depth path's first conv reads the 3×3 dilation of its
outputs), :meth:`Grid.table` lists, for each wanted output, the rows its kernel taps read, and
:func:`gather_conv` multiplies the gathered neighbours by the weight: no work on pixels whose result
would be thrown away. This is the depth path's CPU implementation: spconv's only CPU algorithm
(Native, a gather-GEMM-scatter per kernel offset) runs about a third slower than one GEMM over
gathered columns there.
"""
from __future__ import annotations

import functools
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
    "Grid",
    "grid_of",
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
    # CUDA max-pooling has no integer kernels; half is exact for 0/1 and moves half the bytes.
    return pool(mask.to(torch.float16 if mask.device.type == "cuda" else torch.float32), 3, 1, 1) > 0


def kernel_offsets(ndim: int, kernel_size: int = 3) -> torch.Tensor:
    """Offsets (K, ndim) int64 of a kernel_size^ndim kernel, in the order torch's weights use."""
    r = kernel_size // 2
    return torch.tensor(list(itertools.product(range(-r, r + 1), repeat=ndim)), dtype=torch.int64)


class Grid:
    """Row arithmetic for maps of one shape (N, C, *spatial), through the grid zero-padded by one pixel.

    A pixel's *site* is its flat number in the (N, *(spatial + 2)) grid that has one pixel of padding on
    every side. On that grid each 3^ndim neighbour is a fixed offset (``taps``) and a neighbour outside
    the map lands on padding, so a neighbour table is one add and one lookup. Sites are listed in
    row-major order, like :func:`mask_indices`.

    Args:
        batch: images ``N``.
        spatial_shape: the maps' spatial size.
        device: where the index tensors live.

    Use :func:`grid_of` to get a cached one.
    """

    def __init__(self, batch: int, spatial_shape: Sequence[int], device: torch.device | str) -> None:
        self.batch = batch
        self.shape = tuple(int(s) for s in spatial_shape)
        self.pixels = math.prod(self.shape)  # per image
        ndim = len(self.shape)
        padded = [s + 2 for s in self.shape]
        rows = torch.arange(batch * self.pixels, device=device).view(batch, *self.shape)
        self.row_of = F.pad(rows, (1, 1) * ndim, value=-1).reshape(-1)  # site -> row, -1 on padding
        strides = [math.prod(padded[d + 1:]) for d in range(ndim)]
        self.taps = (kernel_offsets(ndim) * torch.tensor(strides)).sum(dim=1).to(device)  # (K,)

    def sites(self, mask: torch.Tensor) -> torch.Tensor:
        """Sites (R,) int64 of the True pixels of ``mask`` (N, 1, *spatial)."""
        return F.pad(mask[:, 0], (1, 1) * len(self.shape)).reshape(-1).nonzero()[:, 0]

    def rows(self, sites: torch.Tensor) -> torch.Tensor:
        """Row numbers (R,) of ``sites`` in the rows of a map (see :func:`to_rows`)."""
        return self.row_of[sites]

    def images(self, rows: torch.Tensor) -> torch.Tensor:
        """The image (R,) int64 each row number belongs to."""
        return torch.div(rows, self.pixels, rounding_mode="floor")

    def lookup(self, sites: torch.Tensor) -> torch.Tensor:
        """A site → position-in-``sites`` map (N * prod(spatial + 2),) int64, -1 elsewhere: to read rows
        that hold only these pixels with :meth:`table`."""
        out = torch.full_like(self.row_of, -1)
        out[sites] = torch.arange(sites.shape[0], device=sites.device)
        return out

    def table(self, sites: torch.Tensor, lookup: torch.Tensor | None = None) -> torch.Tensor:
        """For each site, the input row each 3^ndim kernel tap reads: (R, K) int64, taps in the order of
        :func:`kernel_offsets`, -1 where the neighbour is outside the map or has no row.

        The input is a whole map's rows, or with ``lookup`` (from :meth:`lookup`) the rows of those
        pixels only.
        """
        neighbours = sites[:, None] + self.taps
        return (self.row_of if lookup is None else lookup)[neighbours]


@functools.lru_cache(maxsize=64)
def _cached_grid(batch: int, spatial_shape: tuple[int, ...], device: torch.device) -> Grid:
    return Grid(batch, spatial_shape, device)


def grid_of(x: torch.Tensor) -> Grid:
    """The (cached) :class:`Grid` of maps shaped like ``x`` (N, C, *spatial)."""
    return _cached_grid(x.shape[0], tuple(x.shape[2:]), x.device)


def depthwise_conv_rows(rows: torch.Tensor, table: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise 3^ndim conv (zero padding 1) of a map, evaluated at chosen pixels only.

    Args:
        rows: the map's rows (N * prod(spatial), C) (see :func:`to_rows`).
        table: (R, K) neighbour rows of the output pixels (:meth:`Grid.table`).
        weight: (C, 1, *kernel) as ``torch.nn.Conv2d(C, C, 3, groups=C)`` holds it.

    Returns:
        (R, C): the values ``F.conv2d(x, weight, padding=1, groups=C)`` has at those pixels. The
        neighbours are gathered tap-major, (K, R, C) a chunk of rows at a time, and summed tap by tap.
    """
    r, c = table.shape[0], rows.shape[1]
    if r == 0:
        return rows.new_zeros(0, c)
    k = table.shape[1]
    w = weight.reshape(c, k).t()  # (K, C)
    step = max(1, _GATHER_CHUNK_BYTES // (k * c * rows.element_size()))
    parts = []
    for a in range(0, r, step):
        taps = table[a:a + step].t()  # (K, r)
        cols = rows.index_select(0, taps.clamp_min(0).reshape(-1))  # (K * r, C)
        missing = (taps < 0).reshape(-1).nonzero()[:, 0]
        if missing.shape[0]:
            cols.index_fill_(0, missing, 0)
        cols = cols.view(k, -1, c)
        out = cols[0] * w[0]
        for t in range(1, k):
            out.addcmul_(cols[t], w[t])
        parts.append(out)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# Bytes of gathered input per GEMM in :func:`gather_conv`: large enough for MKL to run near its peak,
# small enough to stay out of fresh pages (one (R, K * C) buffer for a whole level is slower on CPU).
_GATHER_CHUNK_BYTES = 8 << 20


def _gather_chunks(table: torch.Tensor, row_bytes: int) -> list[tuple[int, int, torch.Tensor]]:
    """Row ranges ``[a, b)`` of a (R, K) neighbour table for one GEMM each, with the positions
    ``(row - a) * K + tap`` (M,) int64 of that range whose neighbour is missing (-1)."""
    r, k = table.shape
    step = max(1, _GATHER_CHUNK_BYTES // row_bytes)
    missing = (table < 0).reshape(-1).nonzero()[:, 0]
    if step >= r:
        return [(0, r, missing)]
    starts = list(range(0, r, step)) + [r]
    bounds = torch.searchsorted(missing, torch.tensor(starts, device=table.device) * k).tolist()
    return [
        (a, b, missing[bounds[i]:bounds[i + 1]] - a * k) for i, (a, b) in enumerate(zip(starts, starts[1:]))
    ]


def _zero_pairs(cols: torch.Tensor, missing: torch.Tensor, taps: int) -> torch.Tensor:
    """Zero the (row, tap) blocks at positions ``missing`` (M,) = row * taps + tap of columns
    (r, taps * C), in place."""
    if missing.shape[0]:
        cols.view(cols.shape[0] * taps, -1).index_fill_(0, missing, 0)
    return cols


def _gather_columns(features: torch.Tensor, safe: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
    """(r, K * C) rows of neighbour features for a (r, K) table chunk, zeros at the ``missing`` taps."""
    r, k = safe.shape
    return _zero_pairs(features.index_select(0, safe.reshape(-1)).view(r, -1), missing, k)


class _GatherConv(torch.autograd.Function):
    """Gather-GEMM conv on a neighbour table, chunked; the backward recomputes the gathered columns."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, weight: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        c_out = weight.shape[0]
        w = weight.reshape(c_out, -1)  # (C_out, K * C_in): taps major, as the columns
        safe = table.clamp_min(0)
        chunks = _gather_chunks(table, w.shape[1] * features.element_size())
        out = features.new_empty(table.shape[0], c_out)
        for a, b, missing in chunks:
            torch.mm(_gather_columns(features, safe[a:b], missing), w.t(), out=out[a:b])
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
        for a, b, missing in ctx.chunks:
            g = grad_out[a:b]
            if need_w:
                grad_w.addmm_(g.t(), _gather_columns(features, safe[a:b], missing))
            if need_x:
                cols = _zero_pairs(g @ w, missing, taps)
                grad_x.index_add_(0, safe[a:b].reshape(-1), cols.view(-1, c_in))
        return grad_x, None if grad_w is None else grad_w.view_as(weight), None


def gather_conv(features: torch.Tensor, weight: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Sparse conv at chosen output pixels: each output row is its neighbours' rows times the weight.

    Args:
        features: input rows (R_in, C_in).
        weight: (C_out, *kernel, C_in), spconv's layout (:class:`SubMConv` holds it so).
        table: (R_out, K) int64 from :meth:`Grid.table`, -1 for a missing neighbour.

    Returns:
        (R_out, C_out). The neighbour rows are gathered into columns (R_out, K * C_in) a chunk at a
        time and multiplied by the weight in one GEMM per chunk: on CPU this runs at about the dense
        conv's MACs per second, where spconv's Native per-offset gather-GEMM-scatter is a third slower.
        Differentiable in ``features`` and ``weight``.
    """
    if table.shape[0] == 0:
        return features.new_zeros(0, weight.shape[0])
    return _GatherConv.apply(features.contiguous(), weight, table)
