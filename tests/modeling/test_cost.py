"""Cost accounting checked against hand-computed MACs on a tiny example."""
import pytest
import torch

from sparsehead import DynamicTower, SpatialGate, collect_cost
from sparsehead.layers.sites import SiteRows
from sparsehead.modeling.cost import Cost


def _tiny_tower_with_fixed_gates():
    torch.manual_seed(0)
    tower = DynamicTower(4, 1, gn_groups=2, num_levels=2)
    router = tower.routers[0]
    fixed = {}
    # down unit runs on level 0 (4×4): two active pixels with gates 0.5 and 0.25
    g = torch.zeros(1, 1, 4, 4)
    g[0, 0, 0, 0], g[0, 0, 3, 3] = 0.5, 0.25
    fixed[router.down.gate] = [g, torch.ones(1, 1, 2, 2)]  # (level 1 has no coarser level: never counted)
    # up unit runs on level 1 (2×2): all active at 1.0
    fixed[router.up.gate] = [torch.ones(1, 1, 4, 4), torch.ones(1, 1, 2, 2)]  # (level 0: none finer)
    # depth gate: level 0 one pixel (1, 1) at 0.5; level 1 nothing
    d0 = torch.zeros(1, 1, 4, 4)
    d0[0, 0, 1, 1] = 0.5
    fixed[router.depth.gate] = [d0, torch.zeros(1, 1, 2, 2)]
    for gate, values in fixed.items():
        # The gates of every level at once: packed rows of the per-level maps.
        def hook(m, inputs, out, values=values):
            assert isinstance(inputs[0], SiteRows)
            return inputs[0].layout.pack_levels(values)

        gate.register_forward_hook(hook)
    return tower


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_cost_matches_hand_computation(mode):
    tower = _tiny_tower_with_fixed_gates()
    tower.set_execution(mode)
    tower([torch.randn(1, 4, 4, 4), torch.randn(1, 4, 2, 2)])
    cost = collect_cost(tower)
    # Per-pixel unit costs with C = 4, 3×3 kernels:
    scale_unit = 4 * 9 + 4  # depthwise conv + norm = 40
    depth_conv = 4 * 4 * 9 + 4  # conv + norm = 148 (twice in the bottleneck)
    gate_conv = 4 * 1 * 9  # 36, every pixel, ungated
    gate_pixels = 16 + 4 + 16 + 4  # down gate on level 0, up gate on level 1, depth gates on both
    # soft: down 0.75 * 40; up 4 * 40; depth level 0: max-pooled gate 0.5 on 9 pixels for conv1,
    # 0.5 on one pixel for conv2; gates count fully.
    soft = 0.75 * scale_unit + 4 * scale_unit + (9 * 0.5 + 0.5) * depth_conv + gate_pixels * gate_conv
    realized = 2 * scale_unit + 4 * scale_unit + (9 + 1) * depth_conv + gate_pixels * gate_conv
    full = 16 * scale_unit + 4 * scale_unit + (16 + 4) * 2 * depth_conv + gate_pixels * gate_conv
    assert cost.soft.item() == pytest.approx(soft)
    assert cost.realized.item() == pytest.approx(realized)
    assert cost.full.item() == pytest.approx(full)
    assert cost.budget_loss(0.1).item() == pytest.approx(0.1 * soft / full)


def test_budget_loss_is_mean_of_per_image_ratios():
    cost = Cost(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 4.0]), torch.tensor([4.0, 4.0]))
    assert cost.budget_loss(0.8).item() == pytest.approx(0.8 * (0.25 + 0.75) / 2)
    assert cost.ratio.tolist() == [0.5, 1.0]


def test_cost_is_replaced_not_accumulated():
    tower = DynamicTower(8, 2, gn_groups=4, num_levels=2)
    feats = [torch.randn(2, 8, 6, 6), torch.randn(2, 8, 3, 3)]
    tower(feats)
    first = collect_cost(tower)
    tower(feats)
    again = collect_cost(tower)
    assert torch.equal(first.full, again.full) and torch.allclose(first.soft, again.soft)
    assert first.full.shape == (2,)
    tower([f[:1] for f in feats])
    assert collect_cost(tower).full.shape == (1,)


def test_collect_cost_before_forward_is_an_error():
    with pytest.raises(RuntimeError, match="forward"):
        collect_cost(DynamicTower(8, 1, gn_groups=4))


def test_initial_gates_are_all_on_and_budget_gradient_reaches_gates():
    tower = DynamicTower(8, 1, gn_groups=4, num_levels=2, gate_init=0.99)
    tower([torch.randn(1, 8, 6, 6), torch.randn(1, 8, 3, 3)])
    cost = collect_cost(tower)
    assert cost.realized.item() == pytest.approx(cost.full.item())
    cost.budget_loss(1.0).backward()
    gates = [m for m in tower.modules() if isinstance(m, SpatialGate)]
    assert all(g.conv.bias.grad is not None and g.conv.bias.grad.item() > 0 for g in gates)
