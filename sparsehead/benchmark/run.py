"""Speed benchmark of the gated head paths: dense vs sparse vs auto execution on the same weights.

Workloads (each module is built once and timed in all three modes):

- ``tower``: a :class:`~sparsehead.DynamicTower` (D routers) on a P3–P7 pyramid of random features.
- ``head``: :class:`~sparsehead.modeling.heads.FCOSDynamicHead` (both towers + dense prediction convs).
- ``detector``: torchvision FCOS with an R50-FPN backbone and the dynamic head (from a config).
- ``router``: one :class:`~sparsehead.Router`.
- ``conv``: one 3×3 C→C conv on P3: the depth path's sparse conv at the active pixels (CPU: gather-GEMM
  on a neighbour table; CUDA: spconv ``SubMConv``) vs dense ``conv2d``.

Gate patterns: ``blob`` (object-like blobs, swept active fraction), ``random`` (uniform pixels) and
``model`` (the gates a trained checkpoint produces on generated images).

For every point: warm-up/probe forwards per mode (untimed; they measure memory), one profiled sparse
forward (per-stage breakdown), then ``repeats`` interleaved timed rounds (dense, sparse, auto, dense,
...) under ``torch.no_grad()``; the medians are reported. Timings synchronise CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import io
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence

import psutil
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from ..layers.sites import map_layout
from ..layers.sparse import (
    SparseConvWeight,
    channels_last,
    dilate,
    flat_index,
    gather_conv,
    mask_indices,
    to_rows,
)
from ..modeling.cost import collect_cost
from ..modeling.router import DepthPath, Router, default_rulebook
from ..modeling.tower import DynamicTower, set_execution
from ..utils.file_io import atomic_write
from ..utils.optional import import_spconv
from .crossover import CrossoverError, apply_crossover, crossover_from_rows, load_crossover, save_crossover
from .patterns import blob_mask, fixed_gates, random_mask

__all__ = ["WORKLOADS", "PATTERNS", "MODES", "STAGES", "Settings", "run_benchmark", "main", "parse_args"]

WORKLOADS = ("tower", "head", "detector", "router", "conv")
PATTERNS = ("blob", "random", "model")
MODES = ("dense", "sparse", "auto")
# Profiler labels inside the router → stage names in the rows.
STAGES = {
    "sparsehead.gate": "gate",
    "sparsehead.gather": "gather",
    "sparsehead.depth_conv": "depth_conv",
    "sparsehead.scale": "scale",
    "sparsehead.scatter": "scatter",
}
ROW_KEYS = (
    "workload", "pattern", "density", "active", "routers", "batch", "channels", "image",
    "dense_ms", "sparse_ms", "auto_ms", "flops_ratio", "speedup", "efficiency", "auto_threshold",
)
DEFAULT_DENSITIES = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9, 1.0)
QUICK_DENSITIES = (0.05, 0.1, 0.2, 0.35, 0.5, 0.9, 1.0)
QUICK_IMAGE = (256, 384)
DETECTOR_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "dynamic_D4_lambda0.1_R50_1x.yaml"

Pattern = Callable[[torch.Size], torch.Tensor]


@dataclass
class Settings:
    """What to measure. Densities are active fractions in [0, 1]; ``image`` is (H, W) of the input."""

    workloads: Sequence[str] = ("tower", "head", "detector", "router", "conv")
    patterns: Sequence[str] = ("blob", "random")
    densities: Sequence[float] = DEFAULT_DENSITIES
    random_densities: Sequence[float] = (0.1, 0.5)
    routers: Sequence[int] = (4, 8)
    batches: Sequence[int] = (1, 2)
    channels: int = 256
    image: tuple[int, int] = (800, 1216)
    num_classes: int = 80
    repeats: int = 7
    warmup: int = 1
    device: str = "cpu"
    threads: Optional[int] = None
    auto_threshold: Optional[float] = None
    rulebook: Optional[str] = None  # DepthPath.rulebook: exact | submanifold; None: the device's default
    config: Optional[str] = None
    weights: Optional[str] = None
    overrides: Sequence[str] = ()
    seed: int = 0
    profile: bool = True
    memory: bool = True
    progress: bool = True


@dataclass
class Case:
    """One module to time: ``forward()`` runs it on fixed inputs, ``set_mode`` switches execution."""

    workload: str
    routers: int
    batch: int
    channels: int
    image: tuple[int, int]
    model: nn.Module
    forward: Callable[[], Any]
    set_mode: Callable[[str], None]
    macs: Callable[[], tuple[float, float]]  # (realised, full) MACs of the last forward, whole batch
    gates: Callable[[Pattern], ContextManager[Any]]  # imposes a gate pattern
    stats: Callable[[], tuple[Optional[float], Optional[float]]]  # (gate density, auto fraction)
    head: Optional[nn.Module] = None  # timed separately inside the forward (detector)
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Inputs and small helpers


def pyramid_sizes(image: Sequence[int], levels: int = 5, stride: int = 8) -> list[tuple[int, int]]:
    """Spatial sizes of P3..P7 for an (H, W) image: ceil(H / 8) × ceil(W / 8), then halved rounding up."""
    h, w = (math.ceil(s / stride) for s in image)
    sizes = [(h, w)]
    for _ in range(levels - 1):
        h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return sizes


def random_pyramid(batch: int, channels: int, image: Sequence[int], device: torch.device, seed: int) -> list:
    """Random features [(N, C, h_l, w_l)] for P3..P7 of ``image``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=gen).to(device) for h, w in pyramid_sizes(image)]


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and its logical core count."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} cores)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _routers(model: nn.Module) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


