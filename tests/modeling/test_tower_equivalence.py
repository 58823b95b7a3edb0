"""The sparse execution mode computes the same function as the dense one, forward and backward, and both
compute the router's equations (an independent per-level reference, :mod:`router_reference`)."""
from __future__ import annotations

import pytest
import torch
from router_reference import reference_tower
from tower_weights import randomise

from sparsehead import DynamicTower, SpatialGate, collect_cost
from sparsehead.layers.sites import SiteRows
from sparsehead.modeling.router import DepthPath, Router, ScaleUnit


def _use_rulebook(tower: DynamicTower, rulebook: str) -> None:
    for m in tower.modules():
        if isinstance(m, DepthPath):
            m.rulebook = rulebook


def _pattern(shape: torch.Size, density: float | list[float], seed: int) -> torch.Tensor:
    """A fixed 0/1 mask of ``shape`` (N, G, *spatial): per image, the given active fraction."""
    gen = torch.Generator().manual_seed(seed + sum(shape))
    n = shape[0]
    per_image = density if isinstance(density, list) else [density] * n
    rand = torch.rand(shape, generator=gen)
    out = torch.stack([(rand[i] < d).float() for i, d in enumerate(per_image)])
    return out


def _one_pixel(shape: torch.Size) -> torch.Tensor:
    out = torch.zeros(shape)
    out[(0, 0) + tuple(s // 2 for s in shape[2:])] = 1.0
    return out


def _control_gates(tower: DynamicTower, make_mask) -> None:
    """Multiply every gate by a fixed mask: exact control of where paths run, gradients still flow.

    ``make_mask((N, G, *spatial), i)`` gives gate ``i``'s mask for one level; a gate run on packed rows gets
    each level's mask read at the level's rows."""

    def hook(mod, inp, out, i):
        x = inp[0]
        if isinstance(x, SiteRows):
            lay = x.layout
            mask = lay.pack_levels([make_mask(torch.Size((lay.batch, out.shape[1], *s)), i) for s in lay.shapes])
        else:
            mask = make_mask(out.shape, i)
        return out * mask.to(out)

    for i, gate in enumerate(m for m in tower.modules() if isinstance(m, SpatialGate)):
        gate.register_forward_hook(lambda mod, inp, out, i=i: hook(mod, inp, out, i))


def _run(tower: DynamicTower, feats: list[torch.Tensor], mode: str):
    """Outputs, input and parameter gradients and cost of ``mode`` (``reference``: the per-level equations)."""
    tower.zero_grad()
    xs = [f.clone().requires_grad_() for f in feats]
    if mode == "reference":
        out, cost = reference_tower(tower, xs)
    else:
        tower.set_execution(mode)
        out = tower(xs)
        cost = collect_cost(tower)
    loss = sum((o * torch.cos(o + k)).sum() for k, o in enumerate(out)) + cost.budget_loss(10.0)
    loss.backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in tower.named_parameters()}
    return [o.detach() for o in out], [x.grad for x in xs], grads, cost


def _assert_close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-6)
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"{what}: max |dense - sparse| = {err:.3g} (scale {scale:.3g})"


def _default_dtype(tower: DynamicTower, device: torch.device | str) -> torch.dtype:
    """float64 where every sparse conv runs on torch ops (CPU, or the ``exact`` rulebook on CUDA);
    float32 where spconv's CUDA kernels run (they have no float64)."""
    if torch.device(device).type == "cpu":
        return torch.float64
    paths = [m for m in tower.modules() if isinstance(m, DepthPath)]
    return torch.float64 if all(p.rulebook == "exact" for p in paths) else torch.float32


def _check_equivalence(
    tower: DynamicTower, feats: list[torch.Tensor], modes=("dense", "sparse"), dtype=None, params=True,
    device: torch.device | str = "cpu",
):
    """Compare outputs, input and parameter gradients and costs of the reference and of ``modes`` against
    ``modes[0]``.

    float64 by default, so that sums with cancellation (a gate bias gradient adds up thousands of
    terms) do not hide a real difference behind rounding; float32 runs (spconv on CUDA) compare
    parameter gradients at 1e-3 of their largest entry instead of 1e-4.
    """
    dtype = dtype or _default_dtype(tower, device)
    tower.to(device, dtype)
    feats = [f.to(device, dtype) for f in feats]
    param_tol = 1e-4 if dtype == torch.float64 else 1e-3
    ref = _run(tower, feats, modes[0])
    for mode in ("reference",) + tuple(modes[1:]):
        got = _run(tower, feats, mode)
        for i, (a, b) in enumerate(zip(ref[0], got[0])):
            assert a.shape == b.shape == feats[i].shape
            _assert_close(a, b, f"{mode} output level {i}")
        for i, (a, b) in enumerate(zip(ref[1], got[1])):
            _assert_close(a, b, f"{mode} input gradient level {i}")
        for name in ref[2] if params else []:
            _assert_close(ref[2][name], got[2][name], f"{mode} gradient of {name}", param_tol)
        for field in ("soft", "realized", "full"):
            _assert_close(getattr(ref[3], field), getattr(got[3], field), f"{mode} cost.{field}")
    return ref


