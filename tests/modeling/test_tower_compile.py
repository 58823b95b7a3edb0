"""torch.compile of the gated dense mode: one graph (no graph break), forward and backward, 2D and 3D."""
from __future__ import annotations

import pytest
import torch

import sparsehead
from sparsehead.layers.gates import SpatialGate


def _pyramid(ndim: int, channels: int) -> list[torch.Tensor]:
    size = (6, 12, 12) if ndim == 3 else (24, 32)
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(3):
        out.append(torch.randn(2, channels, *size, generator=gen, requires_grad=True))
        size = tuple((s + 1) // 2 for s in size)
    return out


def _switch_some_gates_off(tower: torch.nn.Module) -> None:
    """Random gate convs with zero bias: GeReTanH is exactly 0 at about half of the pixels."""
    for m in tower.modules():
        if isinstance(m, SpatialGate):
            torch.nn.init.normal_(m.conv.weight, std=0.5)
            torch.nn.init.zeros_(m.conv.bias)


@pytest.mark.parametrize("ndim", [2, 3])
def test_dense_tower_compiles_to_one_graph(ndim):
    torch.manual_seed(0)
    tower = sparsehead.DynamicTower(8, 2, ndim=ndim, num_levels=3, gn_groups=4, execution="dense").train()
    _switch_some_gates_off(tower)  # the masked norms see partial masks, as after training
    feats = _pyramid(ndim, 8)
    with torch.no_grad():
        tower.routers[0].keep_gates = True
        tower(feats)
        tower.routers[0].keep_gates = False
        assert 0.2 < float((tower.routers[0].last_gates["depth"][0] > 0).float().mean()) < 0.8

    explained = torch._dynamo.explain(tower)(feats)
    assert explained.graph_break_count == 0 and explained.graph_count == 1

    # Forward and backward through one captured graph (fullgraph raises at any graph break).
    compiled = torch.compile(tower, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (tower, compiled):
        tower.zero_grad(set_to_none=True)
        for x in feats:
            x.grad = None
        y = fn(feats)
        sum((o * torch.linspace(0, 1, o.numel()).view_as(o)).sum() for o in y).backward()
        grads = {k: p.grad.clone() for k, p in tower.named_parameters() if p.grad is not None}
        results.append(([o.detach() for o in y] + [x.grad.clone() for x in feats], grads))
    torch._dynamo.reset()
    (eager, eager_grads), (comp, comp_grads) = results
    for a, b in zip(eager, comp):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert comp_grads.keys() == eager_grads.keys()
    assert any(k.endswith("gate.conv.weight") for k in eager_grads)  # gradients reach the gates
    for k, g in eager_grads.items():
        torch.testing.assert_close(comp_grads[k], g, rtol=1e-4, atol=1e-5)