def _gn_groups(channels: int) -> int:
    return math.gcd(32, channels)


@contextlib.contextmanager
def _keep_gates(model: nn.Module) -> Iterator[None]:
    routers = _routers(model)
    for r in routers:
        r.keep_gates = True
    try:
        yield
    finally:
        for r in routers:
            r.keep_gates = False


def router_gate_stats(model: nn.Module) -> tuple[Optional[float], Optional[float]]:
    """(density, active) from the gates the routers kept in their last forward.

    density: pixel-weighted active fraction over all gated paths; active: the same for the depth
    path's first conv (the dilated gate, the fraction ``auto`` compares for the costliest path).
    """
    on = tot = d_on = d_tot = 0.0
    for r in _routers(model):
        for kind, maps in r.last_gates.items():
            for g in maps.values():
                m = (g > 0).any(dim=1, keepdim=True)
                on += float(m.sum())
                tot += m.numel()
                if kind == "depth":
                    d_on += float(dilate(m).sum())
                    d_tot += m.numel()
    if not tot:
        return None, None
    return on / tot, (d_on / d_tot if d_tot else None)


def _cost_macs(model: nn.Module) -> tuple[float, float]:
    c = collect_cost(model)
    return float(c.realized.sum()), float(c.full.sum())


# ----------------------------------------------------------------------------------------------------
# The single-conv workload


