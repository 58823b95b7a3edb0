"""A DynamicTower on SparseConvTensors: sparse == dense reference, index sets kept, costs, bad inputs."""
from __future__ import annotations

import math

import pytest
import spconv.pytorch as spconv
import torch
import torch.nn.functional as F
from router_reference import reference_tower
from tower_weights import randomise

from sparsehead import DynamicTower, SpatialGate, collect_cost
from sparsehead.layers.resample import half_size
from sparsehead.layers.sites import SiteRows
from sparsehead.modeling.router import Router
from sparsehead.modeling.sparse_input import forward_sparse

SHAPE = (12, 10, 8)


def _sizes(shape: tuple[int, ...], levels: int) -> list[list[int]]:
    sizes = [list(shape)]
    for _ in range(levels - 1):
        sizes.append(half_size(sizes[-1]))
    return sizes


def _masks(levels: int, occupancy=(0.15, 0.08), seed: int = 0, full: bool = False) -> list[torch.Tensor]:
    """Occupancy masks (N, *shape) bool per level; a coarse level keeps most parents of the finer voxels
    and adds a few voxels without children, so some contributions land outside the next index set."""
    gen = torch.Generator().manual_seed(seed)
    sizes = _sizes(SHAPE, levels)
    n = len(occupancy)
    if full:
        return [torch.ones(n, *s, dtype=torch.bool) for s in sizes]
    out = [torch.stack([torch.rand(sizes[0], generator=gen) < p for p in occupancy])]
    for s in sizes[1:]:
        parents = F.max_pool3d(out[-1][:, None].float(), 2, 2, ceil_mode=True)[:, 0] > 0
        keep = torch.rand(n, *s, generator=gen) < 0.7
        extra = torch.rand(n, *s, generator=gen) < 0.05
        out.append((parents & keep) | extra)
    return out


