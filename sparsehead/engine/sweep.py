"""Accuracy–cost sweeps: one training run per grid point and seed, collected into a table and a curve.

``python tools/sweep.py CONFIG --grid model.head.budget_weight=0,0.1,0.4 model.head.num_routers=2,4
[--include-static] [--seeds 0,1,2] [--jobs N] --out DIR [key=value ...]`` runs :func:`main`.

Each run is the trainer itself (``train_main`` in a child process) with ``output_dir=DIR/<point>/seed<k>``;
the sweep only plans, schedules and collects. Planning (:func:`plan_sweep`) loads and validates every run's
config before anything starts. Running (:func:`run_sweep`) skips finished runs (a complete ``metrics.json``),
continues interrupted ones from their ``checkpoint.pth`` with ``--resume`` and keeps up to ``jobs`` child
processes going. Collecting (:func:`collect_rows`, :func:`aggregate`) reads each run's ``metrics.json``;
:func:`write_outputs` writes ``DIR/sweep.csv`` (one row per run), ``DIR/sweep_points.csv`` (one row per
point, over seeds), ``DIR/sweep.json`` (both) and ``DIR/sweep.png`` (mAP and AP50 against the realised
head GMACs per image). See docs/sweep.md.

Static heads (``--include-static``) are the plain and fixed heads with the same settings. A head kind does
not read every ``model.head`` key (:data:`UNUSED_HEAD_KEYS`): grid values of keys the kind does not read
are dropped for it, so the plain head is not trained once per budget weight, and runs whose configs are
then identical are trained once.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf

from sparsehead.config import ConfigError, load_config

from ..utils.file_io import atomic_write
from .checkpoint import atomic_write_json
from .evaluation import METRIC_KEYS
from .trainer import CHECKPOINT, FINAL_WEIGHTS, METRICS, METRICS_LOG

__all__ = [
    "UNUSED_HEAD_KEYS",
    "SweepError",
    "SweepRun",
    "Terminated",
    "aggregate",
    "collect_rows",
    "main",
    "parse_grid",
    "plan_sweep",
    "plot_sweep",
    "run_state",
    "run_sweep",
    "train_command",
    "write_outputs",
]

_GATE_KEYS = ("tau", "gate_activation", "gate_init", "budget_weight", "budget_warmup")
_H = "model.head."
# model.head keys that a head kind (and detector) never reads, from sparsehead.modeling.build. The
# execution keys stay with the fixed head: its ungated paths still run in that mode (same result, other speed).
UNUSED_HEAD_KEYS: Dict[tuple, frozenset] = {
    ("plain", "fcos"): frozenset(
        _H + k for k in (*_GATE_KEYS, "num_routers", "execution", "train_execution", "prior_prob", "norm", "gn_groups")
    ),
    ("plain", "retinanet"): frozenset(
        _H + k for k in (*_GATE_KEYS, "num_routers", "execution", "train_execution", "prior_prob", "num_convs",
                           "box_init")
    ),
    ("fixed", "fcos"): frozenset(_H + k for k in (*_GATE_KEYS, "num_convs", "norm")),
    ("fixed", "retinanet"): frozenset(_H + k for k in (*_GATE_KEYS, "num_convs", "norm", "box_init")),
    ("dynamic", "fcos"): frozenset(_H + k for k in ("num_convs", "norm")),
    ("dynamic", "retinanet"): frozenset(_H + k for k in ("num_convs", "norm", "box_init")),
}
STATIC_KINDS = ("plain", "fixed")
KIND_KEY = "model.head.kind"
# Keys the sweep sets itself: per run (output_dir), or through --seeds.
RESERVED_KEYS = ("output_dir", "seed")
RUN_RECORD = "sweep_run.json"  # the sweep's own bookkeeping in each run folder (attempts, wall time)
RUN_LOG = "sweep_run.log"  # the child's stdout and stderr, appended per attempt
RESULT_KEYS = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "head_gmacs_avg", "head_gmacs_min", "head_gmacs_max")
SEED_STATS = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "head_gmacs_avg")

Command = Callable[["SweepRun", bool], List[str]]


class SweepError(ValueError):
    """The sweep cannot start (bad grid, bad config, an output folder of another run); the message says why."""


@dataclass
class SweepRun:
    """One training run: a grid point (its own ``overrides``) with one seed.

    ``config`` is the config file, ``base`` the overrides every run shares (the user's, then any the sweep
    adds such as ``num_threads=1``) and ``cfg`` the resolved config of this run.
    """

    point: str
    seed: int
    config: str
    base: tuple
    overrides: tuple
    out_dir: Path
    cfg: DictConfig = field(repr=False)

    @property
    def name(self) -> str:
        return f"{self.point}/seed{self.seed}"

    @property
    def all_overrides(self) -> List[str]:
        return [*self.base, *self.overrides, f"seed={self.seed}", f"output_dir={self.out_dir}"]

    @property
    def settings(self) -> Dict[str, str]:
        """The point's own overrides as {dotted key: value text}."""
        return dict(o.split("=", 1) for o in self.overrides)


