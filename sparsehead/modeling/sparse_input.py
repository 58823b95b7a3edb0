"""Sparse in, sparse out: a :class:`DynamicTower` applied to spconv tensors (voxels) without densifying.

``forward_sparse(tower, x)`` takes one ``spconv.SparseConvTensor`` (a single level, ``num_levels = 1``) or a
list of them (a pyramid, finest first, each spatial shape half the previous one, rounded up) and returns
the same kind, on the same index sets, with new features.

Semantics. Level ``l`` with index set ``I_l`` (its active voxels) is read as a volume that is zero outside
``I_l``, and every path runs only on ``I_l`` (submanifold):

- Gates are computed at ``I_l`` by the gate conv used as a submanifold 3^ndim conv on ``I_l`` (it reads
  zeros outside ``I_l``), bias added, then the gate activation. A coarse gate averages the logits over the
  voxels of each image. Gates are zero outside ``I_l``.
- Scale units: ``A = {v in I_src : gate(v) > 0}``; the depthwise conv runs at ``A`` reading ``I_src``,
  GroupNorm statistics over ``A``, times the gate. Downsampling sends a voxel's row to its parent
  ``coords // 2`` divided by ``2^ndim`` (summed per coarse voxel); upsampling copies a coarse row to its
  ``2^ndim`` children within the finer shape. Only contributions that land on ``I_dst`` are kept.
- Node sum ``s = output_weight · x + scale_weight · Σ contributions`` on ``I_l``.
- Depth path: ``D = {v in I_l : g_d(v) > 0}``; conv1 runs at ``O = I_l ∩ dilate(D)`` (the voxels of
  ``I_l`` within the 3^ndim neighbourhood of ``D``) and conv2 at ``D``, each reading zeros outside
  ``I_l`` (conv2 also zeros outside ``O``); GroupNorm statistics over the voxels each conv runs at;
  ``out = relu(s + g_d · h2)`` on ``I_l``.

With ``I_l`` the full grid at every level this is exactly the dense-input tower on that volume.

Cost (``router.last_cost``, per image): as for maps (:mod:`sparsehead.modeling.cost`) with pixels replaced
by the voxels of ``I_l``: full = voxels × unit cost (not the dense volume), realised = active voxels ×
unit cost, soft = Σ gate × unit cost (conv1 with the gate max-pooled over the neighbours in ``I_l``).

Execution (``router.execution``):

- ``sparse`` (and ``auto``): rows only. Neighbours are found with a sort-based lookup of each level's
  index set (one table per level and forward, shared by all routers); the gate and depthwise convs are
  gathers and matrix products per kernel offset; the depth path runs as spconv submanifold convs on
  ``I_l ∩ dilate(O)``, which holds every voxel conv1 reads.
- ``dense``: the reference. It scatters each level into a dense volume (zeros outside ``I_l``), runs
  torch's dense convs with masks of ``I_l``, and gathers the result back at ``I_l``.

Both compute the same function, forward and backward, up to float rounding. With ``router.keep_gates``
the gates are kept as rows: ``last_gates = {"down"|"up": {source_level: (R, G)}, "depth": {level: (R, G)}}``.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import spconv.pytorch as spconv
import torch
import torch.nn.functional as F

from ..layers.gates import SpatialGate, expand_gate, gate_mask, pool_gate
from ..layers.resample import downsample, half_size, upsample
from ..layers.sparse import depthwise_conv_rows, dilate, flat_index, gather_conv, kernel_offsets
from .cost import Cost
from .router import Router, autocast_enabled
from .tower import DynamicTower

__all__ = ["forward_sparse", "check_sparse_input"]

SparseInput = Union[spconv.SparseConvTensor, Sequence[spconv.SparseConvTensor]]


# ----------------------------------------------------------------------------------------------- checks


def _check_level(x: spconv.SparseConvTensor, tower: DynamicTower, name: str) -> None:
    if not isinstance(x, spconv.SparseConvTensor):
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


def check_sparse_input(tower: DynamicTower, features: SparseInput) -> list[spconv.SparseConvTensor]:
    """Validate ``features`` for ``tower`` and return them as a list of levels.

    Raises:
        TypeError: not a SparseConvTensor or a list of them.
        ValueError: naming the problem: spatial dims or channels that do not match the tower, indices
            outside the spatial shape or repeated, a batch size too small for the batch indices, a
            wrong number of levels, shapes that do not halve, or levels that disagree.
    """
    if isinstance(features, spconv.SparseConvTensor):
        if tower.num_levels != 1:
            raise ValueError(
                f"a single SparseConvTensor is one level, the tower expects {tower.num_levels}: pass a list"
            )
        levels = [features]
    elif isinstance(features, (list, tuple)):
        levels = list(features)
        if len(levels) != tower.num_levels:
            raise ValueError(f"features must have {tower.num_levels} levels, got {len(levels)}")
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


# ----------------------------------------------------------------------------------------------- lookup


class _Level:
    """One level's index set with its lookup tables (built once per forward, shared by all routers)."""

    def __init__(self, x: spconv.SparseConvTensor) -> None:
        self.x = x
        self.indices = x.indices
        self.shape = [int(s) for s in x.spatial_shape]
        self.n = int(x.batch_size)
        self.rows = x.indices.shape[0]
        self.batch = x.indices[:, 0].long()
        keys = flat_index(x.indices, self.shape)
        self.sorted_keys, self.order = torch.sort(keys)
        self.voxels = torch.bincount(self.batch, minlength=self.n).float()  # (N,)
        self._nbr: torch.Tensor | None = None

    def lookup(self, coords: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Row (..) int64 of the voxels at ``coords`` (.., ndim) of image ``batch`` (..); -1 when absent."""
        size = torch.tensor(self.shape, device=coords.device)
        inside = ((coords >= 0) & (coords < size)).all(dim=-1)
        flat = batch.clone()
        for d, s in enumerate(self.shape):
            flat = flat * s + coords[..., d].clamp(0, s - 1)
        if self.rows == 0:
            return torch.full_like(flat, -1)
        pos = torch.searchsorted(self.sorted_keys, flat).clamp_max(self.rows - 1)
        found = inside & (self.sorted_keys[pos] == flat)
        return torch.where(found, self.order[pos], torch.full_like(pos, -1))

    @property
    def neighbours(self) -> torch.Tensor:
        """(R, 3^ndim) rows of each voxel's neighbours in kernel order (torch's weight order); -1 if absent."""
        if self._nbr is None:
            off = kernel_offsets(len(self.shape)).to(self.indices.device)  # (K, ndim)
            coords = self.indices[:, None, 1:].long() + off[None]
            self._nbr = self.lookup(coords, self.batch[:, None].expand(-1, off.shape[0]))
        return self._nbr

    def parents_in(self, coarse: _Level) -> torch.Tensor:
        """(R,) row of each voxel's parent ``coords // 2`` in the coarser level; -1 if absent."""
        coords = torch.div(self.indices[:, 1:].long(), 2, rounding_mode="floor")
        return coarse.lookup(coords, self.batch)

    def volume(self, rows: torch.Tensor) -> torch.Tensor:
        """Scatter rows (R, C) into a dense (N, C, *shape) volume, zeros elsewhere."""
        out = rows.new_zeros(self.n * math.prod(self.shape), rows.shape[1])
        out = out.index_copy(0, flat_index(self.indices, self.shape), rows)
        return out.view(self.n, *self.shape, rows.shape[1]).movedim(-1, 1)

    def gather(self, vol: torch.Tensor) -> torch.Tensor:
        """Rows (R, C) of a dense (N, C, *shape) volume at the level's voxels."""
        rows = vol.movedim(1, -1).reshape(-1, vol.shape[1])
        return rows.index_select(0, flat_index(self.indices, self.shape))

    def mask(self, device: torch.device) -> torch.Tensor:
        """The index set as a (N, 1, *shape) bool volume."""
        m = torch.zeros(self.n * math.prod(self.shape), dtype=torch.bool, device=device)
        m[flat_index(self.indices, self.shape)] = True
        return m.view(self.n, 1, *self.shape)


