"""Synthetic gate patterns, imposed on a model's gates to measure or test it at a chosen sparsity.

``fixed_gates(model, pattern)`` installs forward hooks on every :class:`~sparsehead.SpatialGate` so that
its output becomes ``gate * pattern(shape)`` (a 0/1 mask): the paths then run exactly where the mask
is set, and gradients still reach the gate weights where it is.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.gates import SpatialGate
from ..layers.sites import SiteRows

__all__ = ["blob_mask", "random_mask", "fixed_gates"]

Pattern = Callable[[torch.Size], torch.Tensor]


def _threshold_top(score: torch.Tensor, density: float) -> torch.Tensor:
    """1 where ``score`` (N, 1, *spatial) is among the top ``density`` fraction of each image."""
    n = score.shape[0]
    flat = score.reshape(n, -1)
    k = int(round(density * flat.shape[1]))
    out = torch.zeros_like(flat)
    if k > 0:
        out.scatter_(1, flat.topk(k, dim=1).indices, 1.0)
    return out.view_as(score)


def blob_mask(shape: torch.Size, density: float, seed: int = 0, blob_size: int = 9) -> torch.Tensor:
    """Object-like blobs: smoothed noise thresholded so a ``density`` fraction of each image is 1.

    Args:
        shape: (N, G, *spatial); the same mask is used for all G groups.
        density: active fraction in [0, 1].
        seed: random seed.
        blob_size: smoothing kernel size in pixels (the blobs' scale).
    """
    gen = torch.Generator().manual_seed(seed)
    n, g, *spatial = shape
    noise = torch.randn(n, 1, *spatial, generator=gen)
    k = min(blob_size, *[s if s % 2 else s - 1 for s in spatial])
    if k > 1:
        pool = F.avg_pool2d if len(spatial) == 2 else F.avg_pool3d
        noise = pool(noise, k, stride=1, padding=k // 2, count_include_pad=False)
    return _threshold_top(noise, density).expand(n, g, *spatial).contiguous()


def random_mask(shape: torch.Size, density: float, seed: int = 0) -> torch.Tensor:
    """Uniformly random pixels (the worst case for sparse execution), ``density`` of each image."""
    gen = torch.Generator().manual_seed(seed)
    n, g, *spatial = shape
    return _threshold_top(torch.rand(n, 1, *spatial, generator=gen), density).expand(n, g, *spatial).contiguous()


@contextlib.contextmanager
def fixed_gates(model: nn.Module, pattern: Pattern, cache: bool = True) -> Iterator[None]:
    """Within the block, every gate of ``model`` is multiplied by ``pattern(gate_shape)``.

    ``gate_shape`` is the (N, G, *spatial) shape of one level's gate map. A gate evaluated on the packed rows
    of a pyramid (:class:`~sparsehead.layers.sites.SiteRows`, maps or voxels) gets the pattern of each
    level's dense shape, read at the level's rows: the same masks either way. With ``cache`` the mask for
    each (gate, shape) is computed once and reused across forwards (for maps; voxel index sets change).
    """
    masks: dict[tuple, torch.Tensor] = {}

    def make(x, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, SiteRows):
            return pattern(output.shape)
        lay = x.layout
        return lay.pack_levels([pattern(torch.Size((lay.batch, output.shape[1], *s))) for s in lay.shapes])

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        packed = isinstance(x, SiteRows)
        key = None
        if cache and (not packed or x.layout.grid):
            shapes = (x.layout.batch, x.layout.shapes, x.layout.rows) if packed else ()
            key = (id(module), output.shape, output.device, shapes)
        mask = masks.get(key) if key is not None else None
        if mask is None:
            mask = make(x, output).to(device=output.device, dtype=output.dtype)
            if key is not None:
                masks[key] = mask
        return output * mask

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, SpatialGate)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