# ----------------------------------------------------------------------------------------------------
# Planning


def _split_values(text: str) -> List[str]:
    """Split ``text`` at the commas outside brackets, braces and quotes: ``[1,2],[3]`` -> ``[1,2]``, ``[3]``."""
    out, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    return out


def parse_grid(items: Iterable[str]) -> Dict[str, List[str]]:
    """``["key=v1,v2", ...]`` -> ``{key: [v1, v2]}`` (in order). Values are YAML like an override's;
    commas inside brackets belong to the value (``solver.steps=[300,370],[200,300]``)."""
    grid: Dict[str, List[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SweepError(f"--grid entry '{item}' must be of the form dotted.key=value1,value2,...")
        if key in grid:
            raise SweepError(f"--grid: '{key}' is given twice")
        if key in RESERVED_KEYS:
            hint = "use --seeds" if key == "seed" else "the sweep sets it to DIR/<point>/seed<k>"
            raise SweepError(f"--grid: '{key}' cannot be swept ({hint})")
        vals = _split_values(values)
        if not values.strip() or any(not v for v in vals):
            raise SweepError(f"--grid: '{key}' has an empty value in '{item}' (give a comma-separated list)")
        dup = sorted({v for v in vals if vals.count(v) > 1})
        if dup:
            raise SweepError(f"--grid: '{key}' repeats the value(s) {', '.join(dup)}")
        grid[key] = vals
    return grid


def _short_keys(keys: Iterable[str]) -> Dict[str, str]:
    """Each dotted key's shortest suffix that no other key ends with (``model.head.budget_weight`` ->
    ``budget_weight``)."""
    keys = sorted(set(keys))
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            short = ".".join(parts[-n:])
            if not any(o != key and (o == short or o.endswith("." + short)) for o in keys):
                break
        out[key] = short
    return out


def _slug(value: str) -> str:
    """A value as a file-name part; a value that had to be changed gets a short hash so names stay unique."""
    slug = re.sub(r"[^A-Za-z0-9.+-]", "_", value)
    if slug != value:
        slug += "-" + hashlib.sha1(value.encode()).hexdigest()[:6]
    return slug


def _point_name(kind: str, settings: Mapping[str, str], short: Mapping[str, str]) -> str:
    parts = [kind] + [f"{short[k]}-{_slug(v)}" for k, v in settings.items() if k != KIND_KEY]
    return "_".join(parts)


def _flat(cfg: Any) -> Dict[str, Any]:
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out: Dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(container, "")
    return out


def _cpu_run(cfg: DictConfig) -> bool:
    if cfg.device == "auto":
        import torch

        return not torch.cuda.is_available()
    return cfg.device == "cpu"


def _load(config: str, overrides: Sequence[str], what: str) -> DictConfig:
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        raise SweepError(f"{what}: {e}") from None


def plan_sweep(
    config: str,
    grid: Mapping[str, Sequence[str]],
    out: os.PathLike | str,
    seeds: Optional[Sequence[int]] = None,
    include_static: bool = False,
    overrides: Sequence[str] = (),
) -> List[SweepRun]:
    """Every run of the sweep, in order (grid points in the grid's order, then the static heads; seeds
    innermost). Loads and validates each run's config; raises :class:`SweepError` naming the key or run.

    ``overrides`` apply to every run. ``seeds``: None runs the config's ``seed`` only. When a CPU run's
    ``num_threads`` is 0 (torch's default: every core), the sweep sets ``num_threads=1`` for it so that
    parallel runs do not fight over the cores; any other value is kept.
    """
    if not Path(config).is_file():
        raise SweepError(f"config file not found: {config}")
    overrides = list(overrides)
    for item in overrides:
        key = item.partition("=")[0]
        if "=" not in item:
            raise SweepError(f"override '{item}' must be of the form dotted.key=value")
        if key in RESERVED_KEYS:
            hint = "use --seeds" if key == "seed" else "the sweep sets it per run from --out"
            raise SweepError(f"override '{item}': '{key}' cannot be set for a sweep ({hint})")
        if key in grid:
            raise SweepError(f"override '{item}': '{key}' is also in --grid")
    if include_static and (KIND_KEY in grid or any(o.startswith(KIND_KEY + "=") for o in overrides)):
        raise SweepError(f"--include-static adds {KIND_KEY}=plain|fixed itself; do not also set {KIND_KEY}")
    for key, values in grid.items():
        if not values:
            raise SweepError(f"--grid: '{key}' has no values")
    base_cfg = _load(config, overrides, "config")
    seeds = [int(base_cfg.seed)] if seeds is None else list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds must be distinct integers, got {seeds}")

    combos = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())]
    points = [dict(c) for c in combos]
    if include_static:
        points += [{KIND_KEY: kind, **c} for kind in STATIC_KINDS for c in combos]

    out = Path(out).expanduser().resolve()
    config_path = str(Path(config).resolve())
    short = _short_keys(list(grid) + ([KIND_KEY] if include_static else []))
    runs: List[SweepRun] = []
    seen: Dict[str, str] = {}  # resolved config (as text) -> point name
    for settings in points:
        text = " ".join(f"{k}={v}" for k, v in settings.items())
        cfg = _load(config, overrides + [f"{k}={v}" for k, v in settings.items()], f"grid point '{text}'")
        unused = UNUSED_HEAD_KEYS.get((cfg.model.head.kind, cfg.model.arch), frozenset())
        settings = {k: v for k, v in settings.items() if k not in unused}
        point_overrides = [f"{k}={v}" for k, v in settings.items()]
        cfg = _load(config, overrides + point_overrides, f"grid point '{text}'")
        key = json.dumps({k: v for k, v in _flat(cfg).items() if k not in RESERVED_KEYS}, sort_keys=True)
        if key in seen:
            continue  # same config as an earlier point (a key this head does not read was dropped)
        name = _point_name(cfg.model.head.kind, settings, short)
        if name in seen.values():
            raise SweepError(f"two grid points are both named '{name}'; give the values distinct spellings")
        seen[key] = name
        base = list(overrides)
        if cfg.num_threads == 0 and _cpu_run(cfg):
            base.append("num_threads=1")
        for seed in seeds:
            run_dir = out / name / f"seed{seed}"
            run_cfg = _load(config, [*base, *point_overrides, f"seed={seed}", f"output_dir={run_dir}"],
                            f"run {name}/seed{seed}")
            runs.append(SweepRun(name, seed, config_path, tuple(base), tuple(point_overrides), run_dir, run_cfg))
    for run in runs:
        run_state(run)  # a folder holding another run is an error before anything starts
    return runs


