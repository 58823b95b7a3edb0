"""Speed benchmark of the dynamic head: its execution modes against the best dense way to run the same work.

Workloads (each built once per case and measured at every point of a gate pattern):

- ``tower``: a :class:`~sparsehead.DynamicTower` (D routers) on a P3–P7 pyramid of random features.
- ``head``: :class:`~sparsehead.modeling.heads.FCOSDynamicHead` (both towers + dense prediction convs).
- ``detector``: a whole torchvision FCOS or RetinaNet (R50-FPN at the paper's scale, or a checkpoint).
- ``router``: one :class:`~sparsehead.Router`.
- ``conv``: one 3×3 C→C conv on P3 (:mod:`sparsehead.benchmark.conv`).

Executions: the gated model in ``dense``, ``sparse`` and ``auto`` mode, and the static baselines ``fixed``
(the same routers with ``gated=False``) and ``plain`` (torchvision's head); each eager and, per
``--compile``, under ``torch.compile``. Per point: untimed probe forwards (memory, gate statistics, the
sparse stage clock), one counted forward per eager execution (kernels and host reads), the compiled
executions warmed until they compile nothing more (graph breaks from ``torch._dynamo.explain`` at the
case's first point; compile time reported apart) and their kernels counted from one profiled forward,
then ``repeats`` interleaved timed rounds under ``torch.no_grad()``, medians reported; under
``--compile all`` a second pass, after a dynamo reset, times the compiled sparse and auto executions.
``best_dense_ms`` is the fastest of the gated dense mode and the fixed baseline, eager or compiled;
``speedup`` is ``best_dense_ms / sparse_ms``. Options and columns: ``docs/benchmark.md``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..modeling.router import DepthPath, default_rulebook
from ..utils.allocator import tune_allocator
from .cli import parse_args
from .compiling import compile_limits, graph_breaks, graphs_compiled, max_abs_diff, warm_compiled
from .conv import ConvPair
from .counting import count_launches, count_ops
from .crossover import apply_crossover, crossover_from_rows, load_crossover, save_crossover
from .measure import ModuleTimer, cpu_name, finite, peak_memory_mb, profile_stages, timed
from .output import format_tables, write_outputs
from .patterns import blob_mask, random_mask
from .settings import SPARSE_KINDS, Settings, compiled_executions
from .workloads import (
    Case,
    build_cases,
    checkpoint_level_fractions,
    keep_gates,
    levels_pattern,
    pyramid_sizes,
)

__all__ = ["run_benchmark", "measure_point", "main", "parse_args", "pyramid_sizes", "ROW_KEYS"]

logger = logging.getLogger("sparsehead.benchmark")

ROW_KEYS = (
    "workload", "arch", "pattern", "density", "active", "routers", "batch", "channels", "image",
    "best_dense_ms", "best_dense", "dense_ms", "sparse_ms", "auto_ms", "fixed_ms", "plain_ms",
    "flops_ratio", "speedup", "efficiency", "auto_speedup", "speedup_vs_dense", "efficiency_vs_dense",
    "auto_threshold",
)
# Candidates for best_dense_ms: every way to compute the same dense function.
DENSE_KINDS = ("dense", "dense_compiled", "fixed", "fixed_compiled")

Pattern = Callable[[torch.Size], torch.Tensor]


class _CaseState:
    """What a case keeps from point to point: its compiled modules and graph-break counts."""

    def __init__(self) -> None:
        self.compiled: dict[str, torch.nn.Module] = {}
        self.breaks: dict[str, int] = {}


def _key(execution: str, compiled: bool) -> str:
    return f"{execution}_compiled" if compiled else execution


def _clocked(fn: Callable[[], Any], device: torch.device, stages: dict[str, float]) -> None:
    stages.update(profile_stages(fn, device))


def _probe(case: Case, s: Settings, device: torch.device, row: dict, outputs: dict) -> None:
    """Untimed forward per eager execution: warms the pattern's caches, measures memory; the sparse one
    also keeps the gates (density statistics, MACs) and clocks the stages. Keeps the outputs."""
    for e in case.executions:
        case.prepare(e)
        stages: dict[str, float] = {}
        fn = functools.partial(_forward_into, case.module(e), case.inputs, outputs, e)
        if e == "sparse" and s.profile:
            fn = functools.partial(_clocked, fn, device, stages)
        with keep_gates(case.model) if e == "sparse" else contextlib.nullcontext():
            if s.memory:
                row[f"{e}_mem_mb"] = finite(peak_memory_mb(fn, device), 2)
            else:
                fn()
            if e == "sparse":
                realized, full = case.macs()
                density, active = case.stats()
                for k, v in stages.items():
                    row[f"stage_{k}_ms"] = finite(v, 3)
    row["density_measured"] = finite(density)
    row["active"] = finite(active)
    row["flops_ratio"] = finite(realized / full if full else float("nan"))
    row["realized_gmacs"] = finite(realized / 1e9, 3)
    row["full_gmacs"] = finite(full / 1e9, 3)
    if case.extra.get("backbone_macs"):
        row["head_macs_share"] = finite(1.0 - case.extra["backbone_macs"] / full)


def _forward_into(module: torch.nn.Module, inputs: Any, outputs: dict, key: str) -> None:
    outputs[key] = module(inputs)


def _count(case: Case, row: dict) -> None:
    """Kernels and host reads of one forward per eager execution."""
    for e in case.executions:
        case.prepare(e)
        module = case.module(e)
        c = count_ops(lambda module=module: module(case.inputs))
        row[f"{e}_kernels"] = c.kernels
        row[f"{e}_syncs"] = c.syncs
        row[f"{e}_sync_ops"] = c.sync_summary()


def _compile(case: Case, s: Settings, state: _CaseState, execs: Sequence[str], first: bool, row: dict,
             outputs: dict) -> None:
    """Graph breaks and compiled modules (first point), warm-up until nothing more compiles, and the
    largest difference from the eager output, for the compiled executions ``execs``."""
    if first:
        logger.info("%s: graph breaks and torch.compile (%s) of %s; a cold compile takes minutes",
                    case.workload, s.compile_backend, ", ".join(execs))
        for e in execs:  # explain resets dynamo: before anything of this pass is compiled
            case.prepare(e)
            module, inputs = case.explain_target(e)
            state.breaks[e] = graph_breaks(module, inputs)
        by_module: dict[int, torch.nn.Module] = {}
        for e in execs:
            m = case.module(e)
            if id(m) not in by_module:  # the modes share one compiled model
                by_module[id(m)] = case.compiled(e, s.compile_backend)
            state.compiled[e] = by_module[id(m)]

    def call(e: str) -> Any:
        case.prepare(e)
        return state.compiled[e](case.inputs)

    warm = warm_compiled({e: functools.partial(call, e) for e in execs})
    for e in execs:
        seconds, out = warm[e]
        row[f"{e}_compile_s"] = finite(seconds, 2)
        row[f"{e}_graph_breaks"] = state.breaks.get(e)
        row[f"{e}_compiled_max_diff"] = finite(max_abs_diff(out, outputs.get(e)), 8)
        if s.count:
            row[f"{e}_compiled_kernels"] = sum(count_launches(functools.partial(call, e)).values())


def measure_point(
    case: Case, s: Settings, device: torch.device, state: Optional[_CaseState] = None, first: bool = True,
    eager: bool = True, compiled: Sequence[str] = (),
) -> dict[str, Any]:
    """Measure ``case`` (its gate pattern already set): with ``eager``, every execution eagerly (probes,
    counts, times); and the executions in ``compiled`` under ``torch.compile``. Returns the row's
    measured keys (no pattern keys, no ratios)."""
    state = state or _CaseState()
    row: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    if eager:
        _probe(case, s, device, row, outputs)
        if s.count:
            _count(case, row)
    else:
        for e in compiled:  # the eager outputs the compiled ones are compared with
            case.prepare(e)
            outputs[e] = case.module(e)(case.inputs)
    if compiled:
        _compile(case, s, state, compiled, first, row, outputs)
    outputs.clear()
    runners: list[tuple[str, str, torch.nn.Module]] = [(e, e, case.module(e)) for e in case.executions if eager]
    runners += [(_key(e, True), e, state.compiled[e]) for e in compiled]
    times: dict[str, list[float]] = {k: [] for k, _, _ in runners}
    head_times: dict[str, list[float]] = {k: [] for k, _, _ in runners}
    timers = {k: ModuleTimer(case.head(m), device) for k, _, m in runners}
    before = graphs_compiled()
    try:
        for _ in range(s.repeats):
            for key, e, module in runners:
                case.prepare(e)
                times[key].append(timed(functools.partial(module, case.inputs), device))
                if timers[key].times:
                    head_times[key].append(timers[key].times[-1])
    finally:
        for t in timers.values():
            t.close()
    if graphs_compiled() != before:
        logger.warning("%s: a compiled execution compiled again while timed; its times include compilation",
                       case.workload)
        row["compiled_while_timed"] = True
    for key, _, _ in runners:
        ms = statistics.median(times[key])
        row[f"{key}_ms"] = finite(ms, 3)
        row[f"{key}_min_ms"] = finite(min(times[key]), 3)
        if head_times[key]:
            head = statistics.median(head_times[key])
            row[f"{key}_head_ms"] = finite(head, 3)
            row[f"{key}_head_share"] = finite(head / ms)
        if case.detector:
            row[f"{key}_images_per_s"] = finite(1e3 * case.batch / ms, 3)
    return row


def _ratios(row: dict[str, Any]) -> None:
    """best_dense_ms and the speedups and efficiencies against it and against the gated dense mode."""
    dense = {k: row[f"{k}_ms"] for k in DENSE_KINDS if row.get(f"{k}_ms")}
    best = min(dense, key=dense.get)
    row["best_dense_ms"] = dense[best]
    row["best_dense"] = best
    flops = row.get("flops_ratio")

    def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
        return finite(num / den) if num and den else None

    row["speedup"] = ratio(row["best_dense_ms"], row.get("sparse_ms"))
    row["efficiency"] = finite(row["speedup"] * flops) if row["speedup"] and flops else None
    row["auto_speedup"] = ratio(row["best_dense_ms"], row.get("auto_ms"))
    row["speedup_vs_dense"] = ratio(row.get("dense_ms"), row.get("sparse_ms"))
    row["efficiency_vs_dense"] = (
        finite(row["speedup_vs_dense"] * flops) if row["speedup_vs_dense"] and flops else None
    )


def _points(s: Settings, pattern: str, case: Case, fractions: Optional[list[float]]) -> list:
    if pattern == "blob":
        return [(d, lambda shape, d=d: blob_mask(shape, d, s.seed)) for d in s.densities]
    if pattern == "random":
        return [(d, lambda shape, d=d: random_mask(shape, d, s.seed)) for d in s.random_densities]
    if pattern == "levels":
        return [(float("nan"), levels_pattern(fractions[: len(case.levels)], case.levels, s.seed))]
    return [(float("nan"), None)]


def _point_count(s: Settings, workload: str, pattern: str) -> int:
    per_case = {"blob": len(s.densities), "random": len(s.random_densities)}.get(pattern, 1)
    if pattern == "model":
        return len(s.batches)
    cases = len(s.batches) * (1 if workload in ("conv", "router") else len(s.routers))
    return cases * per_case * (len(s.archs) if workload == "detector" else 1)


def run_benchmark(s: Settings, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Measure every (workload, pattern, case, point) of ``s``; returns the rows."""
    import torch._inductor.config
    from tqdm import tqdm

    device = torch.device(s.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    allocator = tune_allocator(s.cpu_allocator)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    threshold = s.auto_threshold if s.auto_threshold is not None else load_crossover(device=device)
    threads = torch.get_num_threads()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    total = sum(_point_count(s, w, p) for w in s.workloads for p in s.patterns)
    log(f"device {device} ({dev_name}), torch threads {threads}, CPU allocator: {allocator}, auto threshold "
        f"{threshold}, compile {s.compile} ({s.compile_backend}), {total} points")
    fractions, source = None, None
    if "levels" in s.patterns:
        fractions, source = checkpoint_level_fractions(s, device)
        log(f"per-level active fractions of {s.weights} on {source} images: "
            + " ".join(f"P{i + 3} {f:.3f}" for i, f in enumerate(fractions)))
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=total, disable=not s.progress, desc="benchmark", file=sys.stderr, dynamic_ncols=True)
    # Inductor's CPU kernels show in the profiler (the compiled kernel counts) only when generated so.
    profiled = {"cpp.enable_kernel_profile": s.count and s.compile != "none"}
    with torch.no_grad(), compile_limits(), torch._inductor.config.patch(profiled):
        for workload in s.workloads:
            for pattern in s.patterns:
                for case in build_cases(s, workload, pattern, device):
                    rows += _run_case(s, case, pattern, device, threshold, fractions, source,
                                      (dev_name, threads, allocator), bar)
                    del case
                    if s.compile != "none":
                        torch._dynamo.reset()  # the next case compiles its own modules
    bar.close()
    return [_order(r) for r in rows]


