"""Command line of ``tools/benchmark.py``: options, their checks, and the :class:`Settings` they describe."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..utils.allocator import ALLOCATOR_MODES
from .compiling import check_backend
from .crossover import CrossoverError, load_crossover
from .settings import (
    ARCHS,
    COMPILE_LEVELS,
    DEFAULT_DENSITIES,
    PAPER_CONFIGS,
    PATTERNS,
    QUICK_DENSITIES,
    QUICK_IMAGE,
    WORKLOADS,
    Settings,
)

__all__ = ["build_parser", "parse_args"]


def _csv_list(kind: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/benchmark.py",
        description="Time the dynamic head's execution modes (same weights) against its static baselines, "
                    "eager and compiled, and count the kernels and host reads of each.",
    )
    p.add_argument("--workloads", type=_csv_list(str), default=None,
                   help=f"comma list from {','.join(WORKLOADS)} (default: all)")
    p.add_argument("--patterns", type=_csv_list(str), default=None,
                   help="comma list from blob,random,model,levels (default: blob,random; model with --weights)")
    p.add_argument("--densities", type=_csv_list(float), default=None,
                   help="blob active fractions (default: " + ",".join(map(str, DEFAULT_DENSITIES)) + ")")
    p.add_argument("--random-densities", type=_csv_list(float), default=None,
                   help="random-pixel active fractions (default: 0.1,0.5)")
    p.add_argument("--routers", type=_csv_list(int), default=None, help="routers per tower (default: 4,8)")
    p.add_argument("--batches", type=_csv_list(int), default=None, help="batch sizes (default: 1,2)")
    p.add_argument("--channels", type=int, default=256, help="feature channels (default: 256)")
    p.add_argument("--image-size", type=_csv_list(int), default=None,
                   help="input H,W; the pyramid is P3-P7 of it (default: 800,1216)")
    p.add_argument("--archs", type=_csv_list(str), default=None,
                   help="detectors of the detector workload under blob/random/levels gates, from "
                        f"{','.join(ARCHS)} (default: fcos)")
    p.add_argument("--compile", choices=COMPILE_LEVELS, default=None,
                   help="none: eager only; default: also the gated dense mode and the static baselines under "
                        "torch.compile; all: every execution, sparse and auto included (default: default; "
                        "quick: none)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: inductor)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per point (default: 7; quick: 3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds per module before its first point")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cpu-allocator", choices=ALLOCATOR_MODES, default="tuned",
                   help="tuned: glibc's malloc keeps freed blocks in the process, as tcmalloc does, for every "
                        "execution alike; system: as the process started (default: tuned)")
    p.add_argument("--auto-threshold", type=float, default=None,
                   help="threshold for auto mode (default: from --crossover or the crossover file shipped "
                        "for the device type)")
    p.add_argument("--crossover", default=None, help="crossover JSON to take the auto threshold from")
    p.add_argument("--save-crossover", default=None, help="write the crossover measured on the tower workload here")
    p.add_argument("--rulebook", choices=("exact", "submanifold"), default=None,
                   help="sparse depth-path implementation (default: exact on CPU, submanifold on CUDA)")
    p.add_argument("--config", default=None, help="config of the checkpoint given with --weights")
    p.add_argument("--weights", default=None,
                   help="trained checkpoint: enables the 'model' and 'levels' gate patterns")
    p.add_argument("--out", default="output/benchmark", help="output directory (default: output/benchmark)")
    p.add_argument("--quick", action="store_true",
                   help="reduced sweep: tower D4 batch 1, blob 5-100%% + one random point, "
                        f"image {QUICK_IMAGE[0]}x{QUICK_IMAGE[1]}, 3 repeats, no compilation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-profile", action="store_true", help="skip the per-stage profiled forward")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory probes")
    p.add_argument("--no-count", action="store_true", help="skip the kernel and host-read counts")
    p.add_argument("--no-plot", action="store_true", help="do not write benchmark.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="config overrides key=value for every detector config loaded")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[Settings, argparse.Namespace]:
    """Parse and check the command line; errors exit via ``argparse`` before any work."""
    p = build_parser()
    a = p.parse_args(argv)
    q = a.quick
    workloads = a.workloads or (["tower"] if q else list(WORKLOADS))
    patterns = a.patterns or (["blob", "random"] + (["model"] if a.weights and not q else []))
    for w in workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    for pat in patterns:
        if pat not in PATTERNS:
            p.error(f"unknown pattern {pat!r}; choose from {', '.join(PATTERNS)}")
    archs = a.archs or ["fcos"]
    for arch in archs:
        if arch not in ARCHS:
            p.error(f"unknown --archs entry {arch!r}; choose from {', '.join(ARCHS)}")
    densities = a.densities or list(QUICK_DENSITIES if q else DEFAULT_DENSITIES)
    random_densities = a.random_densities or ([0.1] if q else [0.1, 0.5])
    for d in densities + random_densities:
        if not 0.0 <= d <= 1.0:
            p.error(f"density {d} is outside [0, 1]")
    routers = a.routers or ([4] if q else [4, 8])
    batches = a.batches or ([1] if q else [1, 2])
    if any(v < 1 for v in routers + batches) or a.channels < 1:
        p.error("routers, batches and channels must be positive")
    image = a.image_size or list(QUICK_IMAGE if q else (800, 1216))
    if len(image) != 2 or min(image) < 8:
        p.error(f"--image-size must be H,W with both >= 8, got {image}")
    repeats = a.repeats if a.repeats is not None else (3 if q else 7)
    if repeats < 1 or a.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if a.threads is not None and a.threads < 1:
        p.error("--threads must be >= 1")
    compile_level = a.compile or ("none" if q else "default")
    try:
        check_backend(a.compile_backend)
    except ValueError as e:
        p.error(f"--compile-backend: {e}")
    if a.weights and not a.config:
        p.error("--weights needs --config (the architecture the checkpoint was trained with)")
    for pat in ("model", "levels"):
        if pat in patterns and not a.weights:
            p.error(f"the {pat!r} pattern needs --config and --weights")
    for name, path in (("--config", a.config), ("--weights", a.weights), ("--crossover", a.crossover)):
        if path and not Path(path).is_file():
            p.error(f"{name}: file not found: {path}")
    if "detector" in workloads and set(patterns) - {"model"}:
        for arch in archs:
            if not PAPER_CONFIGS[arch].is_file():
                p.error(f"the detector workload needs the {arch} config {PAPER_CONFIGS[arch]}, which is missing")
    if a.overrides and not a.config and "detector" not in workloads:
        p.error(f"unexpected arguments: {' '.join(a.overrides)}")
    for o in a.overrides:
        if "=" not in o:
            p.error(f"config override {o!r} must be key=value")
    if a.save_crossover and "tower" not in workloads or a.save_crossover and "blob" not in patterns:
        p.error("--save-crossover needs the tower workload with blob gates")
    dev = a.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {dev}: CUDA is not available")
    if not (dev == "cpu" or dev.startswith("cuda")):
        p.error(f"--device must be cpu or cuda[:N], got {dev!r}")
    threshold = a.auto_threshold
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        p.error(f"--auto-threshold {threshold} is outside [0, 1]")
    if threshold is None:
        try:
            threshold = load_crossover(a.crossover, device=dev)
        except CrossoverError as e:
            p.error(str(e))
    s = Settings(
        workloads=workloads, patterns=patterns, densities=densities, random_densities=random_densities,
        routers=routers, batches=batches, channels=a.channels, image=(image[0], image[1]), archs=archs,
        repeats=repeats, warmup=a.warmup, device=dev, threads=a.threads, cpu_allocator=a.cpu_allocator,
        auto_threshold=threshold,
        rulebook=a.rulebook, config=a.config, weights=a.weights, overrides=a.overrides, compile=compile_level,
        compile_backend=a.compile_backend, seed=a.seed, profile=not a.no_profile, memory=not a.no_memory,
        count=not a.no_count, progress=not a.no_progress,
    )
    return s, a
