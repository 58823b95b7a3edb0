"""The ``conv`` workload's module: one C→C 3×3 conv on one map, dense or as the depth path's sparse conv."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from ..layers.sparse import SubMConv, flat_index, gather_conv, grid_of, mask_indices, to_rows

__all__ = ["ConvPair", "sparse_conv"]


def sparse_conv(conv: SubMConv, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``conv`` of the channels-last map ``x`` (N, C, H, W) at the pixels of ``mask`` (N, 1, H, W) bool,
    as the depth path runs it: rows (R, C) in row-major pixel order.

    On CPU a GEMM over gathered neighbour rows (:func:`gather_conv`, neighbour table included); on CUDA
    spconv ``SubMConv`` on the gathered rows (rulebook included).
    """
    import spconv.pytorch as spconv

    n, _, h, w = x.shape
    with record_function("sparsehead.gather"):
        if x.is_cuda:
            idx = mask_indices(mask)
            rows = to_rows(x).index_select(0, flat_index(idx, (h, w)))
            t = spconv.SparseConvTensor(rows, idx, [h, w], n)
        else:
            grid = grid_of(x)
            table = grid.table(grid.sites(mask))
    with record_function("sparsehead.depth_conv"):
        if x.is_cuda:
            return conv(t).features
        return gather_conv(to_rows(x), conv.weight, table)


class ConvPair(nn.Module):
    """One C→C 3×3 conv on one map: dense ``conv2d``, or :func:`sparse_conv` at the masked pixels.

    ``forward(x)`` with ``x`` (N, C, H, W) channels-last and ``self.mask`` (N, 1, H, W) bool; ``execution``
    ``dense``, ``sparse`` or ``auto`` (sparse when the mask's active fraction is at most
    ``auto_threshold``). The sparse output stays as rows.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = SubMConv(2, channels, channels, 3, indice_key=None)
        self.execution = "sparse"
        self.auto_threshold = 0.5
        self.mask: Optional[torch.Tensor] = None

    def macs(self) -> tuple[float, float]:
        """(realised, full) MACs of a forward with the current mask (sparse: the masked pixels only)."""
        assert self.mask is not None, "set a mask first"
        per_pixel = float(self.conv.macs_per_pixel())
        return float(self.mask.sum()) * per_pixel, self.mask.numel() * per_pixel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.mask is not None, "set a mask first"
        sparse = self.execution == "sparse" or (
            self.execution == "auto" and float(self.mask.float().mean()) <= self.auto_threshold
        )
        if not sparse:
            with record_function("sparsehead.depth_conv"):
                return F.conv2d(x, self.conv.dense_weight(), padding=1)
        return sparse_conv(self.conv, x, self.mask)
