"""Sparse in, sparse out: a :class:`~sparsehead.DynamicTower` applied to spconv tensors (voxels) without
densifying.

``forward_sparse(tower, x)`` takes one ``spconv.SparseConvTensor`` (a single level) or a list of them (a
pyramid, finest first, each spatial shape half the previous one, rounded up) and returns the same kind, on
the same index sets, with new features. This module only checks and converts: the routers run on the
voxels' :class:`~sparsehead.layers.sites.SiteRows` (:func:`~sparsehead.layers.sites.index_layout`), the
same engine as for maps.

Semantics. Level ``l`` with index set ``I_l`` (its active voxels) is read as a volume that is zero outside
``I_l``, and every path runs only on ``I_l`` (submanifold):

- Gates are computed at ``I_l`` by the gate conv reading zeros outside ``I_l``. A coarse gate averages the
  logits over the voxels of each image and level. Gates are zero outside ``I_l``.
- Scale units: ``A = {v in I_src : gate(v) > 0}``; the depthwise conv runs at ``A`` reading ``I_src``,
  GroupNorm statistics over ``A``, times the gate, resampled (:mod:`sparsehead.layers.resample`); only
  contributions that land on ``I_dst`` are kept.
- Node sum ``s = output_weight · x + scale_weight · Σ contributions`` on ``I_l``.
- Depth path: ``D = {v in I_l : g_d(v) > 0}``; conv1 runs at ``O = I_l ∩ dilate(D)`` and conv2 at ``D``,
  each reading zeros outside ``I_l`` (conv2 also zeros outside ``O``); GroupNorm statistics over the voxels
  each conv runs at; ``out = relu(s + g_d · h2)`` on ``I_l``.

With ``I_l`` the full grid at every level this is exactly the tower on dense volumes.

Cost (``router.last_cost``, per image): as for maps (:mod:`sparsehead.modeling.cost`) with pixels replaced
by the voxels of ``I_l``: full = voxels × unit cost (not the dense volume). With ``router.keep_gates`` the
gates are kept as rows: ``last_gates = {"down"|"up": {source_level: (R_l, G)}, "depth": {level: (R_l, G)}}``.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch

from ..layers.resample import half_size
from ..layers.sites import SiteRows, index_layout
from ..layers.sparse import flat_index
from .router import autocast_enabled

if TYPE_CHECKING:
    from .tower import DynamicTower

__all__ = ["forward_sparse", "check_sparse_input", "is_sparse_tensor"]


def _sparse_tensor_type():
    """spconv's SparseConvTensor class if spconv has been imported (a user holding one has imported it)."""
    module = sys.modules.get("spconv.pytorch")
    return getattr(module, "SparseConvTensor", None)


def is_sparse_tensor(features: Any) -> bool:
    """Whether ``features`` is a spconv ``SparseConvTensor`` or a non-empty list of them."""
    cls = _sparse_tensor_type()
    if cls is None:
        return False
    first = features[0] if isinstance(features, (list, tuple)) and features else features
    return isinstance(first, cls)


# ----------------------------------------------------------------------------------------------- checks


def _check_level(x: Any, tower: DynamicTower, name: str) -> None:
    if not isinstance(x, _sparse_tensor_type()):
        raise TypeError(f"{name} must be a spconv SparseConvTensor, got {type(x).__name__}")
    shape = [int(s) for s in x.spatial_shape]
    if len(shape) != tower.ndim:
        raise ValueError(
            f"{name} has {len(shape)} spatial dims (spatial_shape {shape}), the tower expects {tower.ndim}"
        )
    if any(s < 1 for s in shape):
        raise ValueError(f"{name} has a non-positive spatial_shape {shape}")
    f, idx = x.features, x.indices
    if not f.is_floating_point() or f.dim() != 2:
        raise ValueError(f"{name}.features must be floating point (R, C), got {f.dtype} {tuple(f.shape)}")
    if f.shape[1] != tower.channels:
        raise ValueError(f"{name} has {f.shape[1]} channels, the tower expects {tower.channels}")
    if idx.dim() != 2 or idx.shape[1] != tower.ndim + 1 or idx.shape[0] != f.shape[0]:
        raise ValueError(
            f"{name}.indices must be ({f.shape[0]}, {tower.ndim + 1}) (batch, *coords), got {tuple(idx.shape)}"
        )
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"{name}.indices must be integers, got {idx.dtype}")
    if idx.shape[0] == 0:
        return
    lo = idx.min(dim=0).values
    hi = idx.max(dim=0).values
    if bool((lo < 0).any()):
        raise ValueError(f"{name}.indices has negative entries (column minima {lo.tolist()})")
    for d, s in enumerate(shape):
        if int(hi[d + 1]) >= s:
            raise ValueError(
                f"{name}.indices lie outside spatial_shape {shape}: coordinate {d} reaches {int(hi[d + 1])}"
            )
    if x.batch_size < int(hi[0]) + 1:
        raise ValueError(f"{name}.batch_size is {x.batch_size} but its largest batch index is {int(hi[0])}")
    keys = flat_index(idx, shape)
    if torch.unique(keys).numel() != keys.numel():
        raise ValueError(f"{name}.indices has duplicate voxels ({keys.numel() - torch.unique(keys).numel()} repeats)")