def _tensors(masks: list[torch.Tensor], channels: int, seed: int = 1, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for m in masks:
        idx = torch.nonzero(m).int().contiguous()
        feats = torch.randn(idx.shape[0], channels, generator=gen, dtype=dtype)
        out.append(spconv.SparseConvTensor(feats.to(device), idx.to(device), list(m.shape[1:]), m.shape[0]))
    return out


def _dtype(device: torch.device) -> torch.dtype:
    """float64 on CPU for tight comparisons; spconv's CUDA kernels have no float64."""
    return torch.float64 if device.type == "cpu" else torch.float32


def _control_gates(tower: DynamicTower, masks: list[torch.Tensor], pattern: str, seed: int = 3) -> None:
    """Multiply each gate by a fixed 0/1 volume per (gate, level); the hook sees (N, G, *shape) volumes in the
    reference and the packed rows of all levels in the engine (each level's volume read at its voxels)."""
    gates = [m for m in tower.modules() if isinstance(m, SpatialGate)]
    gen = torch.Generator().manual_seed(seed)
    for i, gate in enumerate(gates):
        vols = []
        for m in masks:
            shape = (m.shape[0], gate.num_groups) + tuple(m.shape[1:])
            if pattern == "per_path":  # down, up, depth: 90 %, 10 %, 50 %
                v = (torch.rand(shape, generator=gen) < (0.9, 0.1, 0.5)[i % 3]).float()
            elif pattern == "none":
                v = torch.zeros(shape)
            elif pattern == "all":
                v = torch.ones(shape)
            elif pattern == "one":
                v = torch.zeros(shape)
                b, *c = torch.nonzero(m)[len(torch.nonzero(m)) // 3].tolist()
                v[(b, slice(None), *c)] = 1.0
            elif pattern == "mixed_batch":
                v = torch.stack([torch.rand(shape[1:], generator=gen) < p for p in (0.9, 0.05)]).float()
            else:
                v = (torch.rand(shape, generator=gen) < 0.3).float()
            vols.append(v)

        def hook(mod, inp, out, vols=vols):
            if isinstance(inp[0], SiteRows):
                return out * inp[0].layout.pack_levels([v.to(out) for v in vols])
            lvl = next(j for j, m in enumerate(masks) if tuple(m.shape[1:]) == tuple(out.shape[2:]))
            return out * vols[lvl].to(out)

        gate.register_forward_hook(hook)


def _reference(tower: DynamicTower, xs: list[spconv.SparseConvTensor]):
    """The per-level reference on the dense volumes, with the index sets as site masks; back to rows."""
    sites = []
    for x in xs:
        m = torch.zeros(x.batch_size, 1, *x.spatial_shape, dtype=torch.bool, device=x.features.device)
        idx = x.indices.long()
        m[(idx[:, 0], 0, *idx[:, 1:].t())] = True
        sites.append(m)
    out, cost = reference_tower(tower, [x.dense() for x in xs], sites)
    rows = [o[(x.indices[:, 0].long(), slice(None), *x.indices[:, 1:].long().t())] for o, x in zip(out, xs)]
    return [x.replace_feature(r) for x, r in zip(xs, rows)], cost


def _run(tower: DynamicTower, inputs: list[spconv.SparseConvTensor], mode: str, single: bool):
    tower.zero_grad()
    feats = [x.features.clone().requires_grad_() for x in inputs]
    xs = [x.replace_feature(f) for x, f in zip(inputs, feats)]
    if mode == "reference":
        out, cost = _reference(tower, xs)
    else:
        tower.set_execution(mode)
        out = forward_sparse(tower, xs[0] if single else xs)
        out = [out] if single else out
        cost = collect_cost(tower)
    loss = sum((o.features * torch.cos(o.features + k)).sum() for k, o in enumerate(out)) + cost.budget_loss(10.0)
    loss.backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in tower.named_parameters()}
    return out, [f.grad for f in feats], grads, cost


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    scale = max(a.abs().max().item() if a.numel() else 0.0, b.abs().max().item() if b.numel() else 0.0, 1e-6)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= tol * scale, f"{what}: max |dense - sparse| = {err:.3g} (scale {scale:.3g})"


def _check(tower: DynamicTower, inputs, single: bool = False):
    """Dense vs sparse vs the per-level reference on volumes, on ``inputs`` (their device and dtype);
    float32 compares parameter gradients at 1e-3."""
    dtype = inputs[0].features.dtype
    tower.to(inputs[0].features.device, dtype)
    param_tol = 1e-4 if dtype == torch.float64 else 1e-3
    ref = _run(tower, inputs, "dense", single)
    _compare(ref, _run(tower, inputs, "reference", single), inputs, param_tol)
    got = _run(tower, inputs, "sparse", single)
    _compare(ref, got, inputs, param_tol)
    return got


def _compare(ref, got, inputs, param_tol: float) -> None:
    for i, (a, b, x) in enumerate(zip(ref[0], got[0], inputs)):
        assert torch.equal(b.indices, x.indices) and list(b.spatial_shape) == list(x.spatial_shape)
        assert b.batch_size == x.batch_size and b.features.shape == x.features.shape
        _close(a.features, b.features, f"output level {i}")
    for i, (a, b) in enumerate(zip(ref[1], got[1])):
        _close(a, b, f"input gradient level {i}")
    for name in ref[2]:
        _close(ref[2][name], got[2][name], f"gradient of {name}", param_tol)
    for field in ("soft", "realized", "full"):
        _close(getattr(ref[3], field), getattr(got[3], field), f"cost.{field}")


PATTERNS = ["none", "one", "sparse", "all", "mixed_batch"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_single_level_dense_equals_sparse(pattern, device):
    torch.manual_seed(0)
    tower = DynamicTower(8, 2, ndim=3, num_levels=1, gn_groups=2)
    randomise(tower, 1)
    masks = _masks(1)
    _control_gates(tower, masks, pattern)
    inputs = _tensors(masks, 8, dtype=_dtype(device), device=device)
    out, _, _, cost = _check(tower, inputs, single=True)
    if pattern == "none":  # no path runs: each router is relu(output_weight * x), output_weight = 0.9
        assert torch.all(cost.realized < cost.full)
        _close(out[0].features, F.relu(0.81 * inputs[0].features), "ungated output")


@pytest.mark.parametrize("pattern", PATTERNS)
def test_pyramid_dense_equals_sparse(pattern, device):
    tower = DynamicTower(8, 2, ndim=3, num_levels=3, gn_groups=2)
    randomise(tower, 2)
    masks = _masks(3, seed=4)
    _control_gates(tower, masks, pattern)
    _check(tower, _tensors(masks, 8, seed=5, dtype=_dtype(device), device=device))


def test_auto_runs_one_unit_at_every_voxel_and_one_at_its_active_voxels(monkeypatch, device):
    """auto at threshold 0.5 with the down unit's gates on at 90 % of the voxels and the up unit's at 10 %:
    both units in one set of pairs, one at every voxel of its levels (statistics over its active ones), the
    other at its active voxels; the dense function."""
    tower = DynamicTower(8, 2, ndim=3, num_levels=3, gn_groups=2, auto_threshold=0.5)
    randomise(tower, 2)
    masks = _masks(3, seed=4)
    _control_gates(tower, masks, "per_path")
    inputs = _tensors(masks, 8, seed=5, dtype=_dtype(device), device=device)
    tower.to(inputs[0].features.device, inputs[0].features.dtype)
    plans = []
    original = Router._plan
    monkeypatch.setattr(Router, "_plan", lambda self, *a: plans.extend(original(self, *a)) or plans[-len(a[2]):])
    got = _run(tower, inputs, "auto", False)
    monkeypatch.undo()
    assert [full for full, _ in plans[:2]] == [True, False]  # the first router's down and up units
    _compare(_run(tower, inputs, "dense", False), got, inputs, 1e-4 if inputs[0].features.dtype == torch.float64
             else 1e-3)


@pytest.mark.parametrize("options", [
    {},
    {"resample": "bilinear", "scale_bias": True},
    {"gate_groups": 2},
    {"coarse_gate": True},
    {"gate_activation": "sigmoid"},
    {"gated": False},
])
def test_natural_gates_and_variants(options, device):
    """Gates computed by the model itself (bias 0: part of the voxels active), 2 levels."""
    tower = DynamicTower(8, 2, ndim=3, num_levels=2, gn_groups=2, **options)
    randomise(tower, 6)
    with torch.no_grad():
        for m in tower.modules():
            if isinstance(m, SpatialGate):
                m.conv.bias.fill_(0.0)
    masks = _masks(2, seed=7)
    _, _, _, cost = _check(tower, _tensors(masks, 8, seed=8, dtype=_dtype(device), device=device))
    if options.get("gated", True) and "gate_activation" not in options and "coarse_gate" not in options:
        assert torch.all(cost.realized < cost.full) and torch.all(cost.realized > 0)


def test_cost_full_counts_voxels():
    tower = DynamicTower(8, 1, ndim=3, num_levels=2, gn_groups=2).double()
    masks = _masks(2, seed=9)
    with torch.no_grad():
        forward_sparse(tower, _tensors(masks, 8))
    units = tower.routers[0].unit_costs()
    voxels = [m.flatten(1).sum(1).double() for m in masks]
    # Every level runs the depth path and its gate; level 0 feeds "down", level 1 feeds "up".
    per_voxel = sum(units["depth"]) + units["gate"][0]
    expected = (voxels[0] + voxels[1]) * per_voxel
    expected += voxels[0] * (units["down"][0] + units["gate"][0]) + voxels[1] * (units["up"][0] + units["gate"][0])
    cost = collect_cost(tower)
    assert torch.allclose(cost.full.double(), expected)
    assert torch.all(cost.realized <= cost.full) and torch.all(cost.soft <= cost.full)
    assert expected[0] < math.prod(SHAPE) * per_voxel  # not the dense volume


@pytest.mark.parametrize("levels", [1, 3])
def test_full_grid_equals_dense_tower(levels):
    """With every voxel present, forward_sparse is the dense-input tower on the same volumes."""
    tower = DynamicTower(8, 2, ndim=3, num_levels=levels, gn_groups=2)
    randomise(tower, 10)
    with torch.no_grad():
        for m in tower.modules():
            if isinstance(m, SpatialGate):
                m.conv.bias.fill_(0.0)
    tower.double()
    masks = _masks(levels, occupancy=(1.0, 1.0), full=True)
    inputs = _tensors(masks, 8, seed=11)
    for mode in ("sparse", "dense"):
        tower.set_execution(mode)
        with torch.no_grad():
            out = forward_sparse(tower, inputs if levels > 1 else inputs[0])
            sparse_cost = collect_cost(tower)
            ref = tower([x.dense() for x in inputs])
            dense_cost = collect_cost(tower)
        out = out if levels > 1 else [out]
        for a, b in zip(out, ref):
            _close(a.dense(), b, f"{mode}: full-grid output vs dense tower", 1e-9)
        for field in ("soft", "realized", "full"):
            _close(getattr(sparse_cost, field), getattr(dense_cost, field), f"{mode} cost.{field}", 1e-5)


def test_returns_same_kind_and_index_set():
    tower = DynamicTower(8, 1, ndim=3, num_levels=1, gn_groups=2)
    x = _tensors(_masks(1), 8, dtype=torch.float32)[0]
    with torch.no_grad():
        y = forward_sparse(tower, x)
    assert isinstance(y, spconv.SparseConvTensor)
    assert torch.equal(y.indices, x.indices) and y.features.shape == x.features.shape
    tower2 = DynamicTower(8, 1, ndim=3, num_levels=2, gn_groups=2)
    xs = _tensors(_masks(2), 8, dtype=torch.float32)
    with torch.no_grad():
        ys = forward_sparse(tower2, tuple(xs))
    assert isinstance(ys, list) and len(ys) == 2
    assert all(torch.equal(a.indices, b.indices) for a, b in zip(xs, ys))


def test_empty_image_and_float32():
    tower = DynamicTower(8, 2, ndim=3, num_levels=2, gn_groups=2)
    masks = _masks(2, occupancy=(0.2, 0.0), seed=12)  # image 1 has no voxel at level 0
    masks[1][1] = False
    xs = _tensors(masks, 8, dtype=torch.float32)
    outs = {}
    for mode in ("dense", "sparse"):
        tower.set_execution(mode)
        with torch.no_grad():
            outs[mode] = forward_sparse(tower, xs)
    for a, b in zip(outs["dense"], outs["sparse"]):
        _close(a.features, b.features, "float32 output")
    assert collect_cost(tower).full[1] == 0


def _bad(kind: str):
    x = _tensors(_masks(1), 8, dtype=torch.float32)[0]
    idx, f, shape = x.indices, x.features, list(x.spatial_shape)
    if kind == "ndim":
        return spconv.SparseConvTensor(f, idx[:, :3].contiguous(), shape[:2], 2), "spatial dims"
    if kind == "channels":
        return spconv.SparseConvTensor(f[:, :4].contiguous(), idx, shape, 2), "channels"
    if kind == "outside":
        idx = idx.clone()
        idx[0, 2] = shape[1]
        return spconv.SparseConvTensor(f, idx, shape, 2), "outside spatial_shape"
    if kind == "negative":
        idx = idx.clone()
        idx[0, 3] = -1
        return spconv.SparseConvTensor(f, idx, shape, 2), "negative"
    if kind == "duplicate":
        idx = idx.clone()
        idx[1] = idx[0]
        return spconv.SparseConvTensor(f, idx, shape, 2), "duplicate"
    if kind == "batch_size":
        return spconv.SparseConvTensor(f, idx, shape, 1), "batch_size"
    if kind == "rows":
        return spconv.SparseConvTensor(f[:-1].contiguous(), idx, shape, 2), "indices must be"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["ndim", "channels", "outside", "negative", "duplicate", "batch_size", "rows"])
def test_bad_single_input(kind):
    tower = DynamicTower(8, 1, ndim=3, num_levels=1, gn_groups=2)
    x, message = _bad(kind)
    with pytest.raises(ValueError, match=message):
        forward_sparse(tower, x)


def test_bad_pyramids():
    tower = DynamicTower(8, 1, ndim=3, num_levels=2, gn_groups=2)
    xs = _tensors(_masks(2), 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="2 levels, got 1"):
        forward_sparse(tower, xs[:1])
    with pytest.raises(ValueError, match="pass a list"):
        forward_sparse(tower, xs[0])
    wrong = spconv.SparseConvTensor(xs[1].features, xs[1].indices, [7, 5, 4], 2)
    with pytest.raises(ValueError, match="half the size"):
        forward_sparse(tower, [xs[0], wrong])
    other = spconv.SparseConvTensor(xs[1].features, xs[1].indices, xs[1].spatial_shape, 3)
    with pytest.raises(ValueError, match="batch_size"):
        forward_sparse(tower, [xs[0], other])
    with pytest.raises(TypeError):
        forward_sparse(tower, [x.dense() for x in xs])
    with pytest.raises(ValueError, match="float64 but the tower's weights are torch.float32"):
        forward_sparse(tower, [x.replace_feature(x.features.double()) for x in xs])


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_autocast_runs_in_float32(mode, device):
    tower = DynamicTower(8, 2, ndim=3, num_levels=2, gn_groups=2, execution=mode)
    randomise(tower, 13)
    tower.to(device)
    low = torch.float16 if device.type == "cuda" else torch.bfloat16
    xs = _tensors(_masks(2, seed=14), 8, dtype=low, device=device)
    with torch.no_grad():
        reference = forward_sparse(tower, [x.replace_feature(x.features.float()) for x in xs])
        with torch.autocast(device.type, dtype=low):
            out = forward_sparse(tower, xs)
    for a, b in zip(out, reference):
        assert a.features.dtype == torch.float32
        _close(a.features, b.features, f"{mode} autocast output", 1e-6)
