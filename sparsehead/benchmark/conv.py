"""The ``conv`` workload's module: one C→C 3×3 conv on one map, dense or as the depth path's sparse conv."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from ..layers.sites import SiteRows
from ..layers.sparse import SparseConvWeight
from ..modeling.router import conv_rows, default_rulebook

__all__ = ["ConvPair", "sparse_conv"]


def sparse_conv(conv: SparseConvWeight, x: SiteRows, mask: torch.Tensor, rulebook: Optional[str] = None
                ) -> torch.Tensor:
    """``conv`` of the packed map ``x`` at the pixels of ``mask`` (N, 1, H, W) bool as the depth path runs
    it (:func:`~sparsehead.modeling.router.conv_rows`, the active rows' list included): rows (R, C) in
    row-major pixel order. ``rulebook``: None for the device's default."""
    with record_function("sparsehead.gather"):
        rows = mask.reshape(-1).nonzero()[:, 0]
    with record_function("sparsehead.depth_conv"):
        return conv_rows(conv, x, rows, rulebook or default_rulebook(x.buf.device, x.buf.dtype))


class ConvPair(nn.Module):
    """One C→C 3×3 conv on one map: dense ``conv2d``, or :func:`sparse_conv` at the masked pixels.

    ``forward(x)`` with ``x`` (N, C, H, W) and ``self.mask`` (N, 1, H, W) bool; ``execution`` ``dense``,
    ``sparse`` or ``auto`` (sparse when the mask's active fraction is at most ``auto_threshold``). The
    sparse mode reads the map packed once into rows (as a router's input is, outside the timed call) and
    its output stays as rows.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = SparseConvWeight(2, channels, channels, 3)
        self.execution = "sparse"
        self.auto_threshold = 0.5
        self.rulebook: Optional[str] = None
        self.mask: Optional[torch.Tensor] = None
        self._packed: Optional[tuple[torch.Tensor, SiteRows]] = None

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
        if self._packed is None or self._packed[0] is not x:
            self._packed = (x, SiteRows.from_maps([x]))
        return sparse_conv(self.conv, self._packed[1], self.mask, self.rulebook)