def _read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def finished_metrics(run_dir: Path) -> Optional[Dict[str, float]]:
    """The metrics of a finished run in ``run_dir``: its ``metrics.json`` when complete (every
    :data:`METRIC_KEYS` entry) beside ``model_final.pth``; None otherwise."""
    metrics = _read_json(run_dir / METRICS)
    if not isinstance(metrics, dict) or not (run_dir / FINAL_WEIGHTS).is_file():
        return None
    if any(not isinstance(metrics.get(k), (int, float)) for k in METRIC_KEYS):
        return None
    return metrics


def run_state(run: SweepRun) -> str:
    """``done`` (finished), ``resume`` (has a checkpoint to continue from) or ``new``.

    Raises :class:`SweepError` when the folder holds a run of another config (its ``config.yaml`` differs
    from ``run.cfg`` in a key both have).
    """
    stored_path = run.out_dir / "config.yaml"
    if stored_path.is_file():
        try:
            stored = _flat(yaml.safe_load(stored_path.read_text()) or {})
        except yaml.YAMLError as e:
            raise SweepError(f"{stored_path}: unreadable ({e}); delete {run.out_dir} to run it again") from None
        wanted = _flat(run.cfg)
        diff = [f"{k}: {stored[k]!r} -> {wanted[k]!r}" for k in wanted if k in stored and stored[k] != wanted[k]]
        if diff:
            raise SweepError(
                f"{run.out_dir} holds a run with another config ({'; '.join(diff[:5])}"
                f"{' ...' if len(diff) > 5 else ''}); delete that folder or choose another --out"
            )
    if finished_metrics(run.out_dir) is not None:
        return "done"
    if (run.out_dir / CHECKPOINT).is_file() or (run.out_dir / FINAL_WEIGHTS).is_file():
        return "resume"
    return "new"


