"""Gated dynamic blocks inside a small SECOND-style sparse 3D backbone, on a synthetic LiDAR scene.

    python tools/voxel_example.py [--seed 0] [--small] [--active 0.3] [--routers 2] [--repeats 3]
                                  [--cpu-allocator tuned]

Builds a scene (ground plane, boxes and cylinders; points on their surfaces, density falling with the
range from a sensor at the origin), voxelises it (0.2 m voxels over 40 × 40 × 4 m, spconv's
``PointToVoxel``, mean of the points per voxel), and runs a backbone of SubMConv3d blocks and strided
SparseConv3d downsampling with a gated ``DynamicTower(C, routers, ndim=3, num_levels=1)`` after each
downsampling, applied to the voxels with :func:`sparsehead.modeling.sparse_input.forward_sparse`.

The weights are untrained; the gate biases are shifted so that about ``--active`` of the voxels keep each
gated path, as a trained budget would. Prints the active voxels per stage, the towers' realised and full
MACs, and the time of the backbone with the gated towers and with ungated ("Fixed") towers of the same
weights, which always compute every path: the two alternate in each of ``--repeats`` rounds, and the
median and the min-max over the rounds are printed. The C allocator is set as the other tools set it
(``--cpu-allocator``, :func:`sparsehead.utils.allocator.tune_allocator`) and named in the output.
"""
from __future__ import annotations

import argparse
import math
import statistics
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from sparsehead import DynamicTower, SpatialGate, collect_cost, import_spconv
from sparsehead.benchmark.measure import timed
from sparsehead.modeling.sparse_input import forward_sparse
from sparsehead.utils.allocator import ALLOCATOR_MODES, tune_allocator

spconv = import_spconv()  # spconv.pytorch, imported without its deprecation warnings (or an error naming the extras)

# isort: split
from spconv.core import ConvAlgo  # noqa: E402
from spconv.pytorch.utils import PointToVoxel  # noqa: E402

VOXEL = 0.2
RANGE = (-20.0, -20.0, -1.0, 20.0, 20.0, 3.0)  # x, y, z min then max, metres


def _surface(rng: np.random.Generator, count: int, kind: str, centre: np.ndarray, size: np.ndarray) -> np.ndarray:
    """``count`` points (count, 3) on the surface of a box (size = l, w, h) or a cylinder (size = r, r, h)."""
    if kind == "box":
        face = rng.integers(0, 5, count)  # four sides and the top
        u = rng.uniform(-0.5, 0.5, (count, 3))
        axis = np.where(face < 4, face // 2, 2)
        sign = np.where(face % 2 == 0, -0.5, 0.5)
        sign[face == 4] = 0.5
        u[np.arange(count), axis] = sign
        pts = u * size
        pts[:, 2] += size[2] / 2
    else:
        angle = rng.uniform(0, 2 * math.pi, count)
        pts = np.stack([size[0] * np.cos(angle), size[0] * np.sin(angle), rng.uniform(0, size[2], count)], 1)
    return pts + centre


def make_scene(seed: int, small: bool = False) -> torch.Tensor:
    """Points (P, 4) float32: x, y, z and an intensity, in ``RANGE``; ``small`` gives a sparser scene."""
    rng = np.random.default_rng(seed)
    half = RANGE[3]
    ground = rng.uniform(-half, half, (20_000 if small else 120_000, 2))
    parts = [np.concatenate([ground, rng.normal(-0.9, 0.02, (len(ground), 1))], 1)]
    for _ in range(4 if small else 14):
        centre = np.append(rng.uniform(-half + 3, half - 3, 2), -0.9)
        if rng.random() < 0.6:
            size = np.array([rng.uniform(3.5, 4.8), rng.uniform(1.6, 2.0), rng.uniform(1.4, 1.8)])
            parts.append(_surface(rng, 1500 if small else 5000, "box", centre, size))
        else:
            r = rng.uniform(0.2, 0.5)
            size = np.array([r, r, rng.uniform(1.0, 2.8)])
            parts.append(_surface(rng, 400 if small else 1500, "cylinder", centre, size))
    pts = np.concatenate(parts)
    rng_m = np.linalg.norm(pts[:, :2], axis=1)
    keep = rng.random(len(pts)) < np.minimum(1.0, (6.0 / np.maximum(rng_m, 1e-3)) ** 2)  # density ∝ 1 / r²
    pts = pts[keep]
    inside = np.all((pts >= RANGE[:3]) & (pts < RANGE[3:]), axis=1)
    pts = pts[inside]
    intensity = rng.uniform(0, 1, (len(pts), 1))
    return torch.from_numpy(np.concatenate([pts, intensity], 1)).float()


def voxelise(points: torch.Tensor) -> spconv.SparseConvTensor:
    """Mean of the points per 0.2 m voxel, as a batch-1 SparseConvTensor on the (z, y, x) grid."""
    gen = PointToVoxel(
        vsize_xyz=[VOXEL] * 3, coors_range_xyz=list(RANGE), num_point_features=4,
        max_num_voxels=400_000, max_num_points_per_voxel=8, device=points.device,
    )
    voxels, coords, counts = gen(points)
    feats = voxels.sum(dim=1) / counts.clamp_min(1)[:, None].float()
    idx = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords.int()], 1).contiguous()
    shape = [round((RANGE[5] - RANGE[2]) / VOXEL), round((RANGE[4] - RANGE[1]) / VOXEL),
             round((RANGE[3] - RANGE[0]) / VOXEL)]
    return spconv.SparseConvTensor(feats, idx, shape, 1)