def _per_image(values: torch.Tensor, batch: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of ``values`` (R,) per image, (N,) float32."""
    return torch.zeros(n, device=values.device).index_add(0, batch, values.float())


def _pad(rows: torch.Tensor) -> torch.Tensor:
    """Rows (R, C) with one zero row appended, so that a -1 neighbour reads zeros."""
    return torch.cat([rows, rows.new_zeros(1, rows.shape[1])])


# ------------------------------------------------------------------------------------------ sparse rows


def _gate_rows(gate: SpatialGate | None, rows: torch.Tensor, lvl: _Level) -> torch.Tensor:
    """Gate (R, G) at every voxel: the gate conv as a submanifold conv on the level's index set."""
    if gate is None:
        return rows.new_ones(rows.shape[0], 1)
    # The torch weight (G, C, *kernel) in the (G, *kernel, C) layout gather_conv reads.
    logits = gather_conv(rows, gate.conv.weight.movedim(1, -1), lvl.neighbours) + gate.conv.bias
    if gate.coarse:
        mean = rows.new_zeros(lvl.n, logits.shape[1]).index_add(0, lvl.batch, logits)
        logits = (mean / lvl.voxels.clamp_min(1.0).to(rows.dtype)[:, None])[lvl.batch]
    return gate.activation(logits)


def _dilate_rows(mask: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """(R,) bool: voxels with a voxel of ``mask`` (R,) bool among their neighbours ``nbr`` (R, K)."""
    padded = torch.cat([mask, mask.new_zeros(1)])
    return padded[nbr.where(nbr >= 0, mask.shape[0])].any(dim=1)


def _pool_rows(g: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """Max of gates (R, G) over each voxel's neighbours in the index set (zeros elsewhere)."""
    padded = _pad(g)
    return padded[nbr.where(nbr >= 0, g.shape[0])].amax(dim=1)


def _path_cost(gates: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], costs: Sequence[int], lvl: _Level) -> Cost:
    soft = realized = torch.zeros(lvl.n, device=lvl.indices.device)
    for g, m, c in zip(gates, masks, costs):
        soft = soft + _per_image(g.mean(dim=1), lvl.batch, lvl.n) * c
        realized = realized + _per_image(m, lvl.batch, lvl.n) * c
    full = lvl.voxels.to(soft.device) * float(sum(costs))
    return Cost(soft, realized, full)


def _gate_cost(gates: Sequence[SpatialGate | None], lvl: _Level) -> Cost:
    full = lvl.voxels * float(sum(g.macs_per_pixel() for g in gates if g is not None))
    return Cost(full, full.clone(), full.clone())


def _depth_rows(router: Router, s: torch.Tensor, g: torch.Tensor, inner: torch.Tensor, outer: torch.Tensor,
                lvl: _Level) -> torch.Tensor:
    """Depth path output (R, C) on the index set; convs as spconv submanifold convs on I ∩ dilate(O)."""
    depth = router.depth
    c = s.shape[1]
    keep = _dilate_rows(outer, lvl.neighbours).nonzero()[:, 0]
    if keep.numel() == 0:
        return F.relu(s)
    idx = lvl.indices.index_select(0, keep).contiguous()
    batch = lvl.batch.index_select(0, keep)
    in_outer = outer.index_select(0, keep)
    in_inner = inner.index_select(0, keep)
    x = spconv.SparseConvTensor(s.index_select(0, keep), idx, lvl.shape, lvl.n)
    h = depth.conv1(x)  # submanifold: rows stay aligned with idx
    h1 = F.relu(depth.norm1.forward_rows(h.features, batch, lvl.n, in_outer)) * in_outer[:, None]
    h = depth.conv2(h.replace_feature(h1))  # same indice_key: the rulebook is reused
    h2 = depth.norm2.forward_rows(h.features, batch, lvl.n, in_inner)
    sel = in_inner.nonzero()[:, 0]
    rows = keep.index_select(0, sel)
    add = h2.index_select(0, sel) * expand_gate(g.index_select(0, rows), c)
    return F.relu(s.index_add(0, rows, add))


def _router_sparse(router: Router, feats: list[torch.Tensor], levels: list[_Level],
                   parents: list[torch.Tensor]) -> tuple[list[torch.Tensor], Cost, dict]:
    num = len(feats)
    n = levels[0].n
    cost = Cost.zeros(n, feats[0].device)
    kept: dict[str, dict[int, torch.Tensor]] = {"down": {}, "up": {}, "depth": {}}
    sums = [router.output_weight * x for x in feats]
    for src, (x, lvl) in enumerate(zip(feats, levels)):
        for unit, dst in ((router.down, src + 1), (router.up, src - 1)):
            if not 0 <= dst < num:
                continue
            g = _gate_rows(unit.gate, x, lvl)
            mask = gate_mask(g)[:, 0]
            if router.keep_gates:
                kept["down" if unit is router.down else "up"][src] = g.detach()
            cost = cost + _path_cost([g], [mask], [unit.macs_per_pixel()], lvl) + _gate_cost([unit.gate], lvl)
            act = mask.nonzero()[:, 0]
            if act.numel() == 0:
                continue
            y = depthwise_conv_rows(x, lvl.neighbours.index_select(0, act), unit.conv.weight)
            y = unit.norm.forward_rows(y, lvl.batch.index_select(0, act), n)
            u = y * expand_gate(g.index_select(0, act), x.shape[1]) * router.scale_weight
            if dst > src:  # down: each active voxel adds rows / 2^ndim to its parent, if the parent exists
                par = parents[src].index_select(0, act)
                ok = (par >= 0).nonzero()[:, 0]
                u = u * (1.0 / 2 ** len(lvl.shape))
                sums[dst] = sums[dst].index_add(0, par.index_select(0, ok), u.index_select(0, ok))
            else:  # up: each voxel of the finer level copies its parent's row, if the parent is active
                slot = torch.full((lvl.rows,), -1, dtype=torch.long, device=x.device)
                slot[act] = torch.arange(act.numel(), device=x.device)
                par = parents[dst]
                src_slot = slot[par.clamp_min(0)].where(par >= 0, -1)
                ok = (src_slot >= 0).nonzero()[:, 0]
                sums[dst] = sums[dst].index_add(0, ok, u.index_select(0, src_slot.index_select(0, ok)))
    outputs = []
    for lvl_i, (s, lvl) in enumerate(zip(sums, levels)):
        g = _gate_rows(router.depth.gate, s, lvl)
        inner = gate_mask(g)[:, 0]
        nbr = lvl.neighbours
        outer = _dilate_rows(inner, nbr)
        if router.keep_gates:
            kept["depth"][lvl_i] = g.detach()
        cost = cost + _path_cost([_pool_rows(g, nbr), g], [outer, inner], router.depth.unit_costs(), lvl)
        cost = cost + _gate_cost([router.depth.gate], lvl)
        outputs.append(_depth_rows(router, s, g, inner, outer, lvl))
    return outputs, cost, kept


# ------------------------------------------------------------------------------------- dense reference


def _gate_dense(gate: SpatialGate | None, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Gate (N, G, *shape) of a volume zero outside ``m`` (N, 1, *shape), zero outside ``m``."""
    if gate is None:
        return m.to(x.dtype)
    logits = gate.conv(x)
    if gate.coarse:
        w = m.to(x.dtype)
        dims = tuple(range(2, x.dim()))
        logits = (logits * w).sum(dim=dims, keepdim=True) / w.sum(dim=dims, keepdim=True).clamp_min(1.0)
        logits = logits.expand(-1, -1, *x.shape[2:])
    return gate.activation(logits) * m


def _dense_cost(gates: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], costs: Sequence[int],
                m: torch.Tensor) -> Cost:
    soft = realized = 0.0
    for g, mk, c in zip(gates, masks, costs):
        soft = soft + (g.mean(dim=1) * m[:, 0]).flatten(1).sum(dim=1).float() * c
        realized = realized + (mk & m).flatten(1).sum(dim=1).float() * c
    full = m.flatten(1).sum(dim=1).float() * float(sum(costs))
    return Cost(soft, realized, full)


def _router_dense(router: Router, feats: list[torch.Tensor], levels: list[_Level]) -> tuple[list, Cost, dict]:
    num = len(feats)
    n = levels[0].n
    cost = Cost.zeros(n, feats[0].device)
    kept: dict[str, dict[int, torch.Tensor]] = {"down": {}, "up": {}, "depth": {}}
    masks = [lvl.mask(x.device) for x, lvl in zip(feats, levels)]
    vols = [lvl.volume(x) for x, lvl in zip(feats, levels)]
    sums = [router.output_weight * v for v in vols]
    for src, (v, m, lvl) in enumerate(zip(vols, masks, levels)):
        for unit, dst in ((router.down, src + 1), (router.up, src - 1)):
            if not 0 <= dst < num:
                continue
            g = _gate_dense(unit.gate, v, m)
            a = gate_mask(g)
            if router.keep_gates:
                kept["down" if unit is router.down else "up"][src] = lvl.gather(g).detach()
            cost = cost + _dense_cost([g], [a], [unit.macs_per_pixel()], m) + _gate_cost([unit.gate], lvl)
            u = unit.dense(v, g, a)
            u = downsample(u) if dst > src else upsample(u, levels[dst].shape)
            sums[dst] = sums[dst] + router.scale_weight * u * masks[dst]
    outputs = []
    for lvl_i, (s, m, lvl) in enumerate(zip(sums, masks, levels)):
        g = _gate_dense(router.depth.gate, s, m)
        inner = gate_mask(g)
        outer = dilate(inner) & m
        if router.keep_gates:
            kept["depth"][lvl_i] = lvl.gather(g).detach()
        cost = cost + _dense_cost([pool_gate(g), g], [outer, inner], router.depth.unit_costs(), m)
        cost = cost + _gate_cost([router.depth.gate], lvl)
        outputs.append(lvl.gather(router.depth.dense(s, g, inner, outer)))
    return outputs, cost, kept


# ----------------------------------------------------------------------------------------------- public


def forward_sparse(tower: DynamicTower, features: SparseInput) -> SparseInput:
    """Run every router of ``tower`` on the voxels of ``features``; see the module docstring.

    Args:
        tower: a DynamicTower built with the input's ``ndim``, channels and ``num_levels``.
        features: a SparseConvTensor (``num_levels = 1``) or a list of ``num_levels`` of them, finest first,
            each with indices (R_l, 1 + ndim) and features (R_l, C).

    Returns:
        The same kind as ``features``: SparseConvTensors with the input's indices, spatial shapes and
        batch size, and features (R_l, C). Each router's ``last_cost`` is set.
    """
    levels_in = check_sparse_input(tower, features)
    device_type = levels_in[0].features.device.type
    if autocast_enabled(device_type):
        # Mixed precision: the routers run in float32 with autocast off (as Router.forward does).
        with torch.autocast(device_type, enabled=False):
            out = forward_sparse(tower, [x.replace_feature(x.features.float()) for x in levels_in])
        return out[0] if isinstance(features, spconv.SparseConvTensor) else out
    levels = [_Level(x) for x in levels_in]
    parents = [lvl.parents_in(levels[i + 1]) for i, lvl in enumerate(levels[:-1])]
    feats = [x.features for x in levels_in]
    for router in tower.routers:
        if router.execution == "dense":
            feats, cost, kept = _router_dense(router, feats, levels)
        else:
            feats, cost, kept = _router_sparse(router, feats, levels, parents)
        router.last_cost = cost
        router.last_gates = kept if router.keep_gates else {}
    out = [x.replace_feature(f) for x, f in zip(levels_in, feats)]
    return out[0] if isinstance(features, spconv.SparseConvTensor) else out
