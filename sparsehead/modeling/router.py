"""One router of the fine-grained dynamic head, run on every level and image of a pyramid at once.

For pyramid level ``l`` with input ``x_l`` (all levels share the router's weights):

1. Scale paths. The "down" unit runs on the finer level ``l-1``: ``u = g ⊙ GN(dwconv(x_{l-1}))`` with its
   own gate ``g`` computed from ``x_{l-1}``; ``u`` is resampled to level ``l``. The "up" unit runs on the
   coarser level ``l+1`` and is resampled up. Missing neighbours are skipped.
2. Node sum ``s_l = scale_weight · Σ resampled units + output_weight · x_l``.
3. Depth path ``relu(g_d ⊙ GN(conv2(relu(GN(conv1(s_l))))) + s_l)`` with ``g_d`` computed from ``s_l``.

Where a path runs: a unit at the pixels where its gate is positive (any group); the depth path's conv2 at
``D = {g_d > 0}`` and conv1 at ``dilate(D)`` (its 3^ndim receptive field). Each GroupNorm takes its
statistics over the pixels its conv runs at, per image and level (:mod:`sparsehead.layers.norm`);
resampling is defined in :mod:`sparsehead.layers.resample`. On voxels (a sparse index set per level, see
:mod:`sparsehead.modeling.sparse_input`) every path runs on the level's sites only and reads zeros
elsewhere; on maps every pixel is a site.

The engine. A router works on :class:`~sparsehead.layers.sites.SiteRows`, the rows of all levels and
images packed into one tensor, so each step below is a handful of tensor operations for the whole
pyramid, not per level:

- gates: one matrix product of the rows with the taps of all three gate convs, summed over each row's
  neighbours (the depth gate's conv is linear in the node sum, so its taps come from the same product,
  times ``output_weight``, plus those of the scale rows);
- per path, the rows it runs at: its active rows (sparse) or all rows (dense kernels, statistics still
  over the active rows); the sizes of the active sets are read from the device once for the scale paths
  and once for the depth path;
- the scale units' depthwise convs (gathered neighbours, or the per-level grouped conv when that is
  cheaper), one GroupNorm for both units, the resampling tables, the depth path's two convs
  (:func:`~sparsehead.layers.sparse.gather_conv`, spconv submanifold convs on CUDA, or the dense conv of
  each level) and one scatter back into the node sum.

Execution modes, one set of weights and one function (forward and backward, up to float rounding):
``dense`` runs every path at all rows with dense kernels and reads nothing from the device; ``sparse``
runs every path at its active rows; ``auto`` picks per path: sparse when the path's active fraction
(the depth path's after dilation) is at most ``auto_threshold``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from ..layers.gates import SpatialGate, expand_gate, rows_taps
from ..layers.norm import MaskedGroupNorm, group_norm_rows
from ..layers.resample import RESAMPLE_MODES, resample_map
from ..layers.sites import SiteLayout, SiteRows
from ..layers.sparse import SparseConvWeight, depthwise_rows, gather_conv, to_rows
from ..utils.optional import import_spconv
from .cost import Cost

__all__ = ["Router", "DepthPath", "ScaleUnit", "EXECUTION_MODES", "default_rulebook", "conv_rows", "spconv_rows"]

EXECUTION_MODES = ("dense", "sparse", "auto")


def check_execution(mode: str) -> str:
    if mode not in EXECUTION_MODES:
        raise ValueError(f"execution must be one of {EXECUTION_MODES}, got {mode!r}")
    return mode


def _conv_nd(ndim: int):
    return F.conv2d if ndim == 2 else F.conv3d


@torch.compiler.disable  # the host read: under torch.compile one graph break, taken here
def _read_counts(masks: torch.Tensor, lay: SiteLayout) -> list[list[int]]:
    """Active rows per level of each mask (P, R) bool, read from the device in one transfer."""
    per_level = masks.to(torch.float64) @ lay.level_onehot(torch.float64)  # exact counts: (P, L)
    return [[round(v) for v in row] for row in per_level.tolist()]


class ScaleUnit(nn.Module):
    """Gated depthwise 3^ndim conv + GroupNorm run at a source level (one per neighbour direction).

    Holds the unit's weights; :class:`Router` runs it. In the sparse mode the depthwise convs of the units
    that run at rows gather the 3^ndim neighbours of each active row while at most ``gather_fraction`` of
    those units' rows are active, and above that (on maps) run the grouped conv over each level and keep
    the active rows.
    """

    gather_fraction = 0.1

    def __init__(
        self, channels: int, ndim: int, gn_groups: int, gate: SpatialGate | None, bias: bool = False
    ) -> None:
        super().__init__()
        conv_cls = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.ndim = ndim
        self.conv = conv_cls(channels, channels, 3, padding=1, groups=channels, bias=bias)
        self.norm = MaskedGroupNorm(gn_groups, channels)
        self.gate = gate
        nn.init.normal_(self.conv.weight, std=0.01)

    def macs_per_pixel(self) -> int:
        return self.conv.in_channels * 3**self.ndim + self.norm.macs_per_pixel()


# spconv's CUDA kernels exist for these dtypes only (no float64, no bfloat16).
_SPCONV_CUDA_DTYPES = (torch.float32, torch.float16)


def default_rulebook(device: torch.device, dtype: torch.dtype) -> str:
    """:attr:`DepthPath.rulebook` when it is None: ``submanifold`` (spconv) on CUDA for the dtypes spconv's
    CUDA kernels have, else ``exact``."""
    return "submanifold" if device.type == "cuda" and dtype in _SPCONV_CUDA_DTYPES else "exact"


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` ("cpu", "cuda")."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def spconv_rows(x: SiteRows, rows: torch.Tensor):
    """The ``rows`` (M,) of ``x`` as one spconv ``SparseConvTensor`` whose batch entries are the layout's
    (level, image) segments, coordinates within the level: one rulebook for every level."""
    lay = x.layout
    indices = torch.cat([lay.segment.index_select(0, rows)[:, None].int(), lay.coords.index_select(0, rows)], dim=1)
    return import_spconv().SparseConvTensor(x.buf.index_select(0, rows), indices.contiguous(), list(lay.shapes[0]),
                                            lay.num_segments)


def conv_rows(conv: SparseConvWeight, x: SiteRows, rows: torch.Tensor, rulebook: str) -> torch.Tensor:
    """One depth-path conv of ``x`` evaluated at ``rows`` (M,) int64: (M, C_out), reading zeros off the sites.

    ``exact``: a GEMM per kernel row over each output row's gathered neighbours. ``submanifold``: spconv's
    submanifold conv on the rows and their neighbours (what it reads), then the outputs at ``rows``.
    """
    lay = x.layout
    table = lay.neighbours.index_select(0, rows)
    if rulebook == "exact":
        return gather_conv(x.buf, conv.weight, table)
    read = torch.zeros(lay.rows + 1, dtype=torch.bool, device=rows.device).index_fill_(0, table.reshape(-1), True)
    q = read[:-1].nonzero()[:, 0]
    out = conv.submanifold(spconv_rows(x, q), "conv_rows").features
    position = torch.zeros(lay.rows, dtype=torch.int64, device=q.device).index_copy_(
        0, q, torch.arange(q.shape[0], device=q.device))
    return out.index_select(0, position.index_select(0, rows))


class DepthPath(nn.Module):
    """Gated residual bottleneck of two 3^ndim convs with GroupNorm (the router's depth path).

    The convs hold spconv-layout weights (C, *kernel, C). At its active rows the sparse mode has two
    kernels for the same function, chosen by ``rulebook``:

    - ``exact`` (default on CPU, and on CUDA for float64): conv1 at dilate(D) reading the node sum's rows
      in place, conv2 at D, each a GEMM over gathered neighbour rows. No pixel is computed in vain.
    - ``submanifold`` (default on CUDA in float32/float16): both convs as spconv submanifold convs on
      dilate(dilate(D)) of all levels at once (one ``SparseConvTensor`` whose batch entries are the
      (level, image) segments) sharing one rulebook; rows outside each conv's own set are ignored.
    """

    def __init__(self, channels: int, ndim: int, gn_groups: int, gate: SpatialGate | None, indice_key: str) -> None:
        super().__init__()
        self.ndim = ndim
        self.conv1 = SparseConvWeight(ndim, channels, channels, 3)
        self.norm1 = MaskedGroupNorm(gn_groups, channels)
        self.conv2 = SparseConvWeight(ndim, channels, channels, 3)
        self.norm2 = MaskedGroupNorm(gn_groups, channels)
        self.gate = gate
        self.indice_key = indice_key
        self.rulebook: str | None = None  # "exact" | "submanifold"; None: default_rulebook()
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, std=0.01)

    def unit_costs(self) -> tuple[int, int]:
        """MACs per pixel of (conv1 + norm1, conv2 + norm2)."""
        return (
            self.conv1.macs_per_pixel() + self.norm1.macs_per_pixel(),
            self.conv2.macs_per_pixel() + self.norm2.macs_per_pixel(),
        )


class Router(nn.Module):
    """One router applied to every level of a pyramid, with weights shared across levels.

    Args:
        channels: feature channels ``C`` of every level.
        ndim: spatial dimensions (2 or 3).
        gated: False builds the paper's "Fixed" router (same paths, no gates, always computed).
        tau, gate_activation, gate_init, gate_groups, coarse_gate: passed to every :class:`SpatialGate`.
        gn_groups: GroupNorm groups.
        execution: ``dense``, ``sparse`` or ``auto``.
        auto_threshold: in ``auto``, a path runs sparse when its active fraction is at most this.
        resample: ``pool`` or ``bilinear`` (:mod:`sparsehead.layers.resample`), between the levels a scale
            unit connects.
        scale_bias: the scale units' depthwise convs have a bias (as in the paper's reference code).
        name: a unique prefix for this router's spconv rulebook key.

    ``forward(features, overwrite_inputs=False)`` takes a list of (N, C, *spatial_l) maps, finest first,
    and returns the list of outputs with the same shapes (channels-last views of one buffer); or
    :class:`~sparsehead.layers.sites.SiteRows` and returns SiteRows on the same layout (with
    ``overwrite_inputs`` the caller hands the rows over: without autograd they may be overwritten, as
    :class:`~sparsehead.modeling.tower.DynamicTower` does between its routers). It sets ``last_cost`` (see
    :mod:`sparsehead.modeling.cost`). With ``keep_gates = True`` it also keeps the gates it computed,
    detached, in ``last_gates``: ``{"down": {source_level: gates}, "up": {...}, "depth": {level: ...}}``
    (a "down" unit at level l feeds level l + 1, an "up" unit feeds l - 1), each (N, G, *spatial) on maps
    and (R_l, G) on voxels, and ``"sites": {level: (N, 1, *spatial) bool}`` (False on batch padding).
    """

    def __init__(
        self,
        channels: int,
        ndim: int = 2,
        gated: bool = True,
        tau: float = 1.5,
        gate_activation: str = "geretanh",
        gate_init: float = 0.99,
        gate_groups: int = 1,
        coarse_gate: bool = False,
        gn_groups: int = 32,
        execution: str = "sparse",
        auto_threshold: float = 0.5,
        resample: str = "pool",
        scale_bias: bool = False,
        name: str = "router",
    ) -> None:
        super().__init__()
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"resample must be one of {RESAMPLE_MODES}, got {resample!r}")
        if channels % gn_groups:
            raise ValueError(f"gn_groups ({gn_groups}) must divide channels ({channels})")

        def make_gate() -> SpatialGate | None:
            if not gated:
                return None
            return SpatialGate(channels, gate_groups, ndim, gate_activation, tau, gate_init, coarse_gate)

        self.channels = channels
        self.ndim = ndim
        self.gated = gated
        self.execution = check_execution(execution)
        self.auto_threshold = auto_threshold
        self.resample = resample
        self.down = ScaleUnit(channels, ndim, gn_groups, make_gate(), scale_bias)
        self.up = ScaleUnit(channels, ndim, gn_groups, make_gate(), scale_bias)
        self.depth = DepthPath(channels, ndim, gn_groups, make_gate(), indice_key=f"{name}.depth")
        self.scale_weight = nn.Parameter(torch.zeros(()))
        self.output_weight = nn.Parameter(torch.ones(()))
        self.last_cost: Cost | None = None
        self.keep_gates = False
        self.last_gates: dict[str, dict[int, torch.Tensor]] = {}

    def unit_costs(self) -> dict[str, tuple[int, ...]]:
        """MACs per pixel of each path's convs: ``down``/``up`` (one unit each), ``depth`` (conv1, conv2),
        and ``gate`` (one gate conv, always computed)."""
        gate = next((m.macs_per_pixel() for m in (self.down.gate, self.up.gate, self.depth.gate) if m), 0)
        return {
            "down": (self.down.macs_per_pixel(),),
            "up": (self.up.macs_per_pixel(),),
            "depth": self.depth.unit_costs(),
            "gate": (gate,),
        }

    # ------------------------------------------------------------------------------------------ forward

    def forward(self, features: Sequence[torch.Tensor] | SiteRows, overwrite_inputs: bool = False):
        packed = isinstance(features, SiteRows)
        x = features if packed else SiteRows.from_maps(features, self.resample)
        lay = x.layout
        if lay.resample != self.resample:
            raise ValueError(f"rows laid out for {lay.resample!r} resampling, the router uses {self.resample!r}")
        owned = (overwrite_inputs or not packed) and not torch.is_grad_enabled()
        if autocast_enabled(x.buf.device.type):
            # Mixed precision: the router runs in float32 with autocast off, so that all three modes compute
            # one function (masked statistics and row scatters need one dtype; spconv has no bfloat16).
            rows = x.buf.float()
            owned = owned or (rows is not x.buf and not torch.is_grad_enabled())
            with torch.autocast(x.buf.device.type, enabled=False):
                out = self.forward(SiteRows(rows, lay), overwrite_inputs=owned)
            return out if packed else out.to_maps()
        # Both host reads (_plan) are made in this frame: under torch.compile each breaks the graph once.
        levels = lay.num_levels
        # The units that exist: (unit, first and last source level + 1, the direction it resamples in).
        units = [(self.down, 0, levels - 1, "down"), (self.up, 1, levels, "up")] if levels > 1 else []
        ranges = [(a, b) for _, a, b, _ in units]
        gates = active = None
        with record_function("sparsehead.gate"):
            raw, depth_taps = self._scale_gates(x, units)
            raw = torch.stack(raw) if units else None  # (U, R, G), every level (the cost counts them all)
            if units:  # a unit runs only on the levels that have a neighbour in its direction
                gates = raw * lay.cached(("unit_levels", tuple(ranges), x.buf.dtype), lambda: torch.stack(
                    [lay.level_mask(a, b, x.buf.dtype) for a, b in ranges]))  # (U, R, G)
                active = (gates > 0).any(dim=2)  # (U, R)
        plans = self._plan(active, lay, ranges)
        with record_function("sparsehead.scale"):
            scaled = self._scale_units(x, units, gates, active, plans)
        with record_function("sparsehead.scatter"):  # the units' outputs are freed once summed
            s, depth_taps = self._node_sum(x, owned, units, *scaled, depth_taps)
            del scaled
        with record_function("sparsehead.gate"):
            g = self._depth_gate(SiteRows(s, lay), depth_taps)
            pooled = lay.neighbour_max(g)
            sets = (torch.stack([g, pooled]) > 0).any(dim=2)  # (2, R): the inner and the outer rows
            inner, outer = sets
            rulebook = self.depth.rulebook or default_rulebook(s.device, s.dtype)
            if rulebook == "submanifold" and self.execution != "dense":  # and what conv1 reads
                sets = torch.cat([sets, (lay.neighbour_max(outer[:, None].to(s.dtype)) > 0).view(1, -1)])
        plans = self._plan(sets, lay, [(0, levels)] * sets.shape[0])
        out = self._depth(SiteRows(s, lay), g, sets, owned, rulebook, plans)
        self.last_cost = self._cost(lay, units, raw, g, pooled, inner, outer)
        if self.keep_gates:
            kept = {"down": {}, "up": {}, "depth": {}}
            for (unit, a, b, _), gate in zip(units, gates if units else []):
                kind = "down" if unit is self.down else "up"
                kept[kind].update({lvl: lay.level(gate, lvl).detach() for lvl in range(a, b)})
            kept["depth"] = {lvl: lay.level(g, lvl).detach() for lvl in range(levels)}
            sites = lay.level_mask(0, levels, torch.bool)
            kept["sites"] = {lvl: lay.level(sites, lvl) for lvl in range(levels)}
            self.last_gates = kept
        else:
            self.last_gates = {}
        return out if packed else out.to_maps()

    # ------------------------------------------------------------------------------------------- gates

    def _scale_gates(self, x: SiteRows, units) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Gates (R, G) of the scale units at every site (the levels without a neighbour in a unit's direction
        included: the paper's cost convention counts them) and, when gated, the depth gate's per-tap products
        of ``x`` times ``output_weight`` (R + 1, G_d · 3^ndim), from one matrix product."""
        lay, dtype = x.layout, x.buf.dtype
        sites = lay.level_mask(0, lay.num_levels, dtype)
        if not self.gated:
            return [sites for _ in units], None
        scale_gates = [u.gate for u, _, _, _ in units]
        convs = [g.conv for g in scale_gates] + [self.depth.gate.conv]
        taps = rows_taps(x.buf, torch.cat([c.weight for c in convs]))  # (R + 1, J · 3^ndim)
        k = lay.neighbours.shape[1]
        split = sum(g.num_groups for g in scale_gates) * k
        gates = []
        if scale_gates:
            logits = lay.gate_conv(taps, split // k, torch.cat([g.conv.bias for g in scale_gates]))
            parts = logits.split([g.num_groups for g in scale_gates], dim=1)
            gates = [gate(x, conv_out=p) for gate, p in zip(scale_gates, parts)]
            if lay.valid is not None:
                gates = [g * sites for g in gates]
        return gates, taps[:, split:] * self.output_weight

    def _depth_gate(self, s: SiteRows, taps: torch.Tensor | None) -> torch.Tensor:
        """The depth gate (R, G) of the node sum, from its per-tap products ``taps`` (R + 1, G · 3^ndim)."""
        lay = s.layout
        if not self.gated:
            return lay.level_mask(0, lay.num_levels, s.buf.dtype)
        gate = self.depth.gate
        g = gate(s, conv_out=lay.gate_conv(taps, gate.num_groups, gate.conv.bias))
        return g if lay.valid is None else g * lay.level_mask(0, lay.num_levels, g.dtype)

    def _plan(self, masks: torch.Tensor | None, lay: SiteLayout, ranges: Sequence[tuple[int, int]]
              ) -> list[tuple[bool, list[int] | None]]:
        """Per path, given its active rows ``masks[i]`` (R,) among the sites of levels ``ranges[i]``: whether
        it runs at all rows, and its active rows per level of its range. The counts are read from the device
        in one transfer for all paths, and not at all when every path runs at all rows (counts None)."""
        if self.execution == "dense" or (self.execution == "auto" and self.auto_threshold <= 0):
            return [(True, None)] * len(ranges)
        counts = _read_counts(masks, lay) if ranges else []
        plans = []
        for (a, b), level_counts in zip(ranges, counts):
            active = level_counts[a:b]
            full = self.execution == "auto" and sum(active) > self.auto_threshold * lay.site_count(a, b)
            plans.append((full, active))
        return plans

    # ------------------------------------------------------------------------------------- scale paths

    def _node_sum(self, x: SiteRows, owned: bool, units, pairs, maps, depth_taps: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The node sum ``output_weight · x + Σ units`` (R + 1, C) from the scale units' outputs (as
        :meth:`_scale_units` returns them; rows resampled here through their unit's table of (M, F) targets
        and weights), in place of ``x`` when ``owned``; and the depth gate's taps of it."""
        lay, c = x.layout, x.channels
        s = x.buf.mul_(self.output_weight) if owned else x.buf * self.output_weight
        if pairs is not None:
            y, rows, spans = pairs
            taps = None if depth_taps is None else rows_taps(y, self.depth.gate.conv.weight)
            for i, start, size in spans:  # resampled one unit at a time: each has its own fan-out
                index, weight = lay.table(units[i][3], y.dtype)
                r = rows[start:start + size]
                w = weight.index_select(0, r)[:, :, None]  # (M_u, F, 1)
                target = index.index_select(0, r).reshape(-1)
                s.index_add_(0, target, (y[start:start + size, None, :] * w).reshape(-1, c))
                if taps is not None:
                    t = taps[start:start + size, None, :]
                    depth_taps.index_add_(0, target, (t * w).reshape(-1, t.shape[2]))
        for dst, m in maps:
            lay.level(s, dst).add_(m)
        if maps and depth_taps is not None:  # the depth gate's taps of the node sum itself
            depth_taps = rows_taps(s, self.depth.gate.conv.weight)
        return s, depth_taps

    def _every_site(self, lay: SiteLayout) -> bool:
        """Whether every path runs at every pixel with statistics over all of them: an ungated router on maps
        without batch padding (the Fixed head), which runs torch's GroupNorm level by level."""
        return not self.gated and lay.grid and lay.valid is None

    def _scale_units(self, x: SiteRows, units, gates, active, plans):
        """The scale units' outputs, scale weight included.

        Units that run at rows (their active rows, or every row of voxels) run as one set of M (unit, row)
        pairs, unit-major: ``(y (M, C), rows (M,), spans [(unit, first pair, pairs)])``, one GroupNorm and one
        gate product for all of them. Units run at every pixel of maps give resampled maps: ``[(destination
        level, (N, C, *spatial))]``. Returns ``(pairs or None, maps)``.
        """
        lay, c = x.layout, x.channels
        maps, run, fulls, level_counts = [], [], [], []
        for i, ((unit, a, b, _), (full, counts)) in enumerate(zip(units, plans)):
            if full and lay.grid:
                maps += self._unit_maps(unit, x, gates[i], active[i], a, b)
            elif full or sum(counts):
                run.append(i)
                fulls.append(full)
                level_counts.append([lay.site_count(lvl, lvl + 1) for lvl in range(a, b)] if full else counts)
        if not run:
            return None, maps
        first, last = run[0], run[-1] + 1  # the run units are consecutive (at most two)
        if any(fulls):  # every row of the unit's levels (voxels), statistics over the active ones
            runs = torch.stack([lay.level_mask(*units[i][1:3], torch.bool)[:, 0] if full else active[i]
                                for i, full in zip(run, fulls)])
        else:
            runs = active[first:last]
        sizes = [sum(n) for n in level_counts]
        flat = torch.nonzero_static(runs.reshape(-1), size=sum(sizes))[:, 0]  # pairs: unit · R + row
        rows = flat.remainder(lay.rows) if len(run) > 1 else flat
        spans, start = [], 0
        for i, size in zip(run, sizes):
            spans.append((i, start, size))
            start += size
        y = self._depthwise(x, units, spans, rows, level_counts)
        norms = [units[i][0].norm for i in run]
        segs = lay.onehot(y.dtype).index_select(0, rows)
        if len(run) == 1:
            weight, bias = norms[0].weight, norms[0].bias
        else:  # one GroupNorm for both units: the second unit's segments come after the first's
            segs = torch.block_diag(*segs.split(sizes))
            weight = torch.cat([n.weight.expand(lay.num_segments, c) for n in norms])
            bias = torch.cat([n.bias.expand(lay.num_segments, c) for n in norms])
        stats = active[first:last].reshape(-1).index_select(0, flat) if any(fulls) else None
        y = group_norm_rows(y, segs, norms[0].num_groups, weight, bias, norms[0].eps, stats, overwrite=True)
        g = gates[first:last].reshape(-1, gates.shape[2]).index_select(0, flat)
        gate = expand_gate(g * self.scale_weight, c)
        y = y * gate if torch.is_grad_enabled() else y.mul_(gate)
        return (y, rows, spans), maps

    def _unit_maps(self, unit: ScaleUnit, x: SiteRows, gate: torch.Tensor, mask: torch.Tensor, first: int,
                   last: int) -> list[tuple[int, torch.Tensor]]:
        """The unit at every pixel of each of its source levels' maps (the dense kernels), statistics over its
        active pixels: (destination level, resampled output (N, C, *spatial)) per source level."""
        lay, w, b = x.layout, unit.conv.weight, unit.conv.bias
        conv, c = _conv_nd(lay.ndim), x.channels
        every = self._every_site(lay)  # statistics over every pixel: torch's GroupNorm
        mask, gate = mask[:, None].to(x.buf.dtype), gate * self.scale_weight  # once for all levels
        out = []
        for lvl in range(first, last):
            y = conv(lay.level(x.buf, lvl), w, b, padding=1, groups=c)
            y = unit.norm.forward_maps(y, None if every else lay.level(mask, lvl))
            y = y * expand_gate(lay.level(gate, lvl), c)
            dst = lvl + 1 if unit is self.down else lvl - 1
            y = resample_map(y, lay.shapes[dst], lay.resample, down=dst > lvl)
            if lay.valid is not None:  # nothing lands on batch padding
                y = y * lay.level(lay.level_mask(dst, dst + 1, y.dtype), dst)
            out.append((dst, y))
        return out

    @staticmethod
    def _depthwise(x: SiteRows, units, spans, rows: torch.Tensor, level_counts: list[list[int]]) -> torch.Tensor:
        """The units' depthwise convs at their pairs' rows (M, C): gathered neighbours, or while more than
        ``gather_fraction`` of the units' rows are active (maps only), the grouped conv of each level map that
        has active rows, read at them."""
        lay = x.layout
        reach = sum(lay.offsets[units[i][2]] - lay.offsets[units[i][1]] for i, _, _ in spans)
        parts = []
        if lay.grid and rows.shape[0] > units[spans[0][0]][0].gather_fraction * reach:
            conv, local = _conv_nd(lay.ndim), lay.local_rows().index_select(0, rows)
            for (i, start, _), counts in zip(spans, level_counts):
                unit, a, b, _ = units[i]
                w = unit.conv.weight
                for lvl, count in zip(range(a, b), counts):
                    if count:
                        y = to_rows(conv(lay.level(x.buf, lvl), w, unit.conv.bias, padding=1, groups=w.shape[0]))
                        parts.append(y.index_select(0, local[start:start + count]))
                    start += count
        else:
            table = lay.neighbours.index_select(0, rows)
            for i, start, size in spans:
                conv = units[i][0].conv
                y = depthwise_rows(x.buf, conv.weight, table[start:start + size])
                parts.append(y if conv.bias is None else y + conv.bias)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    # -------------------------------------------------------------------------------------- depth path

    def _depth(self, s: SiteRows, g: torch.Tensor, sets: Sequence[torch.Tensor], owned: bool, rulebook: str,
               plans) -> SiteRows:
        """``relu(s + g ⊙ h)`` with ``h`` the depth path's output at its active rows (zero elsewhere). ``sets``
        (R,) bool and their ``plans``: the inner rows, the outer rows (and for ``submanifold`` the rows conv1
        reads)."""
        lay, buf = s.layout, s.buf
        inner, outer = sets[0], sets[1]
        full = plans[1][0]
        counts = None if full else [sum(c) for _, c in plans]
        with record_function("sparsehead.depth_conv"):
            if full and self._every_site(lay):
                return self._depth_maps(s, owned)
            if full:
                rows, h = None, self._depth_full(s, inner, outer)
            elif counts[1] == 0:
                rows, h = None, None
            elif rulebook == "exact":
                rows, h = self._depth_exact(s, inner, outer, counts[0], counts[1])
            else:
                rows, h = self._depth_submanifold(s, inner, outer, sets[2], counts[0], counts[2])
        with record_function("sparsehead.scatter"):
            if h is None:
                out = buf.clamp_min_(0) if owned else buf.clamp_min(0)
                return SiteRows(out, lay)
            c = buf.shape[1]
            if rows is None:  # every row
                h = h.mul_(expand_gate(g, c)) if owned else h * expand_gate(g, c)
                out = buf if owned else buf.clone()
                out[:-1].add_(h)
                return SiteRows(out.clamp_min_(0), lay)
            h = h * expand_gate(g.index_select(0, rows), c)
            out = buf.index_add_(0, rows, h) if owned else buf.index_add(0, rows, h)
            return SiteRows(out.clamp_min_(0), lay)

    def _depth_exact(self, s: SiteRows, inner, outer, n_inner: int, n_outer: int):
        """conv1 exactly at the outer rows (reading the node sum in place), conv2 exactly at the inner rows."""
        lay, depth = s.layout, self.depth
        onehot = lay.onehot(s.buf.dtype)
        o = torch.nonzero_static(outer, size=n_outer)[:, 0]
        d = torch.nonzero_static(inner, size=n_inner)[:, 0]
        h = conv_rows(depth.conv1, s, o, "exact")
        h = F.relu(depth.norm1.forward_rows(h, onehot.index_select(0, o), overwrite=True),
                   inplace=not torch.is_grad_enabled())
        h = F.pad(h, (0, 0, 0, 1))  # the row a missing neighbour reads
        position = torch.full((lay.rows + 1,), n_outer, dtype=torch.int64, device=o.device)
        position.index_copy_(0, o, lay.arange(0, lay.num_levels)[:n_outer])
        h = gather_conv(h, depth.conv2.weight, position[lay.neighbours.index_select(0, d)])
        return d, depth.norm2.forward_rows(h, onehot.index_select(0, d), overwrite=True)

    def _depth_submanifold(self, s: SiteRows, inner, outer, read, n_inner: int, n_read: int):
        """Both convs as spconv submanifold convs on the rows conv1 reads (``read``), all levels in one
        tensor."""
        lay, depth = s.layout, self.depth
        q = torch.nonzero_static(read, size=n_read)[:, 0]
        seg = lay.onehot(s.buf.dtype).index_select(0, q)
        x = spconv_rows(s, q)
        in_outer, in_inner = outer.index_select(0, q), inner.index_select(0, q)
        h = depth.conv1.submanifold(x, depth.indice_key)
        h1 = F.relu(depth.norm1.forward_rows(h.features, seg, in_outer)) * in_outer[:, None]
        h = depth.conv2.submanifold(h.replace_feature(h1), depth.indice_key)  # same key: the rulebook is reused
        h2 = depth.norm2.forward_rows(h.features, seg, in_inner)
        keep = torch.nonzero_static(in_inner, size=n_inner)[:, 0]
        return q.index_select(0, keep), h2.index_select(0, keep)

    def _depth_maps(self, s: SiteRows, owned: bool) -> SiteRows:
        """An ungated depth path at every pixel of each level's map (no batch padding), with torch's convs and
        GroupNorm: ``relu(s + h)``, in place of ``s`` when it is owned and autograd is off."""
        lay, depth = s.layout, self.depth
        conv = _conv_nd(lay.ndim)
        w1, w2 = depth.conv1.dense_weight(), depth.conv2.dense_weight()
        inplace = owned and not torch.is_grad_enabled()
        out = []
        for lvl in range(lay.num_levels):
            x = lay.level(s.buf, lvl)
            h = F.relu(depth.norm1.forward_maps(conv(x, w1, padding=1), None))
            h = depth.norm2.forward_maps(conv(h, w2, padding=1), None)
            out.append(x.add_(h).clamp_min_(0) if inplace else F.relu(x + h))
        if inplace:
            return s
        rows = [to_rows(y) for y in out] + [s.buf.new_zeros(1, s.channels)]
        return SiteRows(torch.cat(rows), lay)

    def _depth_full(self, s: SiteRows, inner, outer) -> torch.Tensor:
        """The depth path at every row (R, C): dense convs of each level (maps) or gathers (voxels), each
        GroupNorm once over the rows of every level with statistics over the active rows (conv2 reads zeros
        off conv1's rows; rows off the inner set are not zero, the gate removes them)."""
        lay, depth = s.layout, self.depth
        onehot = lay.onehot(s.buf.dtype)
        grad = torch.is_grad_enabled()
        h = self._conv_all(s.buf, depth.conv1, lay)
        h = F.relu(depth.norm1.forward_rows(h, onehot, outer, overwrite=True), inplace=not grad)
        h = h * outer[:, None].to(h.dtype) if grad else h.mul_(outer[:, None].to(h.dtype))
        h = self._conv_all(h, depth.conv2, lay)
        return depth.norm2.forward_rows(h, onehot, inner, overwrite=True)

    @staticmethod
    def _conv_all(rows: torch.Tensor, conv: SparseConvWeight, lay: SiteLayout) -> torch.Tensor:
        """``conv`` at every row (R, C) of ``rows`` (R or R + 1, C): torch's conv of each level map, or a
        gathered conv over the neighbour table."""
        if lay.grid:
            f = _conv_nd(lay.ndim)
            weight = conv.dense_weight()
            return torch.cat([to_rows(f(lay.level(rows, lvl), weight, padding=1)) for lvl in range(lay.num_levels)])
        if rows.shape[0] == lay.rows:
            rows = F.pad(rows, (0, 0, 0, 1))  # the row a missing neighbour reads
        return gather_conv(rows, conv.weight, lay.neighbours)

    # -------------------------------------------------------------------------------------------- cost

    def _cost(self, lay: SiteLayout, units, raw, g, pooled, inner, outer) -> Cost:
        """Soft, realised and full MACs per image (see :mod:`sparsehead.modeling.cost`), and the same in the
        paper's convention (``Cost.paper``: no gate convs, a scale unit counted as 19·C MACs at every level,
        the two units at the pyramid's ends included; see docs/paper_flops.md). ``raw``: the scale units'
        gates at every level, (U, R, G), or None without units."""
        units_raw = [] if raw is None else list(raw)
        soft = [x if x.shape[1] == 1 else x.mean(dim=1, keepdim=True) for x in units_raw + [pooled, g]]
        realised = [] if raw is None else list((raw > 0).any(dim=2, keepdim=True))
        realised += [outer[:, None], inner[:, None]]
        terms = torch.cat(soft + realised, dim=1).float()  # (R, 2 · paths): per-pixel gate and on/off
        weights, (offset, full, paper_full) = self._cost_weights(lay, [(a, b) for _, a, b, _ in units])
        sums = lay.per_level_image(terms).transpose(0, 1).reshape(lay.batch, -1)  # (N, L · 2 · paths)
        per_image = torch.addmm(offset, sums, weights)  # (N, 4), the gate convs' MACs in the first two
        paper = Cost(per_image[:, 2], per_image[:, 3].detach(), paper_full)
        return Cost(per_image[:, 0], per_image[:, 1].detach(), full, paper)

    def _cost_weights(self, lay: SiteLayout, ranges: list[tuple[int, int]]
                      ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """MACs per pixel of each path on each level, as (L · 2 · paths, 4) weights from per-level sums of
        (gates, on/off) to (soft, realised, paper soft, paper realised); and the MACs per image that do not
        depend on the gates: (N, 4) the gate convs' (every site of their levels) in the soft and realised
        columns, (N,) the full cost (gate convs included) and (N,) the paper's full cost. Cached per layout."""
        conv1, conv2 = self.depth.unit_costs()
        ours = [u.macs_per_pixel() for u in (self.down, self.up)][: len(ranges)] + [conv1, conv2]
        paper = [19 * self.channels] * len(ranges) + [conv1, conv2]  # the reference: 9·C twice plus the norm
        gate = self.unit_costs()["gate"][0]
        key = ("router_cost", tuple(ranges), tuple(ours), tuple(paper), gate)

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            levels, paths = lay.num_levels, len(ours)
            weights = torch.zeros(levels, 2 * paths, 4)
            full = torch.zeros(levels, 3)
            for k, ((a, b), m, p) in enumerate(zip(ranges + [(0, levels)] * 2, ours, paper)):
                weights[a:b, k, 0] = weights[a:b, paths + k, 1] = m  # where the path exists
                weights[:, k, 2] = weights[:, paths + k, 3] = p  # the reference counts every level
                full[a:b, 0] += m
                full[:, 1] += p
                if k != paths - 2:  # one gate per unit and one for the depth path (conv1 and conv2 share it)
                    full[a:b, 2] += gate
            totals = torch.einsum("ln,lc->nc", lay.sites_per_level_image(), full.to(lay.device))  # (N, 3)
            gates = totals[:, 2]
            offset = torch.stack([gates, gates, torch.zeros_like(gates), torch.zeros_like(gates)], dim=1)
            return weights.flatten(0, 1).to(lay.device), (offset, totals[:, 0] + gates, totals[:, 1])

        return lay.cached(key, build)