class ConvPair(nn.Module):
    """One C→C 3×3 conv on one map: dense ``conv2d``, or the depth path's sparse conv at the masked pixels.

    ``forward(x)`` with ``x`` (N, C, H, W) channels-last and ``self.mask`` (N, 1, H, W) bool. Sparse, as
    the depth path runs it: on CPU :func:`gather_conv` reading the map's rows (neighbour table
    included); on CUDA spconv ``SubMConv`` on the gathered rows (rulebook included). The output stays
    as rows.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = SparseConvWeight(2, channels, channels, 3)
        self.execution = "sparse"
        self.auto_threshold = 0.5
        self.mask: Optional[torch.Tensor] = None
        self.last_macs = (0.0, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.mask is not None, "set a mask first"
        n, c, h, w = x.shape
        per_pixel = float(self.conv.macs_per_pixel())
        sparse = self.execution == "sparse" or (
            self.execution == "auto" and float(self.mask.float().mean()) <= self.auto_threshold
        )
        self.last_macs = (float(self.mask.sum()) * per_pixel, n * h * w * per_pixel)
        if not sparse:
            with record_function("sparsehead.depth_conv"):
                return F.conv2d(x, self.conv.dense_weight(), padding=1)
        with record_function("sparsehead.gather"):
            if x.is_cuda:
                idx = mask_indices(self.mask)
                rows = to_rows(x).index_select(0, flat_index(idx, (h, w)))
                t = import_spconv().SparseConvTensor(rows, idx, [h, w], n)
            else:
                active = self.mask.reshape(-1).nonzero()[:, 0]
                nbr = map_layout(n, [(h, w)], x.device).neighbours.index_select(0, active)
                table = nbr.masked_fill(nbr == n * h * w, -1)
        with record_function("sparsehead.depth_conv"):
            if x.is_cuda:
                return self.conv.submanifold(t, "conv").features
            return gather_conv(to_rows(x), self.conv.weight, table, missing=True)


# ----------------------------------------------------------------------------------------------------
# Building workloads


def _router_case(
    workload: str, model: nn.Module, forward: Callable[[], Any], routers: int, batch: int, channels: int,
    image: tuple[int, int], head: Optional[nn.Module] = None, fixed: bool = True, extra_macs: float = 0.0,
) -> Case:
    def macs() -> tuple[float, float]:
        r, f = _cost_macs(head if head is not None else model)
        return r + extra_macs, f + extra_macs

    return Case(
        workload, routers, batch, channels, image, model, forward,
        set_mode=lambda mode: set_execution(model, mode),
        macs=macs,
        gates=(lambda p: fixed_gates(model, p)) if fixed else (lambda p: contextlib.nullcontext()),
        stats=lambda: router_gate_stats(model),
        head=head,
        extra={"backbone_macs": extra_macs} if extra_macs else {},
    )


def _conv_case(feat: torch.Tensor, channels: int, image: tuple[int, int], fixed_mask=None) -> Case:
    """``feat`` (N, C, H, W) P3 features; ``fixed_mask`` (N, 1, H, W) bool for the model pattern."""
    conv = ConvPair(channels).to(feat.device).eval()
    x = channels_last(feat)

    @contextlib.contextmanager
    def gates(pattern: Pattern) -> Iterator[None]:
        if fixed_mask is not None:
            conv.mask = fixed_mask
        else:
            conv.mask = pattern(torch.Size((x.shape[0], 1, *x.shape[2:]))).to(x.device) > 0
        yield

    def stats() -> tuple[Optional[float], Optional[float]]:
        f = float(conv.mask.float().mean())
        return f, f

    def set_mode(mode: str) -> None:
        conv.execution = mode

    return Case("conv", 0, x.shape[0], channels, image, conv, lambda: conv(x), set_mode,
                macs=lambda: conv.last_macs, gates=gates, stats=stats)


def _backbone_macs(model: nn.Module, images: list[torch.Tensor]) -> float:
    """MACs of the detector's transform + backbone + FPN on ``images`` (counted once, dense)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.backbone(model.transform(images)[0].tensors)
    return counter.get_total_flops() / 2.0


def load_detector(cfg_path: Optional[str], overrides: Sequence[str], weights: Optional[str]) -> tuple[nn.Module, Any]:
    """Build FCOS from a config (random backbone unless the config names weights) and load ``weights``."""
    from ..config import load_config
    from ..modeling.build import build_model

    path = cfg_path or DETECTOR_CONFIG
    if not Path(path).is_file():
        raise FileNotFoundError(f"detector config not found: {path} (pass --config)")
    cfg = load_config(path, list(overrides))
    model = build_model(cfg)
    if weights:
        from ..engine.checkpoint import load_model_weights

        load_model_weights(model, weights)
    return model.eval(), cfg


def generated_images(batch: int, image: tuple[int, int], num_classes: int, seed: int) -> list[torch.Tensor]:
    """``batch`` generated shape images, each (3, H, W) float in [0, 1]."""
    import numpy as np

    from ..data.synthetic import CLASSES, render_sample

    out = []
    for i in range(batch):
        rng = np.random.default_rng(seed + i)
        img, _ = render_sample(rng, image[1], image[0], min(num_classes, len(CLASSES)))
        out.append(torch.from_numpy(img).permute(2, 0, 1).float() / 255.0)
    return out


