"""Collecting the gates of a dynamic head after a forward, and turning them into work maps.

Set ``keep_gates`` on the head's routers (:func:`keep_gates`) before a forward; afterwards each router
holds its gates in ``last_gates``. From them:

- :func:`work_maps` counts, per level and path kind, how many gated convolutions ran at each pixel,
  summed over all routers of both towers, with the MACs one such convolution costs at one pixel. With
  the dense work (gate convs, prediction convs) the counts reproduce the realised cost the head reports:
  ``realized_from_work(work_maps(head)) == collect_cost(head).realized``.
- :func:`gate_maps` averages the gate values per level (depth path, scale paths).
- :class:`ActiveStats` accumulates, over many forwards, the active fraction per router, level and path.

Where work runs (see :mod:`sparsehead.modeling.router`): a scale unit at the pixels of its source level
where its gate is positive in any group; the depth path's conv2 at ``D = {g_d > 0}`` and its conv1 at the
3×3 dilation of ``D``; every gate conv at every pixel of its level.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..layers.gates import gate_mask
from ..layers.sparse import dilate
from ..modeling.router import Router

__all__ = [
    "PATHS",
    "GATE_PATHS",
    "ActiveStats",
    "gate_maps",
    "head_routers",
    "keep_gates",
    "realized_from_work",
    "total_count",
    "work_maps",
]

PATHS = ("depth1", "depth2", "down", "up")
"""Gated convolutions counted by :func:`work_maps`: the depth path's conv1 and conv2, the scale units."""

GATE_PATHS = ("depth", "down", "up")
"""Gates kept by a router: the depth path's and the two scale units'."""


def head_routers(head: nn.Module) -> list[tuple[str, Router]]:
    """``(name, router)`` for every router of ``head``, e.g. ``("cls r0", ...)``, ``("reg r1", ...)``.

    Heads with ``cls_tower``/``reg_tower`` are named by tower and index; other routers by module path.
    """
    out: list[tuple[str, Router]] = []
    for attr, short in (("cls_tower", "cls"), ("reg_tower", "reg")):
        tower = getattr(head, attr, None)
        for i, router in enumerate(getattr(tower, "routers", ())):
            out.append((f"{short} r{i}", router))
    if not out:
        out = [(name, m) for name, m in head.named_modules() if isinstance(m, Router)]
    return out


@contextlib.contextmanager
def keep_gates(head: nn.Module) -> Iterator[None]:
    """Make every router of ``head`` keep its gates during the block; restores the previous setting."""
    routers = [r for _, r in head_routers(head)]
    before = [r.keep_gates for r in routers]
    for r in routers:
        r.keep_gates = True
    try:
        yield
    finally:
        for r, b in zip(routers, before):
            r.keep_gates = b


def _kept(head: nn.Module) -> list[tuple[str, Router]]:
    routers = head_routers(head)
    if not routers:
        raise ValueError(f"{type(head).__name__} has no routers: it has no gated paths to inspect")
    if any(not r.last_gates or not r.last_gates.get("depth") for _, r in routers):
        raise RuntimeError("no gates recorded: run a forward inside `with keep_gates(head):` first")
    return routers


def _unit_costs(routers: list[tuple[str, Router]]) -> dict[str, tuple[int, ...]]:
    costs = routers[0][1].unit_costs()
    for name, r in routers[1:]:
        if r.unit_costs() != costs:
            raise ValueError(f"router {name} costs {r.unit_costs()} per pixel, {routers[0][0]} {costs}")
    return costs


def work_maps(head: nn.Module) -> dict:
    """Per-pixel counts of the gated convolutions that ran in the last forward, and their MACs.

    Call after a forward run inside :func:`keep_gates`. Returns::

        {
          "levels": [{path: {"count": (N, H_l, W_l) float tensor, "macs": int} for path in PATHS}, ...],
          "dense": {"gate": (N,), "predict": (N,)},   # MACs per image
        }

    ``levels[l][path]["count"]`` is how many routers (over both towers) ran that convolution at each
    pixel of level ``l`` (a "down" unit at level l feeds l + 1, an "up" unit feeds l - 1; both count at
    the level they run on, so ``down`` is zero at the last level and ``up`` at the first);
    ``macs`` is its cost at one pixel. ``dense["gate"]`` is the gate convs (every pixel of every level,
    for each gate that exists), ``dense["predict"]`` the head's dense prediction convs. So
    ``Σ_l Σ_path Σ_pixels count · macs + dense["gate"] + dense["predict"]`` is the realised cost
    ``collect_cost(head).realized`` (see :func:`realized_from_work`).
    """
    routers = _kept(head)
    costs = _unit_costs(routers)
    first = routers[0][1].last_gates["depth"]
    num_levels = len(first)
    macs = {"depth1": costs["depth"][0], "depth2": costs["depth"][1], "down": costs["down"][0],
            "up": costs["up"][0]}
    levels = []
    for lvl in range(num_levels):
        g = first[lvl]
        zero = g.new_zeros((g.shape[0],) + tuple(g.shape[2:]), dtype=torch.float64)
        levels.append({p: {"count": zero.clone(), "macs": int(macs[p])} for p in PATHS})
    gates = torch.zeros(first[0].shape[0], dtype=torch.float64, device=first[0].device)
    for _, router in routers:
        kept = router.last_gates
        sites = kept["sites"]  # (N, 1, H, W): False on batch padding
        for lvl, g in kept["depth"].items():
            inner = gate_mask(g)
            levels[lvl]["depth2"]["count"] += inner[:, 0]
            levels[lvl]["depth1"]["count"] += (dilate(inner) & sites[lvl])[:, 0]
        for kind in ("down", "up"):
            for lvl, g in kept[kind].items():
                levels[lvl][kind]["count"] += gate_mask(g)[:, 0]
        num_gates = sum(sites[lvl].flatten(1).sum(1).double() for kind in GATE_PATHS for lvl in kept[kind])
        gates += num_gates * costs["gate"][0]
    pixels = sum(m.flatten(1).sum(1).double() for m in routers[0][1].last_gates["sites"].values())
    predictor = getattr(head, "_predictor_macs", None)
    if callable(predictor):
        predict = pixels * float(predictor())
    else:
        predict = torch.zeros_like(gates)
    return {"levels": levels, "dense": {"gate": gates, "predict": predict}}