DENSITIES = {
    "none": lambda shape, i: torch.zeros(shape),
    "one_pixel": lambda shape, i: _one_pixel(shape),
    "sparse": lambda shape, i: _pattern(shape, 0.1, i),
    "half": lambda shape, i: _pattern(shape, 0.5, i),
    "full": lambda shape, i: torch.ones(shape),
    "mixed_batch": lambda shape, i: _pattern(shape, [0.95, 0.03], i),
}


@pytest.mark.parametrize("rulebook", ["exact", "submanifold"])
@pytest.mark.parametrize("density", list(DENSITIES))
def test_2d_tower_dense_equals_sparse(make_pyramid, density, rulebook, device):
    torch.manual_seed(0)
    tower = DynamicTower(16, 2, ndim=2, gn_groups=4, num_levels=4)
    _use_rulebook(tower, rulebook)
    randomise(tower, seed=1)
    _control_gates(tower, DENSITIES[density])
    feats = make_pyramid(2, 16, (13, 19), 4, seed=2)  # odd sizes: 13×19 → 7×10 → 4×5 → 2×3
    out, _, grads, cost = _check_equivalence(tower, feats, device=device)
    if density == "none":
        # Nothing runs but the ungated work: the realised cost is the gate convs only.
        gates = [m for m in tower.modules() if isinstance(m, SpatialGate)]
        assert torch.all(cost.soft == 0) or torch.all(cost.realized < cost.full)
        assert all(g.conv.weight.grad is None or torch.all(g.conv.weight.grad == 0) for g in gates)


@pytest.mark.parametrize("gather_fraction", [0.0, 1.0])
@pytest.mark.parametrize("ndim", [2, 3])
def test_scale_units_gathered_or_full_map_depthwise_agree(make_pyramid, gather_fraction, ndim, monkeypatch, device):
    """Both ways the sparse mode runs a scale unit's depthwise conv compute the dense function."""
    monkeypatch.setattr(ScaleUnit, "gather_fraction", gather_fraction)
    tower = DynamicTower(8, 1, ndim=ndim, gn_groups=2, num_levels=3)
    randomise(tower, seed=3)
    _control_gates(tower, DENSITIES["mixed_batch"])
    size = (9, 11) if ndim == 2 else (5, 6, 7)
    _check_equivalence(tower, make_pyramid(2, 8, size, 3, seed=4), device=device)


def test_2d_natural_gates_without_control(make_pyramid, device):
    """Gates computed by the model itself (no mask): roughly half the pixels active."""
    tower = DynamicTower(16, 3, ndim=2, gn_groups=8, num_levels=5)
    randomise(tower, seed=3)
    with torch.no_grad():
        for m in tower.modules():
            if isinstance(m, SpatialGate):
                m.conv.bias.fill_(0.0)
    feats = make_pyramid(2, 16, (21, 17), 5, seed=4)
    _, _, _, cost = _check_equivalence(tower, feats, device=device)
    ratio = (cost.realized / cost.full).tolist()
    assert all(0.2 < r < 0.95 for r in ratio), ratio


@pytest.mark.parametrize("rulebook", ["exact", "submanifold"])
@pytest.mark.parametrize("density", ["none", "one_pixel", "half", "full", "mixed_batch"])
def test_3d_tower_dense_equals_sparse(make_pyramid, density, rulebook, device):
    tower = DynamicTower(8, 2, ndim=3, gn_groups=2, num_levels=3)
    _use_rulebook(tower, rulebook)
    randomise(tower, seed=5)
    _control_gates(tower, DENSITIES[density])
    feats = make_pyramid(2, 8, (7, 6, 5), 3, seed=6)
    _check_equivalence(tower, feats, device=device)