def _build_cases(s: Settings, workload: str, pattern: str, device: torch.device) -> Iterator[Case]:
    """The cases of one workload under one pattern family (``model`` uses the trained checkpoint)."""
    c, img = s.channels, tuple(s.image)
    if pattern == "model":
        yield from _model_cases(s, workload, device)
        return
    for d in s.routers:
        for n in s.batches:
            seed = s.seed + 1000 * d + n
            torch.manual_seed(seed)
            if workload == "conv":
                if d != s.routers[0]:
                    continue
                yield _conv_case(random_pyramid(n, c, img, device, seed)[0], c, img)
                continue
            if workload == "router":
                if d != s.routers[0]:
                    continue
                r = Router(c, gn_groups=_gn_groups(c), name="bench").to(device).eval()
                x = random_pyramid(n, c, img, device, seed)
                yield _router_case("router", r, lambda r=r, x=x: r(x), 1, n, c, img)
            elif workload == "tower":
                t = DynamicTower(c, d).to(device).eval()
                x = random_pyramid(n, c, img, device, seed)
                yield _router_case("tower", t, lambda t=t, x=x: t(x), d, n, c, img)
            elif workload == "head":
                from ..modeling.heads import FCOSDynamicHead

                h = FCOSDynamicHead(c, 1, s.num_classes, num_routers=d, gn_groups=_gn_groups(c)).to(device).eval()
                x = random_pyramid(n, c, img, device, seed)
                yield _router_case("head", h, lambda h=h, x=x: h(x), d, n, c, img)
            elif workload == "detector":
                over = ["model.backbone.weights=''", f"model.head.num_routers={d}", "model.head.kind=dynamic",
                        f"model.min_size={min(img)}", f"model.max_size={max(img)}", *s.overrides]
                model, _ = load_detector(s.config, over, None)
                model.to(device)
                ims = [torch.rand(3, *img, generator=torch.Generator().manual_seed(seed + i)).to(device)
                       for i in range(n)]
                routers = len(model.head.cls_tower.routers) if hasattr(model.head, "cls_tower") else 0
                yield _router_case("detector", model, lambda m=model, ims=ims: m(ims), routers, n,
                                   model.backbone.out_channels, img, head=model.head,
                                   extra_macs=_backbone_macs(model, ims))


def _model_cases(s: Settings, workload: str, device: torch.device) -> Iterator[Case]:
    """Cases whose gates are the trained model's own, on generated images."""
    model, cfg = load_detector(s.config, list(s.overrides), s.weights)
    model.to(device)
    head = model.head
    if not hasattr(head, "cls_tower"):
        raise ValueError("the 'model' pattern needs a dynamic or fixed head (model.head.kind)")
    img = tuple(s.image)
    c = model.backbone.out_channels
    d = len(head.cls_tower.routers)
    for n in s.batches:
        ims = [im.to(device) for im in generated_images(n, img, cfg.model.num_classes, s.seed + 100 * n)]
        with torch.no_grad():
            feats = list(model.backbone(model.transform(ims)[0].tensors).values())
        size = tuple(int(v) for v in model.transform(ims)[0].tensors.shape[-2:])
        if workload == "detector":
            yield _router_case("detector", model, lambda m=model, ims=ims: m(ims), d, n, c, size, head=head,
                               fixed=False, extra_macs=_backbone_macs(model, ims))
        elif workload == "head":
            yield _router_case("head", head, lambda f=feats: head(f), d, n, c, size, fixed=False)
        elif workload == "tower":
            t = head.cls_tower
            yield _router_case("tower", t, lambda f=feats, t=t: t(f), d, n, c, size, fixed=False)
        elif workload == "router":
            r = head.cls_tower.routers[0]
            yield _router_case("router", r, lambda f=feats, r=r: r(f), 1, n, c, size, fixed=False)
        elif workload == "conv":
            r = head.cls_tower.routers[0]
            with torch.no_grad(), _keep_gates(r):
                set_execution(r, "dense")
                r(feats)
                mask = (r.last_gates["depth"][0] > 0).any(dim=1, keepdim=True)
            yield _conv_case(feats[0], c, size, fixed_mask=mask)


# ----------------------------------------------------------------------------------------------------
# Measuring


class _HeadTimer:
    """Wall time of each forward of a submodule (hooks), e.g. the detector's head."""

    def __init__(self, module: Optional[nn.Module], device: torch.device) -> None:
        self.times: list[float] = []
        self.handles = []
        if module is not None:
            self.handles = [
                module.register_forward_pre_hook(lambda *a: self._start()),
                module.register_forward_hook(lambda *a: self._stop()),
            ]
        self.device = device
        self.t0 = 0.0

    def _start(self) -> None:
        _sync(self.device)
        self.t0 = time.perf_counter()

    def _stop(self) -> None:
        _sync(self.device)
        self.times.append((time.perf_counter() - self.t0) * 1e3)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so the next forward's growth shows in RSS."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).malloc_trim(0)


