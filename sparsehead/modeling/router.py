"""One router of the fine-grained dynamic head: gated scale paths, node sum and gated depth path.

For pyramid level ``l`` with input ``x_l`` (all levels share the router's weights):

1. Scale paths. The "down" unit runs on the finer level ``l-1``: ``u = g ⊙ GN(dwconv(x_{l-1}))`` with its
   own gate ``g`` computed from ``x_{l-1}``; ``u`` is downsampled to level ``l``. The "up" unit runs on
   the coarser level ``l+1`` and is upsampled. Missing neighbours are skipped.
2. Node sum ``s_l = scale_weight · Σ resampled units + output_weight · x_l``.
3. Depth path ``relu(g_d ⊙ GN(conv2(relu(GN(conv1(s_l))))) + s_l)`` with ``g_d`` computed from ``s_l``.

Where a path runs: a unit at the pixels where its gate is positive (any group); the depth path's conv2 at
``D = {g_d > 0}`` and conv1 at ``dilate(D)`` (its 3^ndim receptive field), reading ``s_l`` on
``dilate(dilate(D))``. Each GroupNorm takes its statistics over the pixels its conv runs at (see
:mod:`sparsehead.layers.norm`); resampling is defined in :mod:`sparsehead.layers.resample`.

Execution modes, one set of weights:

- ``dense``: every conv on the full maps, outputs multiplied by the gates (the reference).
- ``sparse``: the gates are computed on the full maps (they are what decides), every gated path runs
  only where it is active: the depth path as sparse convs at exactly the pixels it needs (CPU) or as
  spconv submanifold convs sharing one rulebook (CUDA; see :class:`DepthPath`), the scale units'
  norms and gates on their active rows (their depthwise conv on gathered neighbours, or over the map
  when that is cheaper; see :class:`ScaleUnit`), resampled row-wise and added into the dense node sum.
  Maps are kept channels-last so gathering and scattering rows needs no layout copy.
- ``auto``: per level and path, ``sparse`` when the path's active fraction is at most
  ``auto_threshold``, else ``dense``.

All three compute the same function (forward and backward) up to float rounding.
"""
from __future__ import annotations

from typing import Sequence

import spconv.pytorch as spconv
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from ..layers.gates import (
    SpatialGate,
    apply_gates,
    conv_taps,
    expand_gate,
    gate_mask,
    gates_from_conv,
    pool_gate,
    rows_taps,
    sum_taps,
)
from ..layers.norm import MaskedGroupNorm
from ..layers.resample import downsample, downsample_parents, upsample, upsample_rows
from ..layers.sparse import (
    SubMConv,
    channels_last,
    depthwise_conv_rows,
    dilate,
    flat_index,
    from_rows,
    gather_conv,
    grid_of,
    mask_indices,
    to_rows,
)
from .cost import Cost

__all__ = ["Router", "DepthPath", "ScaleUnit", "EXECUTION_MODES"]

EXECUTION_MODES = ("dense", "sparse", "auto")


def check_execution(mode: str) -> str:
    if mode not in EXECUTION_MODES:
        raise ValueError(f"execution must be one of {EXECUTION_MODES}, got {mode!r}")
    return mode


def _conv_nd(ndim: int):
    return F.conv2d if ndim == 2 else F.conv3d


def _full_gate(x: torch.Tensor, gate: SpatialGate | None, conv_out: torch.Tensor | None = None) -> torch.Tensor:
    """Gate values (N, G, *spatial) for input ``x``; ones when the path is not gated. ``conv_out``: the
    gate conv of ``x`` when the caller has it."""
    if gate is None:
        return x.new_ones((x.shape[0], 1) + tuple(x.shape[2:]))
    g = gate(x, conv_out=conv_out)
    return g.expand(-1, -1, *x.shape[2:]) if gate.coarse else g