@pytest.mark.parametrize("densities", [(0.1, 0.6, 0.9), (0.6, 0.1, 0.9), (0.0, 0.2, 0.5)])
def test_auto_mode_equals_dense(make_pyramid, densities, device):
    """Per gate (down, up, depth) a different density, so that auto mixes sparse and dense paths within one
    forward: either scale unit alone at its active rows (the other at every pixel, or off)."""
    tower = DynamicTower(16, 2, gn_groups=4, num_levels=4, auto_threshold=0.3)
    randomise(tower, seed=7)
    _control_gates(tower, lambda shape, i: _pattern(shape, densities[i % 3], i))
    feats = make_pyramid(2, 16, (13, 11), 4, seed=8)
    _check_equivalence(tower, feats, modes=("dense", "sparse", "auto"), device=device)


@pytest.mark.parametrize("threshold, runs", [(0.0, "dense"), (1.0, "sparse")])
def test_auto_thresholds_zero_and_one_run_one_mode(make_pyramid, monkeypatch, threshold, runs):
    """auto at threshold 0 runs every path at all rows without reading a count from the device (an empty
    path included), at 1 every path at its active rows."""
    tower = DynamicTower(16, 2, gn_groups=4, num_levels=3, execution="auto", auto_threshold=threshold)
    randomise(tower, seed=7)
    _control_gates(tower, lambda shape, i: _pattern(shape, [0.0, 0.5, 1.0][i % 3], i))
    plans = []
    original = Router._plan
    monkeypatch.setattr(Router, "_plan", lambda self, *a: plans.extend(original(self, *a)) or plans[-len(a[2]):])
    with torch.no_grad():
        tower(make_pyramid(1, 16, (9, 8), 3, seed=8))
    assert plans and {"dense" if full else "sparse" for full, _ in plans} == {runs}
    if runs == "dense":
        assert all(counts is None for _, counts in plans)  # nothing was read


@pytest.mark.parametrize("options", [
    {"gate_groups": 4},
    {"coarse_gate": True},
    {"gate_activation": "sigmoid"},
    {"gate_activation": "softmax", "gate_groups": 2, "gate_init": 0.3},
    {"gated": False},
])
def test_gate_variants_dense_equals_sparse(make_pyramid, options, device):
    tower = DynamicTower(16, 2, gn_groups=4, num_levels=3, **options)
    randomise(tower, seed=9)
    if options.get("gated", True):
        with torch.no_grad():
            for m in tower.modules():
                if isinstance(m, SpatialGate):
                    m.conv.bias.fill_(0.0)
    feats = make_pyramid(2, 16, (9, 10), 3, seed=10)
    _check_equivalence(tower, feats, device=device)


def test_switching_modes_keeps_weights_and_is_reversible(make_pyramid):
    tower = DynamicTower(16, 1, gn_groups=4, num_levels=3)
    randomise(tower, seed=11)
    feats = make_pyramid(1, 16, (8, 8), 3)
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    tower.set_execution("sparse")
    assert all(r.execution == "sparse" for r in tower.routers)
    with torch.no_grad():
        a = tower(feats)
        tower.set_execution("dense")
        b = tower(feats)
    assert tower.execution == "dense"
    for x, y in zip(a, b):
        _assert_close(x, y, "output")
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())


def test_float32_dense_equals_sparse(make_pyramid, device):
    tower = DynamicTower(32, 2, gn_groups=8, num_levels=5)
    randomise(tower, seed=12)
    _control_gates(tower, lambda shape, i: _pattern(shape, [0.3, 0.7], i))
    feats = make_pyramid(2, 32, (25, 38), 5, seed=13)
    _check_equivalence(tower, feats, dtype=torch.float32, params=False, device=device)


@pytest.mark.parametrize("rulebook", ["exact", "submanifold"])
def test_inference_without_autograd_matches_and_leaves_inputs_untouched(make_pyramid, rulebook, device):
    """Without autograd the routers write into maps they own (the maps between a tower's routers, layout
    copies), never into the tower's inputs."""
    tower = DynamicTower(16, 2, gn_groups=4, num_levels=4)
    _use_rulebook(tower, rulebook)
    randomise(tower, seed=14)
    # Levels with no, few and many active pixels (the inactive one takes the relu-only branch).
    _control_gates(tower, lambda shape, i: _pattern(shape, [0.0, 0.2, 0.8][i % 3], i))
    tower.to(device)
    feats = [f.to(device) for f in make_pyramid(2, 16, (13, 11), 4, seed=15)]
    originals = [f.clone() for f in feats]
    tower.set_execution("dense")
    reference = tower(feats)
    for mode in ("dense", "sparse", "auto"):
        tower.set_execution(mode)
        with torch.no_grad():
            out = tower(feats)
        for f, o in zip(feats, originals):
            assert torch.equal(f, o)
        for x, y in zip(out, reference):
            _assert_close(x, y.detach(), f"{mode} output")
        assert len({o.data_ptr() for o in out} | {f.data_ptr() for f in feats}) == 2 * len(feats)