def realized_from_work(work: dict) -> torch.Tensor:
    """Realised MACs per image (N,) float64 from :func:`work_maps`: counts × MACs plus the dense work."""
    total = work["dense"]["gate"] + work["dense"]["predict"]
    for level in work["levels"]:
        for entry in level.values():
            total = total + entry["count"].flatten(1).sum(dim=1) * entry["macs"]
    return total


def path_macs(work: dict) -> dict[str, torch.Tensor]:
    """Realised MACs per image (N,) for each path kind and the dense work, from :func:`work_maps`."""
    out = {p: sum(lv[p]["count"].flatten(1).sum(dim=1) * lv[p]["macs"] for lv in work["levels"]) for p in PATHS}
    out.update(work["dense"])
    return out


def total_count(work: dict, level: int, weighted: bool = False) -> torch.Tensor:
    """Gated convolutions run per pixel of ``level`` over all paths (N, H, W); MACs when ``weighted``."""
    entries = work["levels"][level].values()
    return sum(e["count"] * (e["macs"] if weighted else 1) for e in entries)


def max_count(head: nn.Module, level: int, num_levels: int) -> int:
    """Most gated convolutions that can run at one pixel of ``level`` (every gate on)."""
    scale = int(level < num_levels - 1) + int(level > 0)
    return len(head_routers(head)) * (2 + scale)


def gate_maps(head: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Mean gate value per pixel and level, (N, H_l, W_l) float32, averaged over routers and groups.

    ``{"depth": [...], "scale": [...]}``: the depth path's gate, and the gates of the scale units that
    run at that level (the "down" unit feeding l + 1 and the "up" unit feeding l - 1, averaged).
    """
    routers = _kept(head)
    num_levels = len(routers[0][1].last_gates["depth"])
    out: dict[str, list[torch.Tensor]] = {"depth": [], "scale": []}
    for lvl in range(num_levels):
        depth = [r.last_gates["depth"][lvl].float().mean(dim=1) for _, r in routers]
        scale = [r.last_gates[k][lvl].float().mean(dim=1) for _, r in routers for k in ("down", "up")
                 if lvl in r.last_gates[k]]
        out["depth"].append(torch.stack(depth).mean(dim=0))
        out["scale"].append(torch.stack(scale).mean(dim=0) if scale else torch.zeros_like(out["depth"][-1]))
    return out


class ActiveStats:
    """Active fraction of each gated path per router (rows) and level (columns), over many forwards.

    ``update(head)`` after each forward (inside :func:`keep_gates`) adds, per router, level and path kind
    in :data:`GATE_PATHS`, the pixels where the gate is positive and all pixels of that level (padding
    included: the head computes there too). ``fractions()`` returns ``{path: (rows, levels) array}``,
    NaN where a path does not exist (no "down" unit at the last level, no "up" unit at the first).
    """

    def __init__(self) -> None:
        self.rows: list[str] = []
        self.active: dict[str, np.ndarray] = {}
        self.total: dict[str, np.ndarray] = {}
        self.images = 0

    def update(self, head: nn.Module) -> None:
        routers = _kept(head)
        num_levels = len(routers[0][1].last_gates["depth"])
        if not self.rows:
            self.rows = [name for name, _ in routers]
            for p in GATE_PATHS:
                self.active[p] = np.zeros((len(routers), num_levels))
                self.total[p] = np.zeros((len(routers), num_levels))
        for i, (_, router) in enumerate(routers):
            for p in GATE_PATHS:
                for lvl, g in router.last_gates[p].items():
                    self.active[p][i, lvl] += float(gate_mask(g).sum())
                    self.total[p][i, lvl] += float(g.shape[0] * g[0, 0].numel())
        self.images += routers[0][1].last_gates["depth"][0].shape[0]

    def fractions(self) -> dict[str, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            return {p: np.where(self.total[p] > 0, self.active[p] / self.total[p], np.nan) for p in self.active}