def _relu_with_rows(
    s: torch.Tensor, rows: torch.Tensor, flat: torch.Tensor, h: torch.Tensor, overwrite: bool = False
) -> torch.Tensor:
    """``relu(s + h)`` at rows ``flat`` (unique) and ``relu(s)`` elsewhere: ``h`` added in, one relu pass.

    ``s`` is channels-last (N, C, *spatial) and ``rows`` its :func:`to_rows` view; ``h`` (R, C). With
    ``overwrite`` and no autograd through ``s``, the result is written into ``s`` (no new map).
    """
    if overwrite and not (torch.is_grad_enabled() and s.requires_grad):
        rows.index_add_(0, flat, h)
        return s.clamp_min_(0)
    out = rows.index_add(0, flat, h)  # a new channels-last map's rows
    return from_rows(out.clamp_min_(0), s.shape)


def _relu_map(s: torch.Tensor, overwrite: bool) -> torch.Tensor:
    """``relu(s)``, in place when ``overwrite`` and autograd does not need ``s``."""
    if overwrite and not (torch.is_grad_enabled() and s.requires_grad):
        return s.clamp_min_(0)
    return s.clamp_min(0)  # its backward needs s, not the output: the output may be written in place


def _relu_rows(h: torch.Tensor) -> torch.Tensor:
    """``relu(h)`` of rows this forward made and reads no more; in place without autograd."""
    return F.relu(h, inplace=not torch.is_grad_enabled())


class _CostSum:
    """A forward's cost terms, summed once at the end (a few tensor ops per path, not per addition).

    A path of cost ``macs`` per pixel, running where ``mask`` (N, 1, *spatial) is set with gate ``gate``
    (N, G, *spatial): soft ``sum(mean_G(gate)) * macs``, realised ``count(mask) * macs``, full
    ``pixels * macs``. Gate convs count in full in all three (:meth:`always`).
    """

    def __init__(self) -> None:
        self.soft: list[torch.Tensor] = []
        self.realized: list[torch.Tensor] = []
        self.full = 0.0
        self.fixed = 0.0

    def path(self, gate: torch.Tensor, mask: torch.Tensor, macs: int) -> None:
        self.soft.append(gate.flatten(1).sum(dim=1) * (macs / gate.shape[1]))
        self.realized.append(mask.flatten(1).sum(dim=1) * macs)
        self.full += mask[0].numel() * macs

    def always(self, macs: float) -> None:
        self.fixed += macs

    def total(self, batch: int, device: torch.device) -> Cost:
        full = torch.full((batch,), self.full + self.fixed, device=device)
        if not self.soft:
            return Cost(full.clone(), full.clone(), full)
        soft = torch.stack(self.soft).sum(dim=0).float() + self.fixed
        realized = torch.stack(self.realized).sum(dim=0).float() + self.fixed
        return Cost(soft, realized, full)


