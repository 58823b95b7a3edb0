"""An independent reference of the dynamic head's router for the tests: the equations written out per level
with torch's dense ops (conv2d/conv3d, pooling, interpolation), on maps or on volumes with site masks.

It reads a :class:`~sparsehead.Router`'s weights and calls its gate modules on maps (so gate hooks apply),
and shares no code with the library's engine beyond the gate modules and ``resample_map`` (torch's
pooling and interpolation).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from sparsehead import DynamicTower
from sparsehead.layers.resample import resample_map
from sparsehead.modeling.cost import Cost


def _conv(x: torch.Tensor, weight: torch.Tensor, **kw) -> torch.Tensor:
    return (F.conv2d if x.dim() == 4 else F.conv3d)(x, weight, padding=1, **kw)


def _masked_group_norm(x: torch.Tensor, mask: torch.Tensor, norm) -> torch.Tensor:
    """GroupNorm of (N, C, *s) with statistics over ``mask`` (N, 1, *s) per image and group."""
    n, c = x.shape[:2]
    g = norm.num_groups
    xs = x.reshape(n, g, c // g, -1)
    m = mask.reshape(n, 1, 1, -1).to(x.dtype)
    count = (m.sum(dim=(2, 3)) * (c // g)).clamp_min(1.0)
    mean = (xs * m).sum(dim=(2, 3)) / count
    var = ((xs - mean[:, :, None, None]).square() * m).sum(dim=(2, 3)) / count
    out = (xs - mean[:, :, None, None]) * torch.rsqrt(var + norm.eps)[:, :, None, None]
    shape = (1, c) + (1,) * (x.dim() - 2)
    return out.reshape(x.shape) * norm.weight.view(shape) + norm.bias.view(shape)


def _gate(gate, x: torch.Tensor, sites: torch.Tensor) -> torch.Tensor:
    """Gates (N, G, *s) of ``x``, zero off ``sites``; a coarse gate averages its logits over the sites."""
    if gate is None:
        return sites.to(x.dtype)
    logits = _conv(x, gate.conv.weight, bias=gate.conv.bias)
    if gate.coarse:  # the mean over the sites, handed over constant so that the module's own mean keeps it
        w = sites.to(x.dtype)
        dims = tuple(range(2, x.dim()))
        logits = ((logits * w).sum(dims, keepdim=True) / w.sum(dims, keepdim=True).clamp_min(1.0)).expand_as(logits)
        return gate(x, conv_out=logits).expand(-1, -1, *x.shape[2:]) * sites
    return gate(x, conv_out=logits) * sites


def _expand(g: torch.Tensor, channels: int) -> torch.Tensor:
    return g.repeat_interleave(channels // g.shape[1], dim=1)


def reference_router(router, feats: Sequence[torch.Tensor], sites: Optional[Sequence[torch.Tensor]] = None):
    """Outputs (list of (N, C, *s)) and the :class:`Cost` of ``router`` on ``feats``; ``sites``: (N, 1, *s)
    bool per level (None: every pixel). Outputs are zero off the sites."""
    levels = len(feats)
    n = feats[0].shape[0]
    if sites is None:
        sites = [torch.ones(x.shape[0], 1, *x.shape[2:], dtype=torch.bool, device=x.device) for x in feats]
    feats = [x * m for x, m in zip(feats, sites)]
    units = router.unit_costs()
    gate_macs = units["gate"][0]
    soft = torch.zeros(n, dtype=torch.float64, device=feats[0].device)
    realised, full = soft.clone(), soft.clone()

    def count(m: torch.Tensor) -> torch.Tensor:
        return m.flatten(1).sum(1).double()

    def add(g: torch.Tensor, active: torch.Tensor, m: torch.Tensor, macs: int) -> None:
        nonlocal soft, realised, full
        soft = soft + (g.mean(dim=1, keepdim=True) * m).flatten(1).sum(1).double() * macs
        realised = realised + count(active & m) * macs
        full = full + count(m) * macs

    sums = [router.output_weight * x for x in feats]
    for src, (x, m) in enumerate(zip(feats, sites)):
        for unit, dst in ((router.down, src + 1), (router.up, src - 1)):
            if not 0 <= dst < levels:
                continue
            g = _gate(unit.gate, x, m)
            active = (g > 0).any(dim=1, keepdim=True) & m
            add(g, active, m, unit.macs_per_pixel())
            if unit.gate is not None:
                add(torch.ones_like(g[:, :1]), m, m, gate_macs)
            u = _conv(x, unit.conv.weight, bias=unit.conv.bias, groups=x.shape[1])
            u = _masked_group_norm(u, active, unit.norm) * _expand(g, x.shape[1])
            u = resample_map(u, feats[dst].shape[2:], router.resample, down=dst > src)
            sums[dst] = sums[dst] + router.scale_weight * u * sites[dst]
    outputs = []
    depth = router.depth
    conv1, conv2 = depth.unit_costs()
    for s, m in zip(sums, sites):
        g = _gate(depth.gate, s, m)
        inner = (g > 0).any(dim=1, keepdim=True) & m
        pool = F.max_pool2d if s.dim() == 4 else F.max_pool3d
        pooled = pool(g, 3, 1, 1) * m
        outer = (pool(inner.to(s.dtype), 3, 1, 1) > 0) & m
        add(pooled, outer, m, conv1)
        add(g, inner, m, conv2)
        if depth.gate is not None:
            add(torch.ones_like(g[:, :1]), m, m, gate_macs)
        h = _conv(s, depth.conv1.weight.movedim(-1, 1))
        h = F.relu(_masked_group_norm(h, outer, depth.norm1)) * outer
        h = _conv(h, depth.conv2.weight.movedim(-1, 1))
        h = _masked_group_norm(h, inner, depth.norm2)
        outputs.append(F.relu(s + _expand(g, s.shape[1]) * h) * m)
    return outputs, Cost(soft.float(), realised.float(), full.float())


def reference_tower(tower: DynamicTower, feats: Sequence[torch.Tensor], sites=None):
    """Every router of ``tower`` in turn (:func:`reference_router`); returns the outputs and the summed cost."""
    total = None
    out = list(feats)
    for router in tower.routers:
        out, cost = reference_router(router, out, sites)
        total = cost if total is None else total + cost
    return out, total