def _block(cin: int, cout: int, key: str, stride: int = 1) -> spconv.SparseSequential:
    algo = ConvAlgo.Native  # the only spconv algorithm on CPU
    if stride == 1:
        conv = spconv.SubMConv3d(cin, cout, 3, padding=1, bias=False, indice_key=key, algo=algo)
    else:
        conv = spconv.SparseConv3d(cin, cout, 3, stride=2, padding=1, bias=False, indice_key=key, algo=algo)
    return spconv.SparseSequential(conv, nn.BatchNorm1d(cout), nn.ReLU())


class Backbone(nn.Module):
    """SECOND-style: SubM block (16), then per stage a strided conv, a SubM block and a gated tower.

    ``forward(x)`` returns the output and the SparseConvTensor after each stage (input, stage 1, 2, ...).
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64), routers: int = 2, gated: bool = True) -> None:
        super().__init__()
        self.stem = _block(4, channels[0], "subm0")
        self.down = nn.ModuleList()
        self.towers = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(channels[:-1], channels[1:]), 1):
            self.down.append(spconv.SparseSequential(_block(cin, cout, f"down{i}", 2), _block(cout, cout, f"subm{i}")))
            self.towers.append(DynamicTower(cout, routers, ndim=3, num_levels=1, gated=gated))

    def forward(self, x: spconv.SparseConvTensor) -> tuple[spconv.SparseConvTensor, list[spconv.SparseConvTensor]]:
        stages = [x]
        x = self.stem(x)
        for down, tower in zip(self.down, self.towers):
            x = forward_sparse(tower, down(x))
            stages.append(x)
        return x, stages


def calibrate_gates(model: Backbone, x: spconv.SparseConvTensor, active: float) -> None:
    """Shift each depth gate's bias so that about ``active`` of its voxels are on (one pass per router)."""
    for tower in model.towers:
        for router in tower.routers:
            gate: SpatialGate = router.depth.gate
            logits: list[torch.Tensor] = []
            handle = gate.activation.register_forward_hook(
                lambda m, inp, out, seen=logits: seen.append(inp[0].detach())
            )
            with torch.no_grad():
                model(x)
            handle.remove()
            g = torch.cat(logits).flatten()
            # The activation is 0 at logit <= 0: put the (1 - active) quantile at 0.
            shift = torch.quantile(g[torch.randperm(len(g))[:100_000]], 1.0 - active)
            with torch.no_grad():
                gate.conv.bias.sub_(shift)