@pytest.mark.parametrize("mode", ["dense", "sparse", "auto"])
def test_router_overwrites_handed_over_rows_only_without_autograd(make_pyramid, mode, device):
    tower = DynamicTower(16, 1, gn_groups=4, num_levels=3, execution=mode)
    randomise(tower, seed=16)
    _control_gates(tower, lambda shape, i: _pattern(shape, [0.2, 0.6, 1.0][i % 3], i))
    router = tower.routers[0].to(device)
    feats = [f.to(device) for f in make_pyramid(1, 16, (12, 10), 3, seed=17)]
    originals = [f.clone() for f in feats]
    reference = router(feats)
    assert all(torch.equal(f, o) for f, o in zip(feats, originals))  # maps are packed: never overwritten
    rows = SiteRows.from_maps(feats)
    before = rows.buf.clone()
    again = router(rows, overwrite_inputs=True)  # autograd on: nothing is overwritten
    assert torch.equal(rows.buf, before) and again.buf.data_ptr() != rows.buf.data_ptr()
    with torch.no_grad():
        handed = router(rows, overwrite_inputs=True)
    assert handed.buf.data_ptr() == rows.buf.data_ptr()  # the rows were reused
    for x, y, z in zip(reference, again.to_maps(), handed.to_maps()):
        _assert_close(y, x, f"{mode} output")
        _assert_close(z, x.detach(), f"{mode} output")


@pytest.mark.parametrize("mode", ["dense", "sparse", "auto"])
def test_autocast_runs_routers_in_float32(make_pyramid, mode, device):
    """Under autocast the routers compute the float32 function of their (low-precision) inputs, in every
    mode, and backpropagate."""
    tower = DynamicTower(16, 2, gn_groups=4, num_levels=3, execution=mode)
    randomise(tower, seed=18)
    tower.to(device)
    _control_gates(tower, lambda shape, i: _pattern(shape, [0.2, 0.6][i % 2], i))
    low = torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16
    feats = [f.to(device, low) for f in make_pyramid(2, 16, (12, 10), 3, seed=19)]
    with torch.no_grad():
        reference = tower([f.float() for f in feats])
    with torch.autocast(torch.device(device).type, dtype=low):
        out = tower(feats)
    for a, b in zip(out, reference):
        assert a.dtype == torch.float32
        _assert_close(a.detach(), b, f"{mode} autocast output", 1e-6)
    sum(o.sum() for o in out).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tower.routers[0].depth.parameters())


def test_single_level_and_any_number_of_levels(make_pyramid, device):
    """Without ``num_levels`` a tower takes any number of levels; one level has no scale paths."""
    tower = DynamicTower(16, 2, gn_groups=4)
    randomise(tower, seed=20)
    _control_gates(tower, lambda shape, i: _pattern(shape, 0.4, i))
    for levels in (1, 3):
        _check_equivalence(tower, make_pyramid(2, 16, (11, 9), levels, seed=21), device=device)


def test_batch_of_four_with_very_different_densities(make_pyramid, device):
    tower = DynamicTower(16, 2, gn_groups=4, num_levels=3)
    randomise(tower, seed=22)
    _control_gates(tower, lambda shape, i: _pattern(shape, [0.0, 0.02, 0.5, 1.0], i))
    _check_equivalence(tower, make_pyramid(4, 16, (12, 13), 3, seed=23), device=device)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("resample, scale_bias", [("bilinear", True), ("bilinear", False), ("pool", True)])
def test_resampling_and_scale_bias_options(make_pyramid, ndim, resample, scale_bias, device):
    """The reference's choices (bilinear/trilinear resampling with aligned corners, a bias in the scale units'
    depthwise convs) hold the dense == sparse == reference equivalence, odd sizes and mixed densities."""
    tower = DynamicTower(16, 2, ndim=ndim, gn_groups=4, resample=resample, scale_bias=scale_bias)
    randomise(tower, seed=24)
    _control_gates(tower, lambda shape, i: _pattern(shape, [0.9, 0.05], i))
    size = (13, 19) if ndim == 2 else (7, 6, 5)
    _check_equivalence(tower, make_pyramid(2, 16, size, 3, seed=25), modes=("dense", "sparse", "auto"), device=device)