class ScaleUnit(nn.Module):
    """Gated depthwise 3^ndim conv + GroupNorm run at a source level (one per neighbour direction).

    ``forward`` is not used: :class:`Router` calls :meth:`dense` or :meth:`sparse`.

    The depthwise conv is memory-bound: in the sparse mode it gathers the 3^ndim neighbours of each
    active pixel while at most ``gather_fraction`` of the map is active, and above that runs over the
    whole map (one read of it) and keeps the active rows, which is faster on CPU from about 3 % of a
    map. The norm, the gating and everything after run on the active rows only.
    """

    gather_fraction = 0.03

    def __init__(
        self, channels: int, ndim: int, gn_groups: int, gate: SpatialGate | None
    ) -> None:
        super().__init__()
        conv_cls = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.ndim = ndim
        self.conv = conv_cls(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.norm = MaskedGroupNorm(gn_groups, channels)
        self.gate = gate
        nn.init.normal_(self.conv.weight, std=0.01)

    def macs_per_pixel(self) -> int:
        return self.conv.in_channels * 3**self.ndim + self.norm.macs_per_pixel()

    def gate_and_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = _full_gate(x, self.gate)
        return g, gate_mask(g)

    def dense(self, x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Gated unit output on the full map (N, C, *spatial); zero where the gate is zero."""
        y = _conv_nd(self.ndim)(x, self.conv.weight, padding=1, groups=x.shape[1])
        return self.norm.forward_dense(y, mask) * expand_gate(g, x.shape[1])

    def sparse(
        self, x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated unit output at the active pixels only, times the scalar ``weight`` (folded into the gate
        values, not another pass over the rows): ``(row numbers (R,), rows (R, C))``."""
        n, c = x.shape[:2]
        flat = mask.reshape(-1).nonzero()[:, 0]  # row numbers, in row-major order
        if flat.shape[0] == 0:
            return flat, x.new_zeros(0, c)
        grid = grid_of(x)
        if flat.shape[0] <= self.gather_fraction * mask.numel():
            y = depthwise_conv_rows(to_rows(x), grid.table(grid.sites(mask)), self.conv.weight)
        else:
            y = _conv_nd(self.ndim)(x, self.conv.weight, padding=1, groups=c)
            y = to_rows(channels_last(y)).index_select(0, flat)
        y = self.norm.forward_rows(y, grid.images(flat) if n > 1 else None, n, overwrite=True)
        gate = expand_gate(to_rows(g).index_select(0, flat) * weight, c)
        return flat, (y * gate if torch.is_grad_enabled() else y.mul_(gate))


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


class DepthPath(nn.Module):
    """Gated residual bottleneck of two 3^ndim convs with GroupNorm (the router's depth path).

    The convs hold spconv weights (C, *kernel, C); the dense mode runs them with torch's conv. The sparse
    mode has two implementations of the same function, chosen by ``rulebook``:

    - ``exact`` (default on CPU, and on CUDA for float64): conv1 at dilate(D) reading the map's rows in
      place, conv2 at D, each a GEMM over gathered neighbour rows
      (:func:`~sparsehead.layers.sparse.gather_conv`). No pixel is computed in vain.
    - ``submanifold`` (default on CUDA in float32/float16, where spconv's implicit-GEMM kernels need their
      own rulebooks): both convs as spconv ``SubMConv`` on dilate(dilate(D)) sharing one rulebook; rows
      outside the conv's own set are computed, then ignored.
    """

    def __init__(
        self, channels: int, ndim: int, gn_groups: int, gate: SpatialGate | None, indice_key: str
    ) -> None:
        super().__init__()
        self.ndim = ndim
        self.conv1 = SubMConv(ndim, channels, channels, 3, indice_key=indice_key)
        self.norm1 = MaskedGroupNorm(gn_groups, channels)
        self.conv2 = SubMConv(ndim, channels, channels, 3, indice_key=indice_key)
        self.norm2 = MaskedGroupNorm(gn_groups, channels)
        self.gate = gate
        self.rulebook: str | None = None  # "exact" | "submanifold"; None: default_rulebook()
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, std=0.01)

    def unit_costs(self) -> tuple[int, int]:
        """MACs per pixel of (conv1 + norm1, conv2 + norm2)."""
        return (
            self.conv1.macs_per_pixel() + self.norm1.macs_per_pixel(),
            self.conv2.macs_per_pixel() + self.norm2.macs_per_pixel(),
        )

    def gate_and_masks(
        self, s: torch.Tensor, conv_out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gate ``g`` (N, G, *spatial), its 3^ndim max-pool (conv1's gate, :func:`pool_gate`), conv2 pixels
        ``D`` and conv1 pixels ``dilate(D)`` (N, 1, *spatial). ``conv_out``: the gate conv of ``s``, when
        the caller has it."""
        g = _full_gate(s, self.gate, conv_out)
        pooled = pool_gate(g)
        # Gates are >= 0 and max-pooling pads with -inf: the pooled gate is positive exactly on dilate(D).
        return g, pooled, gate_mask(g), gate_mask(pooled)

    def dense(self, s: torch.Tensor, g: torch.Tensor, inner: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
        conv = _conv_nd(self.ndim)
        h = conv(s, self.conv1.dense_weight(), padding=1)
        h = F.relu(self.norm1.forward_dense(h, outer)) * outer
        h = conv(h, self.conv2.dense_weight(), padding=1)
        h = self.norm2.forward_dense(h, inner)
        return F.relu(s + expand_gate(g, s.shape[1]) * h)

    def sparse(
        self, s: torch.Tensor, g: torch.Tensor, inner: torch.Tensor, outer: torch.Tensor, overwrite: bool = False
    ) -> torch.Tensor:
        """The depth path at its active pixels only; the rest of the map passes through ``relu``.

        ``overwrite``: the caller owns ``s`` and will not read it again, so without autograd the output
        may be written into it (saves allocating and faulting in one map per level).
        """
        s = channels_last(s)
        if not bool(outer.any()):
            return _relu_map(s, overwrite)
        method = self.rulebook or default_rulebook(s.device, s.dtype)
        if method == "exact":
            return self._sparse_exact(s, g, inner, outer, overwrite)
        return self._sparse_submanifold(s, g, inner, outer, overwrite)

    def _sparse_exact(
        self, s: torch.Tensor, g: torch.Tensor, inner: torch.Tensor, outer: torch.Tensor, overwrite: bool
    ) -> torch.Tensor:
        """conv1 exactly at dilate(D) reading the map's rows in place, conv2 exactly at D (CPU default)."""
        n, c = s.shape[:2]
        rows = to_rows(s)
        with record_function("sparsehead.gather"):
            grid = grid_of(s)
            sites1, sites2 = grid.sites(outer), grid.sites(inner)
            flat2 = grid.rows(sites2)
            table1 = grid.table(sites1)
            table2 = grid.table(sites2, grid.lookup(sites1))
            batch1 = grid.images(grid.rows(sites1)) if n > 1 else None
            batch2 = grid.images(flat2) if n > 1 else None
        with record_function("sparsehead.depth_conv"):
            h = gather_conv(rows, self.conv1.weight, table1)
            h = _relu_rows(self.norm1.forward_rows(h, batch1, n, overwrite=True))
            h = gather_conv(h, self.conv2.weight, table2)
            h = self.norm2.forward_rows(h, batch2, n, overwrite=True)
        with record_function("sparsehead.scatter"):
            return _relu_with_rows(s, rows, flat2, h * expand_gate(to_rows(g).index_select(0, flat2), c), overwrite)

    def _sparse_submanifold(
        self, s: torch.Tensor, g: torch.Tensor, inner: torch.Tensor, outer: torch.Tensor, overwrite: bool
    ) -> torch.Tensor:
        """Both convs as spconv submanifold convs on dilate(dilate(D)), one shared rulebook (any device)."""
        n, c, *size = s.shape
        with record_function("sparsehead.gather"):
            idx = mask_indices(dilate(outer))
            rows = to_rows(s)
            flat = flat_index(idx, size)
            batch = idx[:, 0].long()
            in_outer = outer.reshape(-1).index_select(0, flat)
            in_inner = inner.reshape(-1).index_select(0, flat)
            x = spconv.SparseConvTensor(rows.index_select(0, flat), idx, size, n)
        with record_function("sparsehead.depth_conv"):
            h = self.conv1(x)  # submanifold: rows stay aligned with idx
            h1 = F.relu(self.norm1.forward_rows(h.features, batch, n, in_outer)) * in_outer[:, None]
            h = self.conv2(h.replace_feature(h1))  # same indice_key: the rulebook is reused
            h2 = self.norm2.forward_rows(h.features, batch, n, in_inner)
        with record_function("sparsehead.scatter"):
            keep = in_inner.nonzero()[:, 0]
            flat = flat.index_select(0, keep)
            gate_rows = expand_gate(to_rows(g).index_select(0, flat), c)
            return _relu_with_rows(s, rows, flat, h2.index_select(0, keep) * gate_rows, overwrite)


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
        name: a unique prefix for this router's spconv rulebook key.

    ``forward(features, overwrite_inputs=False)`` takes a list of (N, C, *spatial_l) maps, finest first,
    and returns the list of outputs with the same shapes (with ``overwrite_inputs`` the caller hands the
    maps over: without autograd they may be overwritten, as :class:`~sparsehead.modeling.tower.DynamicTower`
    does with the maps between its routers); it sets ``last_cost`` (see :mod:`sparsehead.modeling.cost`). With
    ``keep_gates = True`` it also keeps the gates it computed, detached, in ``last_gates``:
    ``{"down": {source_level: (N, G, *spatial)}, "up": {...}, "depth": {level: ...}}`` (a "down" unit at
    level l feeds level l + 1, an "up" unit feeds l - 1).
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
        name: str = "router",
    ) -> None:
        super().__init__()
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
        self.down = ScaleUnit(channels, ndim, gn_groups, make_gate())
        self.up = ScaleUnit(channels, ndim, gn_groups, make_gate())
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

    def _sparse_here(self, mask: torch.Tensor) -> bool:
        if self.execution == "auto":
            # Thresholds 0 and 1 decide without reading the mask (no host sync on CUDA): at 0 only a path
            # with nothing active would run sparse, and dense computes the same for it.
            if self.auto_threshold <= 0 or self.auto_threshold >= 1:
                return self.auto_threshold >= 1
            return bool(mask.float().mean() <= self.auto_threshold)
        return self.execution == "sparse"

    def _fuse_depth_gate(self, x: torch.Tensor) -> bool:
        """Whether the depth gate's conv is taken from the scale gates' matrix product (CPU, sparse and auto
        modes; a level whose scale units ran dense falls back to the gate conv of the node sum)."""
        return self.gated and self.execution != "dense" and x.device.type == "cpu"

    def _scale_gates(
        self, x: torch.Tensor, units: Sequence[ScaleUnit]
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Gates (N, G, *spatial) of the scale units that read ``x``, one conv for all when gated; and,
        where :meth:`_fuse_depth_gate`, the depth gate's per-tap products of ``x`` (N, G · 3^ndim, *spatial)
        from the same matrix product (see :meth:`_depth_gate_conv`), else None."""
        if not self.gated:
            return [_full_gate(x, None) for _ in units], None
        scale_gates = [u.gate for u in units]
        if self._fuse_depth_gate(x):
            taps = conv_taps(x, torch.cat([g.conv.weight for g in scale_gates] + [self.depth.gate.conv.weight]))
            k = sum(g.num_groups for g in scale_gates) * 3**self.ndim
            depth_taps = taps[:, k:]
            gates = []
            if scale_gates:
                bias = torch.cat([g.conv.bias for g in scale_gates])
                gates = gates_from_conv(scale_gates, x, sum_taps(taps[:, :k], bias))
        else:
            gates, depth_taps = apply_gates(scale_gates, x), None
        gates = [g.expand(-1, -1, *x.shape[2:]) if u.gate.coarse else g for u, g in zip(units, gates)]
        return gates, depth_taps

    def _depth_gate_conv(
        self, depth_taps: torch.Tensor, rows_in: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """The depth gate's conv of the node sum ``s = output_weight · x + Σ rows`` without reading ``s``:
        the gate conv is linear, so its per-tap products are ``output_weight ·`` those of ``x`` (from
        :meth:`_scale_gates`) plus those of the scale rows ``rows_in`` ((row numbers, rows already times
        ``scale_weight``)) added at their pixels. Returns (N, G, *spatial) as ``gate_conv(s)``."""
        gate = self.depth.gate
        taps = (depth_taps.movedim(1, -1) * self.output_weight).contiguous()  # (N, *spatial, G · 3^ndim)
        tap_rows = taps.view(-1, taps.shape[-1])
        for flat, rows in rows_in:
            tap_rows.index_add_(0, flat, rows_taps(rows, gate.conv.weight))
        return sum_taps(taps.movedim(-1, 1), gate.conv.bias)

    def forward(self, features: Sequence[torch.Tensor], overwrite_inputs: bool = False) -> list[torch.Tensor]:
        device = features[0].device
        if autocast_enabled(device.type):
            # Mixed precision: the router runs in float32 with autocast off, so that all three modes compute
            # one function (masked statistics and row scatters need one dtype; spconv has no bfloat16).
            with torch.autocast(device.type, enabled=False):
                return self.forward([x.float() for x in features], overwrite_inputs)
        levels = len(features)
        n = features[0].shape[0]
        cost = _CostSum()
        kept: dict[str, dict[int, torch.Tensor]] = {"down": {}, "up": {}, "depth": {}}
        # Without autograd, a map this forward owns (handed over, or a layout copy made here) becomes its
        # level's node sum in place once the scale units have read it: no new map per level.
        owned = [overwrite_inputs and not torch.is_grad_enabled()] * levels
        if self.execution == "sparse":
            converted = [channels_last(x) for x in features]  # rows are views of channels-last maps
            owned = [
                own or (not torch.is_grad_enabled() and y.data_ptr() != x.data_ptr())
                for own, x, y in zip(owned, features, converted)
            ]
            features = converted

        # Scale units at their source levels; each returns dense maps or (indices, rows) contributions.
        dense_in: list[list[torch.Tensor]] = [[] for _ in range(levels)]
        depth_taps: list[torch.Tensor | None] = [None] * levels
        rows_in: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(levels)]
        for src, x in enumerate(features):
            units = [(u, dst) for u, dst in ((self.down, src + 1), (self.up, src - 1)) if 0 <= dst < levels]
            with record_function("sparsehead.gate"):
                gates, depth_taps[src] = self._scale_gates(x, [u for u, _ in units])
            for (unit, dst), g in zip(units, gates):
                mask = gate_mask(g)
                if self.keep_gates:
                    kept["down" if unit is self.down else "up"][src] = g.detach()
                cost.path(g, mask, unit.macs_per_pixel())
                if unit.gate is not None:
                    cost.always(unit.gate.macs_per_pixel() * mask[0].numel())
                dst_size = tuple(features[dst].shape[2:])
                with record_function("sparsehead.scale"):
                    if self._sparse_here(mask):
                        x = channels_last(x)  # once per level; a no-op in sparse mode
                        size = tuple(x.shape[2:])
                        # Node-sum weight, and the block mean of downsampling, applied to the gate values.
                        weight = self.scale_weight * (1.0 / 2**self.ndim if dst > src else 1.0)
                        flat, rows = unit.sparse(x, g, mask, weight)
                        if flat.shape[0]:
                            if dst > src:
                                rows_in[dst].append((downsample_parents(flat, n, size), rows))
                            else:
                                rows_in[dst].append(upsample_rows(flat, rows, n, size, dst_size))
                    else:
                        u = unit.dense(x, g, mask)
                        dense_in[dst].append(downsample(u) if dst > src else upsample(u, dst_size))

        outputs = []
        for lvl, x in enumerate(features):
            with record_function("sparsehead.scatter"):
                s = x.mul_(self.output_weight) if owned[lvl] else self.output_weight * x
                for u in dense_in[lvl]:
                    s = s + self.scale_weight * u
                scaled, rows_in[lvl] = rows_in[lvl], []  # rows already times scale_weight
                if scaled:
                    s = channels_last(s)  # a fresh tensor: adding into it in place is safe
                    for flat, rows in scaled:
                        to_rows(s).index_add_(0, flat, rows)
            with record_function("sparsehead.gate"):
                fused = depth_taps[lvl] is not None and not dense_in[lvl]
                conv_out = self._depth_gate_conv(depth_taps[lvl], scaled) if fused else None
                depth_taps[lvl] = None
                g, pooled, inner, outer = self.depth.gate_and_masks(s, conv_out)
            if self.keep_gates:
                kept["depth"][lvl] = g.detach()
            conv1_macs, conv2_macs = self.depth.unit_costs()
            cost.path(pooled, outer, conv1_macs)
            cost.path(g, inner, conv2_macs)
            if self.depth.gate is not None:
                cost.always(self.depth.gate.macs_per_pixel() * inner[0].numel())
            if self._sparse_here(outer):
                outputs.append(self.depth.sparse(s, g, inner, outer, overwrite=True))  # s is this forward's own
            else:
                with record_function("sparsehead.depth_conv"):
                    outputs.append(self.depth.dense(s, g, inner, outer))
        self.last_cost = cost.total(n, device)
        self.last_gates = kept if self.keep_gates else {}
        return outputs
