"""Sparse building blocks on spconv: row layout, submanifold convs, depthwise convs, dilation.

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
outputs), :func:`neighbour_rulebook` pairs the wanted outputs with the rows they read and
:func:`rulebook_conv` runs spconv's Native gather-GEMM-scatter on it: no work on pixels whose result
would be thrown away.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import spconv.pytorch as spconv
import torch
import torch.nn.functional as F
from spconv.core import ConvAlgo
from spconv.pytorch import functional as Fsp
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
    "neighbour_rulebook",
    "rulebook_conv",
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
    ndim = len(spatial_shape)
    r, c = indices.shape[0], rows.shape[1]
    if r == 0:
        return rows.new_zeros(0, c)
    offsets = kernel_offsets(ndim, weight.shape[-1]).to(indices.device)  # (K, ndim)
    coords = indices[:, None, 1:].long() + offsets[None]  # (R, K, ndim)
    size = torch.tensor(list(spatial_shape), device=indices.device)
    valid = ((coords >= 0) & (coords < size)).all(dim=-1)  # (R, K)
    flat = indices[:, 0].long()[:, None].expand_as(valid)
    for d in range(ndim):
        flat = flat * spatial_shape[d] + coords[..., d].clamp(0, spatial_shape[d] - 1)
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


def neighbour_rulebook(
    out_indices: torch.Tensor,
    spatial_shape: Sequence[int],
    lookup: torch.Tensor | None = None,
    kernel_size: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A gather-GEMM-scatter rulebook from chosen output pixels to the rows they read.

    For every kernel offset ``k`` it pairs each output row ``i`` (pixel ``out_indices[i]``) with the
    input row holding pixel ``out_indices[i] + offset_k``: the pixel's flat number in the full grid when
    ``lookup`` is None (the input is a whole map's rows), else ``lookup[flat]`` (an int64 map from flat
    pixel number to input row, -1 where there is none). Out-of-grid and missing neighbours are left out,
    which is zero padding.

    Returns:
        ``indice_pairs`` (2, K, R) int32 (input rows, output rows; the first ``indice_pair_num[k]`` of
        each offset valid) and ``indice_pair_num`` (K,) int32, in the layout spconv's Native
        ``indice_conv`` takes, with offsets ordered as the (C_out, *kernel, C_in) weight.
    """
    ndim = len(spatial_shape)
    r = out_indices.shape[0]
    offsets = kernel_offsets(ndim, kernel_size).to(out_indices.device)  # (K, ndim)
    coords = out_indices[:, None, 1:].long() + offsets[None]  # (R, K, ndim)
    size = torch.tensor(list(spatial_shape), device=out_indices.device)
    valid = ((coords >= 0) & (coords < size)).all(dim=-1)  # (R, K)
    src = out_indices[:, 0].long()[:, None].expand_as(valid)
    for d in range(ndim):
        src = src * spatial_shape[d] + coords[..., d].clamp(0, spatial_shape[d] - 1)
    if lookup is not None:
        src = lookup[src]
        valid &= src >= 0
    # Compact each offset's valid pairs to the front, keeping output order.
    order = torch.argsort((~valid).to(torch.int8), dim=0, stable=True)  # (R, K)
    dst = torch.arange(r, device=out_indices.device)[:, None].expand_as(valid)
    keep = valid.gather(0, order)
    pairs = torch.stack([src.gather(0, order), dst.gather(0, order)])  # (2, R, K)
    pairs = torch.where(keep, pairs, torch.full_like(pairs, -1)).transpose(1, 2).int().contiguous()
    return pairs, valid.sum(dim=0).int().cpu()


def rulebook_conv(
    features: torch.Tensor,
    weight: torch.Tensor,
    rulebook: tuple[torch.Tensor, torch.Tensor],
    num_out: int,
) -> torch.Tensor:
    """Sparse conv of ``features`` (R_in, C_in) by a :func:`neighbour_rulebook`, (R_out, C_out) out.

    Runs spconv's Native gather-GEMM-scatter (with its backward) on ``weight`` (C_out, *kernel, C_in).
    """
    pairs, num = rulebook
    if num_out == 0:
        return features.new_zeros(0, weight.shape[0])
    return Fsp.indice_conv(features.contiguous(), weight, pairs, num, num_out, ConvAlgo.Native)