# ----------------------------------------------------------------------------------------------------
# Running


def train_command(run: SweepRun, resume: bool) -> List[str]:
    """The child process of one run: the trainer's command-line entry point in this Python."""
    code = "import sys; from sparsehead.engine.launch import train_main; train_main(sys.argv[1:])"
    return [sys.executable, "-c", code, run.config, *run.all_overrides, *(["--resume"] if resume else [])]


def _child_env(run: SweepRun) -> Dict[str, str]:
    import sparsehead

    env = dict(os.environ)
    # The child imports the same sparsehead as this process.
    root = str(Path(sparsehead.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    if run.cfg.num_threads > 0 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(run.cfg.num_threads)
    return env


def _record(run: SweepRun) -> Dict[str, Any]:
    rec = _read_json(run.out_dir / RUN_RECORD)
    return rec if isinstance(rec, dict) else {}


def _add_attempt(run: SweepRun, seconds: float, returncode: Optional[int], command: List[str]) -> None:
    rec = _record(run)
    rec["attempts"] = int(rec.get("attempts", 0)) + 1
    rec["wall_time_s"] = float(rec.get("wall_time_s", 0.0)) + seconds
    rec["last_returncode"] = returncode
    rec["last_command"] = command
    atomic_write_json(rec, run.out_dir / RUN_RECORD)


def _tail(path: Path, n: int = 6) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    except OSError:
        return ""
    return "\n".join("    " + ln for ln in lines[-n:])


def _fmt_time(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"


def _summary(metrics: Mapping[str, float]) -> str:
    return (f"mAP {metrics['bbox_mAP']:.3f}  AP50 {metrics['bbox_mAP_50']:.3f}  head GMACs "
            f"{metrics['head_gmacs_avg']:.3f} ({metrics['head_gmacs_min']:.3f}-{metrics['head_gmacs_max']:.3f})")


def _print(message: str) -> None:
    print(message, flush=True)  # progress shows up at once when the output goes to a file


class Terminated(KeyboardInterrupt):
    """A sweep stopped by a signal other than Ctrl-C's (``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def _stop_signals() -> Iterator[Callable[[], None]]:
    """Within the block SIGINT and SIGTERM are noted where they arrive, and the ``check()`` it yields raises
    KeyboardInterrupt (SIGINT) or :class:`Terminated` (SIGTERM) at the caller's chosen points: an exception
    raised where a signal lands could leave a child's ``Popen`` lock held (inside ``poll()``), and waiting
    for that child would then never return. Outside the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    received: List[int] = []

    def note(signum: int, frame: Any) -> None:
        received.append(signum)

    def check() -> None:
        if received:
            raise KeyboardInterrupt if received[0] == signal.SIGINT else Terminated(received[0])

    previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield check
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_sweep(
    runs: Sequence[SweepRun],
    jobs: int = 1,
    command: Command = train_command,
    log: Callable[[str], None] = _print,
    poll_s: float = 0.2,
) -> Dict[str, str]:
    """Run every unfinished run, up to ``jobs`` at a time; returns {run name: done | failed}.

    A finished run is not started again; a run with a ``checkpoint.pth`` is continued with ``--resume``;
    any other is started afresh. ``command(run, resume)`` gives the child's argv (default
    :func:`train_command`); its output is appended to ``<run dir>/sweep_run.log``. A failed run does not stop
    the others. On KeyboardInterrupt, or SIGTERM (``kill``, a job scheduler's stop; when called from the main
    thread), the children are terminated (a training run writes its checkpoint first), so that none goes on
    unwatched in a folder the next sweep will use, and KeyboardInterrupt (:class:`Terminated` for SIGTERM)
    is raised.
    """
    if jobs < 1:
        raise SweepError(f"--jobs must be >= 1, got {jobs}")
    states = {r.name: run_state(r) for r in runs}
    status = {r.name: "done" for r in runs if states[r.name] == "done"}
    pending = [r for r in runs if states[r.name] != "done"]
    total, started = len(pending), 0
    if len(status):
        log(f"{len(status)} of {len(runs)} runs already finished; not re-run")
    running: List[tuple] = []  # (process, run, start time, log file, argv)

    def finish(proc: subprocess.Popen, run: SweepRun, t0: float, logf: Any, argv: List[str]) -> None:
        elapsed = time.perf_counter() - t0
        logf.close()
        _add_attempt(run, elapsed, proc.returncode, argv)
        metrics = finished_metrics(run.out_dir)
        if proc.returncode == 0 and metrics is not None:
            status[run.name] = "done"
            log(f"done    {run.name}  {_summary(metrics)}  [{_fmt_time(elapsed)}]")
        else:
            status[run.name] = "failed"
            log(f"FAILED  {run.name} (exit status {proc.returncode}) after {_fmt_time(elapsed)}; "
                f"last lines of {run.out_dir / RUN_LOG}:\n{_tail(run.out_dir / RUN_LOG)}")

    try:
        with _stop_signals() as check:
            while pending or running:
                check()  # a stop signal since the last round: no new run is started
                while pending and len(running) < jobs:
                    run = pending.pop(0)
                    resume = states[run.name] == "resume"
                    argv = command(run, resume)
                    run.out_dir.mkdir(parents=True, exist_ok=True)
                    logf = open(run.out_dir / RUN_LOG, "ab")
                    logf.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
                    logf.flush()
                    started += 1
                    log(f"[{started}/{total}] {'resume' if resume else 'start '} {run.name}")
                    proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=_child_env(run))
                    running.append((proc, run, time.perf_counter(), logf, argv))
                time.sleep(poll_s)
                for item in [it for it in running if it[0].poll() is not None]:
                    running.remove(item)
                    finish(*item)
    except BaseException:
        for item in running:
            item[0].terminate()
        for proc, run, t0, logf, argv in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            logf.close()
            _add_attempt(run, time.perf_counter() - t0, proc.returncode, argv)
        raise
    return status


# ----------------------------------------------------------------------------------------------------
# Results


def _train_loop_s(run_dir: Path) -> Optional[float]:
    """The trainer's own training-loop time: the last ``elapsed`` of each stretch of ``metrics.jsonl``
    (a resumed run restarts the clock), summed."""
    try:
        lines = (run_dir / METRICS_LOG).read_text().splitlines()
    except OSError:
        return None
    total, last = 0.0, None
    for line in lines:
        try:
            elapsed = json.loads(line).get("elapsed")
        except (ValueError, AttributeError):
            continue
        if not isinstance(elapsed, (int, float)):
            continue
        if last is not None and elapsed < last:
            total += last
        last = elapsed
    return None if last is None else total + last


def collect_rows(runs: Sequence[SweepRun], status: Optional[Mapping[str, str]] = None) -> List[Dict[str, Any]]:
    """One row per run: its point, seed, head, grid values, metrics and times.

    ``status``: what :func:`run_sweep` returned; a run without a finished ``metrics.json`` is ``failed``
    when it says so and ``unfinished`` otherwise. Metric fields of unfinished runs are None.
    """
    status = status or {}
    grid_keys = list(dict.fromkeys(k for r in runs for k in r.settings if k != KIND_KEY))
    rows = []
    for run in runs:
        cfg = run.cfg
        metrics = finished_metrics(run.out_dir)
        kind = cfg.model.head.kind
        rec = _record(run)
        row: Dict[str, Any] = {
            "point": run.point,
            "seed": run.seed,
            "status": "done" if metrics else ("failed" if status.get(run.name) == "failed" else "unfinished"),
            "arch": cfg.model.arch,
            "head": kind,
            "depth": None if kind == "plain" else int(cfg.model.head.num_routers),
            "budget_weight": float(cfg.model.head.budget_weight) if kind == "dynamic" else None,
        }
        row.update({k: run.settings.get(k) for k in grid_keys})
        row["overrides"] = " ".join(run.overrides)
        row.update({k: (float(metrics[k]) if metrics else None) for k in RESULT_KEYS})
        wall, loop = rec.get("wall_time_s"), _train_loop_s(run.out_dir) if metrics else None
        row["run_time_s"] = None if wall is None else round(float(wall), 3)
        row["train_loop_s"] = None if loop is None else round(loop, 3)
        row["attempts"] = rec.get("attempts")
        row["run_dir"] = str(run.out_dir)
        rows.append(row)
    return rows


def _mean(values: List[float]) -> Optional[float]:
    return statistics.fmean(values) if values else None


def aggregate(rows: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One record per point over its finished seeds: ``<metric>_mean``, ``_std`` (sample standard deviation,
    None for one seed), ``_seed_min`` and ``_seed_max`` for mAP, AP50, AP75 and the average head GMACs;
    ``head_gmacs_min``/``max``: the per-image extremes over all its seeds; mean run and training times."""
    by_point: Dict[str, List[Mapping[str, Any]]] = {}
    for r in rows:
        by_point.setdefault(r["point"], []).append(r)
    out = []
    for group in by_point.values():
        done = [r for r in group if r["status"] == "done"]
        first = group[0]
        rec: Dict[str, Any] = {
            k: first[k] for k in first
            if k not in ("seed", "status", "run_dir", "attempts", "run_time_s", "train_loop_s", *RESULT_KEYS)
        }
        rec["seeds"] = " ".join(str(r["seed"]) for r in done)
        rec["num_seeds"] = len(done)
        rec["num_runs"] = len(group)
        for key in SEED_STATS:
            vals = [r[key] for r in done]
            rec[f"{key}_mean"] = _mean(vals)
            rec[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else None
            rec[f"{key}_seed_min"] = min(vals) if vals else None
            rec[f"{key}_seed_max"] = max(vals) if vals else None
        rec["head_gmacs_min"] = min((r["head_gmacs_min"] for r in done), default=None)
        rec["head_gmacs_max"] = max((r["head_gmacs_max"] for r in done), default=None)
        rec["run_time_s_mean"] = _mean([r["run_time_s"] for r in done if r["run_time_s"] is not None])
        rec["train_loop_s_mean"] = _mean([r["train_loop_s"] for r in done if r["train_loop_s"] is not None])
        out.append(rec)
    return out


def _csv_bytes(records: Sequence[Mapping[str, Any]]) -> bytes:
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in records for k in r))
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    return buf.getvalue().encode()


def _line_label(p: Mapping[str, Any], along: str) -> str:
    skip = {KIND_KEY, _H + "num_routers", along}
    extra = [o for o in p["overrides"].split() if o.partition("=")[0] not in skip]
    depth = f" D{p['depth']}" if p["depth"] is not None else ""
    return f"{p['head']}{depth}" + (f" ({', '.join(extra)})" if extra else "")


def plot_sweep(points: Sequence[Mapping[str, Any]], title: str = "") -> Any:
    """A matplotlib ``Figure`` (not managed by pyplot): mAP (left) and AP50 (right) against the realised
    head GMACs per image, for ``points`` as :func:`aggregate` returns them.

    Dynamic points that differ only in ``model.head.budget_weight`` are joined by a line (one line per
    depth and other setting), each marker labelled with its λ; static heads are labelled points. Markers
    sit at the mean over seeds; horizontal bars span the per-image min–max GMACs, vertical bars the min–max
    over seeds (with more than one seed). Points without a finished run are left out.
    """
    import matplotlib as mpl
    from matplotlib.figure import Figure

    along = _H + "budget_weight"
    pts = [p for p in points if p["num_seeds"]]
    lines: Dict[str, List[Mapping[str, Any]]] = {}
    for p in pts:
        lines.setdefault(_line_label(p, along), []).append(p)
    fig = Figure(figsize=(12, 4.8))
    axes = fig.subplots(1, 2)
    colors = mpl.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric, name in ((axes[0], "bbox_mAP", "mAP@[.5:.95]"), (axes[1], "bbox_mAP_50", "AP50")):
        for i, (label, group) in enumerate(lines.items()):
            group = sorted(group, key=lambda p: p["head_gmacs_avg_mean"])
            dynamic = group[0]["head"] == "dynamic"
            x = [p["head_gmacs_avg_mean"] for p in group]
            y = [p[f"{metric}_mean"] for p in group]
            xerr = [[a - p["head_gmacs_min"] for a, p in zip(x, group)],
                    [p["head_gmacs_max"] - a for a, p in zip(x, group)]]
            yerr = [[b - (p[f"{metric}_seed_min"] if p["num_seeds"] > 1 else b) for b, p in zip(y, group)],
                    [(p[f"{metric}_seed_max"] if p["num_seeds"] > 1 else b) - b for b, p in zip(y, group)]]
            ax.errorbar(
                x, y, xerr=xerr, yerr=yerr, color=colors[i % len(colors)], marker="o" if dynamic else "s",
                ms=6 if dynamic else 8, ls="-" if dynamic and len(group) > 1 else "none", lw=1.5,
                elinewidth=0.8, capsize=3, label=label,
            )
            for p, a, b in zip(group, x, y):
                text = f"λ={p['budget_weight']:g}" if dynamic else label
                ax.annotate(text, (a, b), textcoords="offset points", xytext=(4, 5), fontsize=7)
        ax.set_xlabel("realised head GMACs per image (bars: min–max over images)")
        ax.set_ylabel(name)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    seeds = max((p["num_seeds"] for p in pts), default=0)
    fig.suptitle(f"{title}  (mean over up to {seeds} seed(s); vertical bars: min–max over seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def write_outputs(
    out: os.PathLike | str, rows: Sequence[Mapping[str, Any]], plot: bool = True, title: str = "", dpi: int = 110
) -> List[Path]:
    """Write ``sweep.csv`` (runs), ``sweep_points.csv`` (points), ``sweep.json`` ({"runs", "points"}) and,
    when ``plot`` and some run finished, ``sweep.png``, each atomically; returns the paths written."""
    out = Path(out)
    points = aggregate(rows)
    paths = [
        atomic_write(out / "sweep.csv", lambda f: f.write(_csv_bytes(rows))),
        atomic_write(out / "sweep_points.csv", lambda f: f.write(_csv_bytes(points))),
    ]
    atomic_write_json({"runs": list(rows), "points": points}, out / "sweep.json")
    paths.append(out / "sweep.json")
    if plot and any(p["num_seeds"] for p in points):
        fig = plot_sweep(points, title)
        paths.append(atomic_write(out / "sweep.png", lambda f: fig.savefig(f, format="png", dpi=dpi)))
    return paths


def format_points(points: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table of the points: mAP and AP50 (mean ± std over seeds), head GMACs, run time."""

    def pm(p: Mapping[str, Any], key: str) -> str:
        if p[f"{key}_mean"] is None:
            return "-"
        std = p[f"{key}_std"]
        return f"{p[f'{key}_mean']:.3f}" + (f" ± {std:.3f}" if std is not None else "")

    width = max([len(p["point"]) for p in points] + [5])
    lines = [f"{'point':<{width}}  seeds  {'mAP':<13}  {'AP50':<13}  head GMACs (min-max)   run time"]
    for p in points:
        g = p["head_gmacs_avg_mean"]
        gm = "-" if g is None else f"{g:.3f} ({p['head_gmacs_min']:.3f}-{p['head_gmacs_max']:.3f})"
        lines.append(f"{p['point']:<{width}}  {p['num_seeds']}/{p['num_runs']:<3}  {pm(p, 'bbox_mAP'):<13}  "
                     f"{pm(p, 'bbox_mAP_50'):<13}  {gm:<21}  {_fmt_time(p['run_time_s_mean'])}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sweep.py",
        description="Train and evaluate one run per grid point and seed; write DIR/sweep.csv, sweep_points.csv, "
        "sweep.json and sweep.png (mAP and AP50 against realised head GMACs). Finished runs are never re-run.",
    )
    p.add_argument("config", help="YAML config file every run starts from (e.g. configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value applied to every run (before --grid or after "
                   "another option)")
    p.add_argument("--grid", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                   help="values to sweep; one run per combination (Cartesian product)")
    p.add_argument("--include-static", action="store_true",
                   help="also the plain and fixed heads (model.head.kind=plain|fixed), once per combination "
                   "of the grid keys they read")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2 (default: the config's seed)")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (default 1)")
    p.add_argument("--out", required=True, help="sweep folder: one sub-folder per point and seed, and the results")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, start nothing")
    p.add_argument("--collect-only", action="store_true", help="write the results of the finished runs only")
    p.add_argument("--no-plot", action="store_true", help="do not write sweep.png (no matplotlib needed)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0: every run finished; 1: some failed)."""
    p = build_parser()
    a = p.parse_intermixed_args(argv)
    if a.jobs < 1:
        p.error(f"--jobs must be >= 1, got {a.jobs}")
    seeds = None
    if a.seeds is not None:
        try:
            seeds = [int(s) for s in a.seeds.split(",")]
        except ValueError:
            p.error(f"--seeds must be comma-separated integers, got {a.seeds!r}")
    if not a.no_plot and not a.dry_run:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("sweep.png needs matplotlib (pip install 'sparsehead[viz]'), or pass --no-plot")
    try:
        runs = plan_sweep(a.config, parse_grid(a.grid), a.out, seeds, a.include_static, a.overrides)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    states = {r.name: run_state(r) for r in runs}
    if a.dry_run:
        for r in runs:
            print(f"{states[r.name]:<7} {r.name:<50} {' '.join(r.overrides)}")
        print(f"{len(runs)} runs, {sum(s == 'done' for s in states.values())} finished")
        return 0
    status: Dict[str, str] = {}
    if not a.collect_only:
        from .trainer import prepare_data

        for cfg in {json.dumps(_flat(r.cfg.data), sort_keys=True): r.cfg for r in runs if states[r.name] != "done"
                    }.values():
            syn = cfg.data.synthetic
            if syn.enabled and not Path(syn.root).exists():
                print(f"generating the dataset at {syn.root}", flush=True)
            try:
                prepare_data(cfg, rank=0)  # once here, not in several runs at the same time
            except (FileNotFoundError, ValueError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        try:
            status = run_sweep(runs, a.jobs)
        except KeyboardInterrupt as e:
            print("interrupted; run the same command again to continue", file=sys.stderr)
            rows = collect_rows(runs)
            write_outputs(a.out, rows, plot=not a.no_plot, title=Path(a.config).name)
            return 128 + getattr(e, "signum", signal.SIGINT)
    rows = collect_rows(runs, status)
    print(format_points(aggregate(rows)))
    for path in write_outputs(a.out, rows, plot=not a.no_plot, title=Path(a.config).name):
        print(f"wrote {path}")
    failed = [r["point"] + f"/seed{r['seed']}" for r in rows if r["status"] != "done"]
    if failed:
        print(f"{len(failed)} run(s) did not finish: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
