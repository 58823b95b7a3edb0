"""Sparse convolution kernels on rows: gathered-neighbour GEMMs, depthwise convs, spconv submanifold convs.

Rows and tables. Features are rows (R, C) (see :mod:`sparsehead.layers.sites`); a conv evaluated at
chosen output rows reads, for each output and kernel tap, one input row given by a neighbour table
(M, K), K = 3^ndim taps in the order of torch's conv weights.

Kernels, one function each:

- :func:`gather_conv`: the conv as GEMMs over gathered neighbour rows (the taps of one kernel row at a
  time, so the op count does not depend on the sizes); any device, any dtype, exact output set.
- :func:`depthwise_rows`: a depthwise conv at chosen rows (spconv has no grouped conv).
- :class:`SparseConvWeight` holds a conv weight the spconv way, (C_out, *kernel, C_in), and runs it as
  spconv's submanifold conv (implicit GEMM on CUDA; Native on CPU) on a ``SparseConvTensor``; spconv is
  imported only then.

Also the dense-map helpers :func:`to_rows`, :func:`from_rows`, :func:`channels_last`, :func:`dilate`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.optional import import_spconv

__all__ = [
    "SparseConvWeight",
    "conv_algo",
    "gather_conv",
    "depthwise_rows",
    "to_rows",
    "from_rows",
    "channels_last",
    "flat_index",
    "mask_indices",
    "dilate",
]


def conv_algo(device: torch.device):
    """spconv algorithm for tensors on ``device``: Native on CPU, MaskImplicitGemm on CUDA."""
    import_spconv()
    from spconv.core import ConvAlgo

    return ConvAlgo.MaskImplicitGemm if device.type == "cuda" else ConvAlgo.Native


class SparseConvWeight(nn.Module):
    """A bias-free ``kernel_size``^ndim conv weight in spconv's layout (C_out, *kernel, C_in).

    The dense mode runs it with torch's conv (:meth:`dense_weight`), :func:`gather_conv` reads it as is,
    and :meth:`submanifold` runs it as spconv's submanifold conv, the algorithm chosen per input device.

    Args:
        ndim: spatial dimensions.
        in_channels, out_channels: channels.
        kernel_size: odd kernel size.
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.ndim = ndim
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kernel_size,) * ndim
        self.weight = nn.Parameter(torch.empty(out_channels, *self.kernel_size, in_channels))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self._spconv: dict[str, nn.Module] = {}

    def dense_weight(self) -> torch.Tensor:
        """The weight in torch's (C_out, C_in, *kernel) layout (a differentiable view)."""
        return self.weight.movedim(-1, 1)

    def macs_per_pixel(self) -> int:
        return self.in_channels * self.out_channels * math.prod(self.kernel_size)

    def submanifold(self, x, indice_key: str):
        """spconv's submanifold conv of ``x`` (a ``SparseConvTensor``) with this weight; convs with the same
        ``indice_key`` on the same index set share the rulebook ``x`` carries."""
        conv = self._spconv.get(indice_key)
        if conv is None:
            spconv = import_spconv()
            # Bias stays off: spconv's CPU path rejects bias under no_grad, and a norm follows anyway.
            conv = spconv.SubMConv2d if self.ndim == 2 else spconv.SubMConv3d
            conv = conv(self.in_channels, self.out_channels, self.kernel_size, padding=self.kernel_size[0] // 2,
                        bias=False, indice_key=indice_key)
            self._spconv[indice_key] = conv
        del conv.weight
        conv.weight = self.weight  # the one parameter; spconv reads it as (C_out, *kernel, C_in)
        conv.algo = conv_algo(x.features.device)
        return conv(x)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"


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


# ------------------------------------------------------------------------------------------ gather conv