def _time_interleaved(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call in ``repeats`` rounds, the calls alternating within a round (after one warm-up
    call each), so that the machine's drift over the run reaches every call alike."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {key: [] for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            times[key].append(timed(fn, torch.device("cpu")) / 1e3)
    return times


def run(seed: int = 0, small: bool = False, active: float = 0.3, routers: int = 2, repeats: int = 3,
        cpu_allocator: str = "tuned") -> dict:
    """Build, voxelise, run and measure; returns the printed figures as a dict."""
    allocator = tune_allocator(cpu_allocator)
    torch.manual_seed(seed)
    points = make_scene(seed, small)
    x = voxelise(points)
    gated = Backbone(routers=routers).eval()
    calibrate_gates(gated, x, active)
    fixed = Backbone(routers=routers, gated=False).eval()
    fixed.load_state_dict(gated.state_dict(), strict=False)  # same weights, no gate convs

    with torch.no_grad():
        _, stages = gated(x)
    report: dict = {"points": len(points), "stages": [], "towers": [], "allocator": allocator}
    print(f"CPU allocator: {allocator}")
    print(f"scene: {len(points)} points, grid {list(x.spatial_shape)} (z, y, x) of {VOXEL} m voxels")
    for i, s in enumerate(stages):
        n = s.indices.shape[0]
        frac = n / math.prod(s.spatial_shape)
        report["stages"].append({"voxels": n, "shape": list(s.spatial_shape), "channels": s.features.shape[1]})
        print(f"stage {i}: {n:7d} voxels ({100 * frac:.2f} % of {list(s.spatial_shape)}), "
              f"{s.features.shape[1]} channels")
    for i, tower in enumerate(gated.towers, 1):
        cost = collect_cost(tower)
        per_router = [float(r.last_cost.realized.sum() / r.last_cost.full.sum()) for r in tower.routers]
        real, full = float(cost.realized.sum()), float(cost.full.sum())
        report["towers"].append({"realized_macs": real, "full_macs": full, "router_ratios": per_router})
        print(f"tower {i}: realised {real / 1e6:8.1f} M MACs of {full / 1e6:8.1f} M full ({100 * real / full:.1f} %); "
              f"per router {', '.join(f'{100 * r:.0f} %' for r in per_router)}")

    def forward(model: Backbone):
        def call():
            with torch.no_grad():
                model(x)
        return call

    times = _time_interleaved({"gated": forward(gated), "fixed": forward(fixed)}, repeats)
    for key, ts in times.items():
        report.update({f"time_{key}": statistics.median(ts), f"time_{key}_min": min(ts), f"time_{key}_max": max(ts)})
    print(f"backbone time (median of {repeats} interleaved rounds, min-max): gated towers "
          f"{1e3 * report['time_gated']:.0f} ms ({1e3 * report['time_gated_min']:.0f}-"
          f"{1e3 * report['time_gated_max']:.0f}), ungated towers {1e3 * report['time_fixed']:.0f} ms "
          f"({1e3 * report['time_fixed_min']:.0f}-{1e3 * report['time_fixed_max']:.0f})")
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="scene and weight seed")
    parser.add_argument("--small", action="store_true", help="a small, sparse scene (a few seconds)")
    parser.add_argument("--active", type=float, default=0.3, help="fraction of voxels each depth gate keeps")
    parser.add_argument("--routers", type=int, default=2, help="routers per tower")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (each times both variants)")
    parser.add_argument("--cpu-allocator", choices=ALLOCATOR_MODES, default="tuned",
                        help="tuned: glibc's malloc keeps freed blocks in the process; system: as the process "
                             "started (default: tuned)")
    args = parser.parse_args(argv)
    if not 0.0 < args.active <= 1.0:
        parser.error(f"--active must lie in (0, 1], got {args.active}")
    if args.routers < 1 or args.repeats < 1:
        parser.error("--routers and --repeats must be positive")
    return run(args.seed, args.small, args.active, args.routers, args.repeats, args.cpu_allocator)


if __name__ == "__main__":
    main()
