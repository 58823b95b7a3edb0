"""Sparse convolution kernels on rows: gathered-neighbour GEMMs, depthwise convs, spconv submanifold convs.

Rows and tables. Features are rows (R, C) (see :mod:`sparsehead.layers.sites`); a conv evaluated at
chosen output rows reads, for each output and kernel tap, one input row given by a neighbour table
(M, K), K = 3^ndim taps in the order of torch's conv weights.

Kernels, one function each:

- :func:`gather_conv`: the conv as GEMMs over gathered neighbour rows; any device, any dtype, exact
  output set.
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
    "matmul_rows",
    "uses_onednn",
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

# Bytes of gathered columns per GEMM on CPU: large enough for the GEMM to run near its peak, small enough
# to be served from freed heap memory (a fresh buffer of tens of MB costs its page faults every call).
_CPU_CHUNK_BYTES = 8 << 20


def _chunks(rows: int, row_bytes: int, device: torch.device) -> list[tuple[int, int]]:
    """Row ranges ``[a, b)`` of one GEMM each: bounded by :data:`_CPU_CHUNK_BYTES` on CPU, one elsewhere."""
    step = max(1, _CPU_CHUNK_BYTES // row_bytes) if device.type == "cpu" else max(rows, 1)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _onednn_linear():
    """oneDNN's linear (the kernel inductor uses for linear layers on CPU), or None where torch lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


def _onednn_bf16() -> bool:
    """Whether oneDNN has a bfloat16 GEMM on this CPU (it needs AVX-512 or newer; on AVX2 it has none)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_LINEAR = _onednn_linear()
# Dtypes oneDNN's CPU GEMM takes on this CPU; others (float64, bfloat16 without a oneDNN kernel) use torch.mm.
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16) if _onednn_bf16() else (torch.float32,)


def uses_onednn(x: torch.Tensor) -> bool:
    """Whether the GEMMs over rows ``x`` (:func:`matmul_rows`, :func:`gather_conv`'s forward) run on oneDNN
    (eager, CPU, float32, or bfloat16 where oneDNN has a bfloat16 GEMM for the CPU,
    ``torch.backends.mkldnn.enabled``) rather than ``torch.mm`` (BLAS, or
    cuBLAS; under ``torch.compile`` the compiler picks the GEMM). oneDNN's GEMM is the one torch's CPU
    convolutions run on; BLAS is slower on some CPUs."""
    return (
        _ONEDNN_LINEAR is not None and x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES
        and torch.backends.mkldnn.enabled and not torch.compiler.is_compiling()
    )


def matmul_rows(rows: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``rows @ right`` for rows (M, K) and a matrix (K, N): (M, N). On oneDNN where :func:`uses_onednn`
    says so and no gradient is being recorded through it, else on ``torch.matmul``."""
    if uses_onednn(rows) and not (torch.is_grad_enabled() and (rows.requires_grad or right.requires_grad)):
        return _ONEDNN_LINEAR(rows, right.t().contiguous(), None, "none", [], "")  # takes the weight (N, K)
    return rows @ right


class _GatherConv(torch.autograd.Function):
    """Gather-GEMM conv over row chunks; the backward gathers the columns again."""

    @staticmethod
    def forward(ctx, features, weight, table):
        w = weight.reshape(weight.shape[0], -1)  # (C_out, K * C_in): taps major, as the columns
        m, k = table.shape
        chunks = _chunks(m, w.shape[1] * features.element_size(), features.device)
        ctx.save_for_backward(features, weight, table)
        onednn = uses_onednn(features)

        def cols(a: int, b: int) -> torch.Tensor:  # (b - a, K * C_in)
            return features.index_select(0, table[a:b].reshape(-1)).view(b - a, -1)

        if onednn and len(chunks) == 1:  # oneDNN's linear writes its own output
            return matmul_rows(cols(0, m), w.t())
        out = features.new_empty(m, w.shape[0])
        for a, b in chunks:
            if onednn:  # copied into the output chunk by chunk, one chunk's result at a time
                out[a:b] = matmul_rows(cols(a, b), w.t())
            else:
                torch.mm(cols(a, b), w.t(), out=out[a:b])
        return out

    @staticmethod
    def backward(ctx, grad_out):
        features, weight, table = ctx.saved_tensors
        c_in = features.shape[1]
        w = weight.reshape(weight.shape[0], -1)
        grad_out = grad_out.contiguous()
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = torch.zeros_like(features) if need_x else None
        grad_w = torch.zeros_like(w) if need_w else None
        for a, b in _chunks(table.shape[0], w.shape[1] * features.element_size(), features.device):
            g, index = grad_out[a:b], table[a:b].reshape(-1)
            if need_w:
                grad_w.addmm_(g.t(), features.index_select(0, index).view(b - a, -1))
            if need_x:
                grad_x.index_add_(0, index, (g @ w).view(-1, c_in))
        return grad_x, None if grad_w is None else grad_w.view_as(weight), None


def gather_conv(features: torch.Tensor, weight: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """A conv evaluated at chosen output rows: each output is its neighbours' rows times the weight.

    Args:
        features: input rows (R_in, C_in).
        weight: (C_out, *kernel, C_in), spconv's layout (3^ndim taps).
        table: (M, K) int64 input row of each output's kernel taps; a tap that reads zeros points at a zero
            row (as the last row of :class:`~sparsehead.layers.sites.SiteRows`).

    Returns:
        (M, C_out), differentiable in ``features`` and ``weight``. Each output row's K neighbour rows are
        gathered into one column row (K · C_in) and multiplied by the weight in one GEMM per chunk of rows
        (on CPU chunks of 8 MB of columns; elsewhere one). The forward GEMMs run on oneDNN where
        :func:`uses_onednn` says so, else on ``torch.mm``; the backward on ``torch.mm``.
    """
    if table.shape[0] == 0:
        return features.new_zeros(0, weight.shape[0])
    return _GatherConv.apply(features.contiguous(), weight, table.contiguous())


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
    # the taps' weights (K, C) contiguous: a broadcast over a transposed view runs at a fraction of the speed
    return (cols * weight.reshape(c, k).t().contiguous()).sum(dim=1)
