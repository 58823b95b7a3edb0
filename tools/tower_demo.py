"""Run one dynamic tower at FCOS scale in both execution modes: agreement and time of each.

    python tools/tower_demo.py [--densities 0.1 0.3] [--routers 4] [--channels 256]

Builds a DynamicTower on P3–P7 of an 800×1216 image (100×152 … 7×10), imposes object-like blob gates at
each density, runs dense and sparse interleaved and prints the largest difference between them and the
median time of each. ``tools/benchmark.py`` is the full measurement.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparsehead import DynamicTower, collect_cost
from sparsehead.benchmark import blob_mask, fixed_gates
from sparsehead.layers.resample import half_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3], help="active fractions")
    parser.add_argument("--routers", type=int, default=4)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, nargs=2, default=[100, 152], help="P3 size (800×1216 / 8)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for d in args.densities:
        if not 0.0 <= d <= 1.0:
            parser.error(f"--densities: {d} is not an active fraction in [0, 1]")

    torch.manual_seed(0)
    tower = DynamicTower(args.channels, args.routers).eval()
    sizes = [tuple(args.size)]
    for _ in range(4):
        sizes.append(tuple(half_size(sizes[-1])))
    feats = [torch.randn(1, args.channels, *s) for s in sizes]
    print(f"DynamicTower: {args.routers} routers, {args.channels} channels, levels {sizes}, "
          f"{torch.get_num_threads()} threads")
    for density in args.densities:
        with fixed_gates(tower, lambda shape, d=density: blob_mask(shape, d)), torch.no_grad():
            times: dict[str, list[float]] = {"dense": [], "sparse": []}
            outs = {}
            for _ in range(args.repeats):
                for mode in times:
                    tower.set_execution(mode)
                    start = time.perf_counter()
                    outs[mode] = tower(feats)
                    times[mode].append(time.perf_counter() - start)
            ratio = collect_cost(tower).ratio.item()
        diff = max(
            ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item() for a, b in zip(outs["dense"], outs["sparse"])
        )
        dense_ms = statistics.median(times["dense"]) * 1e3
        sparse_ms = statistics.median(times["sparse"]) * 1e3
        print(f"gates {density:4.0%} active  realised/full MACs {ratio:5.3f}  max rel. difference {diff:.1e}  "
              f"dense {dense_ms:8.1f} ms  sparse {sparse_ms:8.1f} ms  speed-up {dense_ms / sparse_ms:4.2f}x")


if __name__ == "__main__":
    main()