def peak_memory_mb(fn: Callable[[], Any], device: torch.device, interval: float = 0.0005) -> float:
    """Peak memory growth during ``fn()`` in MiB.

    CUDA: ``max_memory_allocated`` above the allocation before the call (exact). CPU: the process's
    RSS sampled every ``interval`` seconds by a thread, peak minus the RSS before the call, after
    returning freed heap to the OS; a sampled lower bound of the true peak.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    _malloc_trim()
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return (peak[0] - base) / 2**20


class _StageClock:
    """Stands in for ``record_function`` in the router during one forward: wall ms per stage label."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ms = {name: 0.0 for name in STAGES.values()}

    @contextlib.contextmanager
    def __call__(self, label: str) -> Iterator[None]:
        _sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            if label in STAGES:
                self.ms[STAGES[label]] += (time.perf_counter() - t0) * 1e3


def profile_stages(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Wall ms per router stage (the ``sparsehead.*`` profiler labels) of one forward, plus other/total.

    The labels' ``record_function`` is swapped for a clock for this one forward: a torch.profiler
    session costs seconds per forward here, the clock microseconds; on CUDA each stage is synchronised.
    """
    from ..modeling import router as router_mod

    clock = _StageClock(device)
    saved = router_mod.record_function, globals()["record_function"]
    router_mod.record_function = clock
    globals()["record_function"] = clock
    try:
        total = _timed(fn, device)
    finally:
        router_mod.record_function, globals()["record_function"] = saved
    out = dict(clock.ms)
    out["other"] = max(0.0, total - sum(out.values()))
    out["total"] = total
    return out


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _finite(x: Optional[float], nd: int = 4) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


def measure_point(case: Case, s: Settings, device: torch.device, threshold: float) -> dict[str, Any]:
    """Time ``case`` (its gate pattern already imposed) in all modes; returns one row (no pattern keys)."""
    row: dict[str, Any] = {}
    stages: dict[str, float] = {}

    def clocked() -> None:
        stages.update(profile_stages(case.forward, device))

    # Probe forwards, one per mode (untimed): warm the pattern's caches and measure memory; the sparse
    # one also keeps the gates (density statistics) and clocks the router stages.
    for mode in MODES:
        case.set_mode(mode)
        fn = clocked if mode == "sparse" and s.profile else case.forward
        with _keep_gates(case.model) if mode == "sparse" else contextlib.nullcontext():
            if s.memory:
                row[f"{mode}_mem_mb"] = _finite(peak_memory_mb(fn, device), 2)
            else:
                fn()
            if mode == "sparse":
                realized, full = case.macs()
                density, active = case.stats()
                for k, v in stages.items():
                    row[f"stage_{k}_ms"] = _finite(v, 3)
    row["density_measured"] = _finite(density)
    row["active"] = _finite(active)
    row["flops_ratio"] = _finite(realized / full if full else float("nan"))
    row["realized_gmacs"] = _finite(realized / 1e9, 3)
    row["full_gmacs"] = _finite(full / 1e9, 3)
    if case.extra.get("backbone_macs"):
        row["head_macs_share"] = _finite(1.0 - case.extra["backbone_macs"] / full)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    head = _HeadTimer(case.head, device)
    head_times: dict[str, list[float]] = {m: [] for m in MODES}
    try:
        for _ in range(s.repeats):
            for mode in MODES:
                case.set_mode(mode)
                times[mode].append(_timed(case.forward, device))
                if case.head is not None:
                    head_times[mode].append(head.times[-1])
    finally:
        head.close()
    for mode in MODES:
        row[f"{mode}_ms"] = _finite(statistics.median(times[mode]), 3)
        row[f"{mode}_min_ms"] = _finite(min(times[mode]), 3)
        if case.head is not None:
            row[f"{mode}_head_ms"] = _finite(statistics.median(head_times[mode]), 3)
    row["speedup"] = _finite(row["dense_ms"] / row["sparse_ms"]) if row["sparse_ms"] else None
    row["efficiency"] = (
        _finite(row["speedup"] * row["flops_ratio"]) if row["speedup"] is not None and row["flops_ratio"] else None
    )
    row["auto_threshold"] = threshold
    return row


def _points(s: Settings, pattern: str) -> list[tuple[float, Optional[Pattern]]]:
    if pattern == "blob":
        return [(d, lambda shape, d=d: blob_mask(shape, d, s.seed)) for d in s.densities]
    if pattern == "random":
        return [(d, lambda shape, d=d: random_mask(shape, d, s.seed)) for d in s.random_densities]
    return [(float("nan"), None)]


def _case_count(s: Settings, workload: str, pattern: str) -> int:
    if pattern == "model":
        return len(s.batches)
    if workload in ("conv", "router"):
        return len(s.batches)
    return len(s.routers) * len(s.batches)


def run_benchmark(s: Settings, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Measure every (workload, pattern, case, density) point of ``s``; returns the rows."""
    from tqdm import tqdm

    device = torch.device(s.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    threshold = s.auto_threshold if s.auto_threshold is not None else load_crossover(device=device)
    threads = torch.get_num_threads()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    total = sum(
        _case_count(s, w, p) * len(_points(s, p)) for w in s.workloads for p in s.patterns
    )
    log(f"device {device} ({dev_name}), torch threads {threads}, auto threshold {threshold}, {total} points")
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=total, disable=not s.progress, desc="benchmark", file=sys.stderr, dynamic_ncols=True)
    with torch.no_grad():
        for workload in s.workloads:
            for pattern in s.patterns:
                for case in _build_cases(s, workload, pattern, device):
                    apply_crossover(case.model, threshold)
                    for m in case.model.modules():
                        if isinstance(m, DepthPath):
                            m.rulebook = s.rulebook
                    for i, (density, pat) in enumerate(_points(s, pattern)):
                        bar.set_description(f"{workload} D{case.routers} N{case.batch} {pattern} {density:.2f}")
                        with case.gates(pat):
                            for _ in range(s.warmup if i == 0 else 0):  # first use of this module
                                for mode in MODES:
                                    case.set_mode(mode)
                                    case.forward()
                            row = measure_point(case, s, device, threshold)
                        if pattern == "model":
                            density = row["density_measured"]
                        head = {
                            "workload": workload, "pattern": pattern, "density": _finite(density),
                            "routers": case.routers, "batch": case.batch, "channels": case.channels,
                            "image": f"{case.image[0]}x{case.image[1]}", "device": dev_name, "threads": threads,
                            "rulebook": s.rulebook or default_rulebook(device, torch.get_default_dtype()),
                        }
                        rows.append({**head, **row})
                        bar.update(1)
                    del case
    bar.close()
    return [_order(r) for r in rows]


def _order(row: dict[str, Any]) -> dict[str, Any]:
    first = [k for k in ROW_KEYS if k in row]
    return {**{k: row[k] for k in first}, **{k: v for k, v in row.items() if k not in first}}


# ----------------------------------------------------------------------------------------------------
# Output


def write_outputs(rows: list[dict[str, Any]], out: Path, plot: bool = True) -> list[Path]:
    """``out/benchmark.json`` (list of rows), ``out/benchmark.csv`` and ``out/benchmark.png``."""
    out = Path(out)
    written = [out / "benchmark.json", out / "benchmark.csv"]
    data = (json.dumps(rows, indent=1) + "\n").encode()
    atomic_write(written[0], lambda f: f.write(data))
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write(written[1], lambda f: f.write(buf.getvalue().encode()))
    if plot:
        from .plot import plot_rows

        png = plot_rows(rows)
        atomic_write(out / "benchmark.png", lambda f: f.write(png))
        written.append(out / "benchmark.png")
    return written


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of the main columns."""
    cols = [
        ("workload", "workload", "{}"), ("D", "routers", "{}"), ("N", "batch", "{}"), ("pattern", "pattern", "{}"),
        ("density", "density", "{:.3f}"), ("active", "active", "{:.3f}"), ("dense_ms", "dense_ms", "{:.1f}"),
        ("sparse_ms", "sparse_ms", "{:.1f}"), ("auto_ms", "auto_ms", "{:.1f}"),
        ("flops", "flops_ratio", "{:.3f}"), ("speedup", "speedup", "{:.2f}"), ("eff", "efficiency", "{:.2f}"),
        ("sp_MiB", "sparse_mem_mb", "{:.0f}"), ("dn_MiB", "dense_mem_mb", "{:.0f}"),
    ]
    cells = [[h for h, _, _ in cols]]
    for r in rows:
        cells.append([fmt.format(r[k]) if r.get(k) is not None else "-" for _, k, fmt in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c[i].rjust(widths[i]) for i in range(len(cols))) for c in cells)


# ----------------------------------------------------------------------------------------------------
# Command line


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
        description="Time the dynamic head's gated paths in dense, sparse and auto execution (same weights).",
    )
    p.add_argument("--workloads", type=_csv_list(str), default=None,
                   help=f"comma list from {','.join(WORKLOADS)} (default: all)")
    p.add_argument("--patterns", type=_csv_list(str), default=None,
                   help="comma list from blob,random,model (default: blob,random; model with --weights)")
    p.add_argument("--densities", type=_csv_list(float), default=None,
                   help="blob active fractions (default: " + ",".join(map(str, DEFAULT_DENSITIES)) + ")")
    p.add_argument("--random-densities", type=_csv_list(float), default=None,
                   help="random-pixel active fractions (default: 0.1,0.5)")
    p.add_argument("--routers", type=_csv_list(int), default=None, help="routers per tower (default: 4,8)")
    p.add_argument("--batches", type=_csv_list(int), default=None, help="batch sizes (default: 1,2)")
    p.add_argument("--channels", type=int, default=256, help="feature channels (default: 256)")
    p.add_argument("--image-size", type=_csv_list(int), default=None,
                   help="input H,W; the pyramid is P3-P7 of it (default: 800,1216)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per point (default: 7; quick: 3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds per module before its first point")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--auto-threshold", type=float, default=None,
                   help="threshold for auto mode (default: from --crossover or the crossover file shipped "
                        "for the device type)")
    p.add_argument("--crossover", default=None, help="crossover JSON to take the auto threshold from")
    p.add_argument("--save-crossover", default=None, help="write the crossover measured on the tower workload here")
    p.add_argument("--rulebook", choices=("exact", "submanifold"), default=None,
                   help="sparse depth-path implementation (default: exact on CPU, submanifold on CUDA)")
    p.add_argument("--config", default=None, help="detector config (for the detector workload and --weights)")
    p.add_argument("--weights", default=None, help="trained checkpoint: enables the 'model' gate pattern")
    p.add_argument("--out", default="output/benchmark", help="output directory (default: output/benchmark)")
    p.add_argument("--quick", action="store_true",
                   help="reduced sweep: tower D4 batch 1, blob 5-100%% + one random point, "
                        f"image {QUICK_IMAGE[0]}x{QUICK_IMAGE[1]}, 3 repeats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-profile", action="store_true", help="skip the per-stage profiled forward")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory probes")
    p.add_argument("--no-plot", action="store_true", help="do not write benchmark.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="config overrides key=value for the detector")
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
    if a.weights and not a.config:
        p.error("--weights needs --config (the architecture the checkpoint was trained with)")
    if "model" in patterns and not a.weights:
        p.error("the 'model' pattern needs --config and --weights")
    for name, path in (("--config", a.config), ("--weights", a.weights), ("--crossover", a.crossover)):
        if path and not Path(path).is_file():
            p.error(f"{name}: file not found: {path}")
    if "detector" in workloads and not a.config and not DETECTOR_CONFIG.is_file():
        p.error(f"the detector workload needs --config (default config not found: {DETECTOR_CONFIG})")
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
        routers=routers, batches=batches, channels=a.channels, image=(image[0], image[1]), repeats=repeats,
        warmup=a.warmup, device=dev, threads=a.threads, auto_threshold=threshold, rulebook=a.rulebook,
        config=a.config, weights=a.weights, overrides=a.overrides, seed=a.seed, profile=not a.no_profile,
        memory=not a.no_memory, progress=not a.no_progress,
    )
    return s, a


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    s, a = parse_args(argv)
    t0 = time.perf_counter()
    rows = run_benchmark(s)
    elapsed = time.perf_counter() - t0
    print(format_table(rows))
    for path in write_outputs(rows, Path(a.out), plot=not a.no_plot):
        print(f"wrote {path}")
    if "tower" in s.workloads and "blob" in s.patterns:
        cross = crossover_from_rows(rows)
        print(f"crossover (active fraction where sparse = dense, tower): {cross['threshold']:.3f} "
              + " ".join(f"[{k}: {v:.3f}]" for k, v in cross["series"].items()))
        if a.save_crossover:
            rec = save_crossover(
                a.save_crossover, cross["threshold"], rows[0]["device"], rows[0]["threads"],
                extra={"series": cross["series"], "image": rows[0]["image"], "channels": s.channels},
            )
            print(f"wrote {a.save_crossover}: threshold {rec['threshold']}")
    print(f"benchmark took {elapsed:.1f} s")
    return 0