def check_sparse_input(tower: DynamicTower, features: Any) -> list:
    """Validate ``features`` for ``tower`` and return them as a list of levels.

    Raises:
        TypeError: not a SparseConvTensor or a list of them.
        ValueError: naming the problem: spatial dims or channels that do not match the tower, indices
            outside the spatial shape or repeated, a batch size too small for the batch indices, a
            wrong number of levels, shapes that do not halve, or levels that disagree.
    """
    if isinstance(features, _sparse_tensor_type()):
        if tower.num_levels not in (None, 1):
            raise ValueError(
                f"a single SparseConvTensor is one level, the tower expects {tower.num_levels}: pass a list"
            )
        levels = [features]
    elif isinstance(features, (list, tuple)) and features:
        levels = list(features)
        tower.check_levels(len(levels))
    else:
        raise TypeError(f"features must be a SparseConvTensor or a list of them, got {type(features).__name__}")
    for i, x in enumerate(levels):
        _check_level(x, tower, f"features[{i}]")
    first = levels[0]
    param = next(tower.parameters())
    if first.features.dtype != param.dtype and not autocast_enabled(first.features.device.type):
        raise ValueError(f"features are {first.features.dtype} but the tower's weights are {param.dtype}")
    for i, x in enumerate(levels[1:], 1):
        if x.batch_size != first.batch_size:
            raise ValueError(f"features[{i}] has batch_size {x.batch_size}, features[0] has {first.batch_size}")
        if x.features.dtype != first.features.dtype or x.features.device != first.features.device:
            raise ValueError(
                f"features[{i}] is {x.features.dtype} on {x.features.device}, "
                f"features[0] is {first.features.dtype} on {first.features.device}"
            )
        expected = half_size([int(s) for s in levels[i - 1].spatial_shape])
        if [int(s) for s in x.spatial_shape] != expected:
            raise ValueError(
                f"features[{i}] must be half the size of features[{i - 1}] (rounded up): expected spatial_shape "
                f"{expected}, got {list(x.spatial_shape)}"
            )
    return levels


# ----------------------------------------------------------------------------------------------- public


def forward_sparse(tower: DynamicTower, features):
    """Run every router of ``tower`` on the voxels of ``features``; see the module docstring.

    Args:
        tower: a DynamicTower built with the input's ``ndim`` and channels (and ``num_levels``, when set).
        features: a SparseConvTensor (one level) or a list of them, finest first, each with indices
            (R_l, 1 + ndim) and features (R_l, C).

    Returns:
        The same kind as ``features``: SparseConvTensors with the input's indices, spatial shapes and
        batch size, and features (R_l, C). Each router's ``last_cost`` is set.
    """
    levels = check_sparse_input(tower, features)
    layout = index_layout([x.indices for x in levels], [x.spatial_shape for x in levels], int(levels[0].batch_size),
                          tower.resample)
    rows = torch.cat([x.features for x in levels] + [levels[0].features.new_zeros(1, tower.channels)])
    out = tower.run(SiteRows(rows, layout)).buf
    result = [x.replace_feature(out[a:b]) for x, a, b in zip(levels, layout.offsets, layout.offsets[1:])]
    return result[0] if not isinstance(features, (list, tuple)) else result