def _run_case(s: Settings, case: Case, pattern: str, device: torch.device, threshold: float,
              fractions: Optional[list[float]], source: Optional[str], machine: tuple[str, int, str], bar) -> list:
    """The rows of one case: pass 1 times every execution eagerly and the dense kinds compiled at every
    point; under ``--compile all`` pass 2, after a dynamo reset, times the compiled sparse and auto
    executions (dynamo would otherwise run a partial graph of one mode in place of another's graph)."""
    apply_crossover(case.model, threshold)
    for m in case.model.modules():
        if isinstance(m, (DepthPath, ConvPair)):
            m.rulebook = s.rulebook
    compiled = [e for e in compiled_executions(s.compile) if e in case.executions and case.workload != "conv"]
    passes = [(True, [e for e in compiled if e not in SPARSE_KINDS])]
    if any(e in SPARSE_KINDS for e in compiled):
        passes.append((False, [e for e in compiled if e in SPARSE_KINDS]))
    points = _points(s, pattern, case, fractions)
    rows: list[dict[str, Any]] = [{} for _ in points]
    name = f"{case.workload}{' ' + case.arch if case.arch else ''} D{case.routers} N{case.batch}"
    with case.context():
        for p, (eager, execs) in enumerate(passes):
            state = _CaseState()
            if p:
                torch._dynamo.reset()
            for i, (density, pat) in enumerate(points):
                bar.set_description(f"{name} {pattern} {density:.2f}" + (" (compiled sparse)" if p else ""))
                if pat is not None:
                    case.set_pattern(pat)
                for _ in range(s.warmup if i == 0 and eager else 0):  # first use of this module
                    for e in case.executions:
                        case.prepare(e)
                        case.module(e)(case.inputs)
                rows[i].update(measure_point(case, s, device, state, first=i == 0, eager=eager, compiled=execs))
                if eager:
                    bar.update(1)
    out = []
    for (density, _), row in zip(points, rows):
        if pattern in ("model", "levels"):
            density = row["density_measured"]
        head = {
            "workload": case.workload, "arch": case.arch, "pattern": pattern, "density": finite(density),
            "routers": case.routers, "batch": case.batch, "channels": case.channels,
            "image": f"{case.image[0]}x{case.image[1]}", "device": machine[0], "threads": machine[1],
            "allocator": machine[2],
            "rulebook": s.rulebook or default_rulebook(device, torch.get_default_dtype()),
            "compile": s.compile, "compile_backend": s.compile_backend if compiled else None,
        }
        extra = {k: v for k, v in case.extra.items() if k != "backbone_macs"}
        if pattern == "levels":
            extra["level_fractions"] = " ".join(f"{f:.4f}" for f in fractions[: len(case.levels)])
            extra["images"] = source
        _ratios(row)
        row["auto_threshold"] = threshold
        out.append({**head, **extra, **row})
    return out


def _order(row: dict[str, Any]) -> dict[str, Any]:
    first = [k for k in ROW_KEYS if k in row]
    return {**{k: row[k] for k in first}, **{k: v for k, v in row.items() if k not in first}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    s, a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # dynamo's notes on each graph break and on traced lru_cache helpers: the rows count the breaks.
    torch._logging.set_logs(dynamo=logging.ERROR)
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    t0 = time.perf_counter()
    rows = run_benchmark(s)
    elapsed = time.perf_counter() - t0
    print(format_tables(rows))
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

