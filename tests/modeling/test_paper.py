"""The paper's equations and cost convention, written out here, against the library's router and costs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from router_reference import reference_tower

from sparsehead import DynamicTower, SpatialGate, collect_cost
from sparsehead.layers.sites import SiteRows


def _set_weights(tower: DynamicTower, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if name.endswith("scale_weight"):
                p.fill_(0.7)
            elif name.endswith("output_weight"):
                p.fill_(0.8)
            elif "gate.conv.bias" in name:
                p.fill_(2.0)  # with small gate weights every gate is on
            elif "gate.conv.weight" in name:
                p.copy_(0.01 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _geretanh(x: torch.Tensor, tau: float = 1.5) -> torch.Tensor:
    t = math.tanh(tau)
    return ((torch.tanh(x - tau) + t) / (1 + t)).clamp_min(0)


def test_router_computes_the_papers_equations_with_the_reference_choices():
    """One router, two levels, bilinear resampling, scale-unit bias, every gate on (so GroupNorm over the whole
    map, as the reference trains, equals the statistics over the computed pixels): the paper's equations."""
    torch.manual_seed(0)
    tower = DynamicTower(8, 1, gn_groups=2, resample="bilinear", scale_bias=True).double()
    _set_weights(tower, 1)
    r = tower.routers[0]
    x = [torch.randn(2, 8, 9, 11, dtype=torch.float64), torch.randn(2, 8, 5, 6, dtype=torch.float64)]

    def gate(unit_gate, v):  # g = GeReTanH(conv3x3(v) + b)
        return _geretanh(F.conv2d(v, unit_gate.conv.weight, unit_gate.conv.bias, padding=1))

    def scale_unit(unit, v):  # g ⊙ GN(dwconv(v) + bias)
        y = F.conv2d(v, unit.conv.weight, unit.conv.bias, padding=1, groups=8)
        return gate(unit.gate, v) * F.group_norm(y, 2, unit.norm.weight, unit.norm.bias, unit.norm.eps)

    def resize(v, size):
        return F.interpolate(v, size=size, mode="bilinear", align_corners=True)

    s = [r.output_weight * x[0] + r.scale_weight * resize(scale_unit(r.up, x[1]), (9, 11)),
         r.output_weight * x[1] + r.scale_weight * resize(scale_unit(r.down, x[0]), (5, 6))]
    d = r.depth
    expected = []
    for v in s:
        h = F.relu(F.group_norm(F.conv2d(v, d.conv1.dense_weight(), padding=1), 2, d.norm1.weight, d.norm1.bias))
        h = F.group_norm(F.conv2d(h, d.conv2.dense_weight(), padding=1), 2, d.norm2.weight, d.norm2.bias)
        expected.append(F.relu(gate(d.gate, v) * h + v))
    assert all(float(gate(d.gate, v).detach().min()) > 0 for v in s)  # every gate on: one statistic in every definition
    for mode in ("dense", "sparse"):
        tower.set_execution(mode)
        with torch.no_grad():
            out = tower(x)
        for a, b in zip(out, expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _hand_gates(tower: DynamicTower, values: dict) -> None:
    """Replace each gate's output by fixed per-level maps (packed for the rows)."""
    for gate, maps in values.items():
        gate.register_forward_hook(lambda m, inp, out, maps=maps: inp[0].layout.pack_levels(maps))


def test_paper_convention_on_a_tiny_tower_by_hand():
    """Two levels, one router, C = 4: the paper counts a scale unit as 19·C at every level where its gate is
    on (the unused down unit of the last level and up unit of the first included), the depth convs as
    9·C² + C, no gate convs; sparsehead's convention counts 10·C at the levels a unit feeds, and the gates."""
    tower = DynamicTower(4, 1, gn_groups=2)
    r = tower.routers[0]
    down0 = torch.zeros(1, 1, 4, 4)
    down0[0, 0, 0, 0], down0[0, 0, 3, 3] = 0.5, 0.25
    up1 = torch.ones(1, 1, 2, 2)
    d0 = torch.zeros(1, 1, 4, 4)
    d0[0, 0, 1, 1] = 0.5
    _hand_gates(tower, {
        r.down.gate: [down0, torch.full((1, 1, 2, 2), 0.5)],  # level 1's down unit (it would feed P8) is on
        r.up.gate: [torch.zeros(1, 1, 4, 4), up1],
        r.depth.gate: [d0, torch.zeros(1, 1, 2, 2)],
    })
    with torch.no_grad():
        tower([torch.randn(1, 4, 4, 4), torch.randn(1, 4, 2, 2)])
    paper, ours = collect_cost(tower, convention="paper"), collect_cost(tower)
    unit, depth = 19 * 4, 9 * 16 + 4
    assert paper.realized.item() == pytest.approx(unit * (2 + 4) + unit * 4 + depth * (9 + 1))
    assert paper.soft.item() == pytest.approx(unit * (0.75 + 2) + unit * 4 + depth * (9 * 0.5 + 0.5))
    assert paper.full.item() == pytest.approx((16 + 4) * (2 * unit + 2 * depth))
    gate = 4 * 9
    assert ours.realized.item() == pytest.approx(40 * 2 + 40 * 4 + depth * 10 + gate * (16 + 4 + 20))
    with pytest.raises(ValueError, match="convention"):
        collect_cost(tower, convention="flops")


def test_paper_convention_full_cost_of_a_d4_head_at_800x1216():
    """docs/paper_flops.md's worked example: a D4 head's towers on P3–P7 of 800×1216, 256 channels, full
    cost 8 · (2 · (9 · 256² + 256) + 2 · 19 · 256) · 20 267 MACs = 179.674 in the paper's units (/ 2^30)."""
    sizes = [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]
    feats = [torch.zeros(1, 256, h, w) for h, w in sizes]
    total = None
    for _ in range(2):  # classification and regression towers
        tower = DynamicTower(256, 4).eval()
        with torch.no_grad():
            for m in tower.modules():
                if isinstance(m, SpatialGate):
                    m.conv.bias.fill_(-5.0)  # everything off: the full cost does not depend on the gates
            tower(feats)
        cost = collect_cost(tower, convention="paper")
        total = cost if total is None else total + cost
    assert total.full.item() == pytest.approx(192_923_680_768, rel=1e-6)
    assert total.full.item() / 2**30 == pytest.approx(179.674, abs=1e-3)
    assert total.realized.item() == 0.0


def test_batch_padding_is_not_computed_and_costs_equal_each_image_alone(make_pyramid):
    """Two images of different sizes in one padded batch: outputs on each image's own pixels and its per-image
    costs (both conventions) equal those of the image evaluated alone; padding gets zeros and no work."""
    tower = DynamicTower(16, 2, gn_groups=4).double()
    torch.manual_seed(3)
    _set_weights(tower, 2)
    with torch.no_grad():
        for m in tower.modules():
            if isinstance(m, SpatialGate):
                m.conv.bias.fill_(0.0)
                m.conv.weight.normal_(0, 0.3)  # roughly half the pixels on
    feats = [f.double() for f in make_pyramid(2, 16, (13, 19), 4, seed=4)]
    valid = [(13, 19), (9, 11)]
    alone_sizes = [(9, 11), (5, 6), (3, 3), (2, 2)]
    for mode in ("dense", "sparse"):
        tower.set_execution(mode)
        with torch.no_grad():
            out = tower(feats, valid_sizes=valid)
            batch_cost, batch_paper = collect_cost(tower), collect_cost(tower, convention="paper")
            alone = tower([f[1:, :, :h, :w] for f, (h, w) in zip(feats, alone_sizes)])
            alone_cost, alone_paper = collect_cost(tower), collect_cost(tower, convention="paper")
        for o, a, (h, w) in zip(out, alone, alone_sizes):
            torch.testing.assert_close(o[1:, :, :h, :w], a)
            assert torch.all(o[1, :, h:] == 0) and torch.all(o[1, :, :, w:] == 0)
        for field in ("soft", "realized", "full"):
            torch.testing.assert_close(getattr(batch_cost, field)[1:], getattr(alone_cost, field))
            torch.testing.assert_close(getattr(batch_paper, field)[1:], getattr(alone_paper, field))
    # The reference with the valid regions as site masks agrees.
    sites = []
    for f in feats:
        m = torch.zeros(2, 1, *f.shape[2:], dtype=torch.bool)
        m[0] = True
        sites.append(m)
    size = list(valid[1])
    for m in sites:
        m[1, :, : size[0], : size[1]] = True
        size = [(s + 1) // 2 for s in size]
    tower.set_execution("sparse")
    with torch.no_grad():
        ref, _ = reference_tower(tower, feats, sites)
        out = tower(feats, valid_sizes=valid)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)


def test_rows_of_a_padded_batch_keep_their_layout_per_valid_size():
    rows = SiteRows.from_maps([torch.randn(2, 4, 6, 8), torch.randn(2, 4, 3, 4)], valid_sizes=[(6, 8), (5, 3)])
    assert rows.layout.valid is not None and int(rows.layout.valid.sum()) == 48 + 12 + 15 + 6
    with pytest.raises(ValueError, match="valid_sizes"):
        SiteRows.from_maps([torch.randn(2, 4, 6, 8)], valid_sizes=[(6, 8)])