def _slabs(table: torch.Tensor) -> torch.Tensor:
    """(M, K) → (3, M * K / 3): the taps of each row of the kernel, row-major, one slab per kernel row."""
    m, k = table.shape
    return table.view(m, 3, k // 3).transpose(0, 1).reshape(3, -1)


def _slab_columns(features: torch.Tensor, slab: torch.Tensor, rows: int, missing: bool) -> torch.Tensor:
    """Gathered input rows (M, K / 3 * C) of one slab; zeros at -1 entries when ``missing``."""
    cols = features.index_select(0, slab.clamp_min(0) if missing else slab)
    if missing:
        cols.masked_fill_((slab < 0)[:, None], 0)
    return cols.view(rows, -1)


class _GatherConv(torch.autograd.Function):
    """Gather-GEMM conv, one GEMM per kernel row; the backward gathers the columns again."""

    @staticmethod
    def forward(ctx, features, weight, table, missing):
        c_out, m = weight.shape[0], table.shape[0]
        w = weight.reshape(c_out, 3, -1)  # (C_out, 3, K / 3 * C_in): taps of one kernel row each
        slabs = _slabs(table)
        out = torch.mm(_slab_columns(features, slabs[0], m, missing), w[:, 0].t())
        for i in (1, 2):
            out.addmm_(_slab_columns(features, slabs[i], m, missing), w[:, i].t())
        ctx.save_for_backward(features, weight, slabs)
        ctx.missing = missing
        return out

    @staticmethod
    def backward(ctx, grad_out):
        features, weight, slabs = ctx.saved_tensors
        c_out, c_in, m = weight.shape[0], features.shape[1], grad_out.shape[0]
        w = weight.reshape(c_out, 3, -1)
        grad_out = grad_out.contiguous()
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = torch.zeros_like(features) if need_x else None
        grad_w = []
        for i in range(3):
            if need_w:
                grad_w.append(grad_out.t() @ _slab_columns(features, slabs[i], m, ctx.missing))
            if need_x:
                cols = (grad_out @ w[:, i]).view(-1, c_in)
                index = slabs[i]
                if ctx.missing:
                    cols.masked_fill_((index < 0)[:, None], 0)
                    index = index.clamp_min(0)
                grad_x.index_add_(0, index, cols)
        grad_w = torch.stack(grad_w, dim=1) if need_w else None
        return grad_x, None if grad_w is None else grad_w.view_as(weight), None, None


def gather_conv(features: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, missing: bool = False
                ) -> torch.Tensor:
    """A conv evaluated at chosen output rows: each output is its neighbours' rows times the weight.

    Args:
        features: input rows (R_in, C_in).
        weight: (C_out, *kernel, C_in), spconv's layout (3^ndim taps).
        table: (M, K) int64 input row of each output's kernel taps.
        missing: the table holds -1 for taps that read zeros (otherwise every entry is a valid row, such as
            the zero row of :class:`~sparsehead.layers.sites.SiteRows`).

    Returns:
        (M, C_out), differentiable in ``features`` and ``weight``. The taps of one kernel row are gathered
        into columns (M, K / 3 * C_in) and multiplied by the weight in one GEMM: three GEMMs per call.
    """
    if table.shape[0] == 0:
        return features.new_zeros(0, weight.shape[0])
    return _GatherConv.apply(features.contiguous(), weight, table, missing)


def depthwise_rows(features: torch.Tensor, weight: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """A depthwise 3^ndim conv at chosen output rows.

    Args:
        features: input rows (R_in, C); ``table`` entries are valid rows (missing neighbours point at a
            zero row).
        weight: (C, 1, *kernel) as ``torch.nn.Conv2d(C, C, 3, groups=C)`` holds it.
        table: (M, K) neighbour rows of the outputs.

    Returns:
        (M, C): ``sum_t features[table[:, t]] * weight[:, 0, t]``, the grouped conv's values at those rows.
    """
    m, k = table.shape
    c = features.shape[1]
    cols = features.index_select(0, table.reshape(-1)).view(m, k, c)
    return (cols * weight.reshape(c, k).t()).sum(dim=1)
