"""The dense/sparse crossover: the active fraction above which a gated path is faster run densely.

``auto`` execution runs a path sparse when its active fraction is at most ``Router.auto_threshold``.
The best threshold depends on the device and thread count; ``tools/benchmark.py`` measures it (the
fraction where sparse time equals dense time on the ``tower`` workload) and saves it as a small JSON::

    {"device": "...", "threads": 2, "threshold": 0.31, "measured": "2025-01-01T12:00:00"}

:func:`load_crossover` reads such a file (by default the one shipped in ``sparsehead/benchmark/data`` for
the device type: ``crossover.json`` for CPUs, ``crossover_cuda.json`` for CUDA GPUs) and
:func:`apply_crossover` sets the threshold on every router of a model.
"""
from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..modeling.router import Router
from ..utils.file_io import atomic_write

__all__ = [
    "DEFAULT_CROSSOVER",
    "default_crossover",
    "FALLBACK_THRESHOLD",
    "CrossoverError",
    "load_crossover",
    "save_crossover",
    "apply_crossover",
    "find_crossover",
]

PathLike = Union[str, os.PathLike]

DEFAULT_CROSSOVER = Path(__file__).resolve().parent / "data" / "crossover.json"  # CPU
_DEVICE_CROSSOVERS = {"cuda": DEFAULT_CROSSOVER.with_name("crossover_cuda.json")}
# Used when the shipped file is absent: a conservative value (sparse wins clearly below it on CPU).
FALLBACK_THRESHOLD = 0.3


class CrossoverError(ValueError):
    """A crossover file is missing or malformed; the message names the file."""


def _check_threshold(value: Any, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CrossoverError(f"{source}: 'threshold' must be a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise CrossoverError(f"{source}: 'threshold' must be in [0, 1], got {value}")
    return float(value)


def read_crossover(path: PathLike) -> dict[str, Any]:
    """The whole crossover record of ``path`` (checked); raises :class:`CrossoverError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CrossoverError(f"crossover file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CrossoverError(f"{path}: not a valid crossover JSON file: {e}") from None
    if not isinstance(data, dict) or "threshold" not in data:
        raise CrossoverError(f"{path}: expected a JSON object with a 'threshold' key")
    data["threshold"] = _check_threshold(data["threshold"], str(path))
    return data


def default_crossover(device: Union[str, torch.device] = "cpu") -> Path:
    """The crossover file shipped for ``device``'s type (CPU: :data:`DEFAULT_CROSSOVER`)."""
    return _DEVICE_CROSSOVERS.get(torch.device(device).type, DEFAULT_CROSSOVER)


def load_crossover(path: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu") -> float:
    """The ``auto`` threshold stored in ``path``.

    With ``path=None`` the file shipped with the package for ``device``'s type is read
    (:func:`default_crossover`), or :data:`FALLBACK_THRESHOLD` is returned when it is absent. A given
    path that is missing or malformed raises :class:`CrossoverError`.
    """
    if path is None:
        path = default_crossover(device)
        if not path.is_file():
            return FALLBACK_THRESHOLD
    return read_crossover(path)["threshold"]


def save_crossover(
    path: PathLike, threshold: float, device: str, threads: int, extra: Optional[Mapping[str, Any]] = None
) -> dict[str, Any]:
    """Write ``{"device", "threads", "threshold", "measured", **extra}`` to ``path`` atomically."""
    record: dict[str, Any] = {
        "device": device,
        "threads": int(threads),
        "threshold": _check_threshold(threshold, "threshold"),
        "measured": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    record.update(extra or {})
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
    return record


def apply_crossover(model: nn.Module, threshold: float) -> int:
    """Set ``auto_threshold`` on every :class:`Router` (and benchmark module that has one) in ``model``.

    Returns the number of modules changed.
    """
    threshold = _check_threshold(threshold, "threshold")
    count = 0
    for m in model.modules():
        if isinstance(m, Router) or hasattr(m, "auto_threshold"):
            m.auto_threshold = threshold
            count += 1
    return count


def find_crossover(fractions: Sequence[float], ratios: Sequence[float], points: int = 3) -> float:
    """Active fraction where sparse time / dense time reaches 1, from a least-squares line.

    The ratio is fitted as ``a + b * fraction`` through the ``points`` points with the highest fractions
    (robust to one noisy point, unlike interpolating the first crossing) and ``(1 - a) / b`` is
    returned, clipped to [0, 1]: 1.0 when sparse wins everywhere, 0.0 when it loses everywhere. Only
    the top of the sweep is fitted because that is where the crossing lies and where the curve bends:
    near full density the depth path's dilated pixel set saturates and sparse time rises faster.
    """
    pts = sorted((float(f), float(r)) for f, r in zip(fractions, ratios) if math.isfinite(f) and math.isfinite(r))
    if not pts:
        raise ValueError("no finite points to find a crossover from")
    pts = pts[-max(2, points):]
    n = len(pts)
    mx = sum(f for f, _ in pts) / n
    my = sum(r for _, r in pts) / n
    sxx = sum((f - mx) ** 2 for f, _ in pts)
    b = sum((f - mx) * (r - my) for f, r in pts) / sxx if sxx > 0 else 0.0
    if b <= 0:
        return 1.0 if my < 1.0 else 0.0
    return float(min(1.0, max(0.0, mx + (1.0 - my) / b)))


def crossover_from_rows(rows: Iterable[Mapping[str, Any]], workload: str = "tower") -> dict[str, Any]:
    """Crossover per (routers, batch, channels) series of ``workload`` blob rows, and the threshold.

    The x-axis is each row's ``active`` (the active fraction the ``auto`` rule compares, for the depth
    path that dominates the cost). The threshold is the median over series.

    Returns ``{"threshold": float, "series": {"D4 N1 C256": float, ...}}``; raises ``ValueError`` when
    no row qualifies.
    """
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get("workload") != workload or r.get("pattern") != "blob":
            continue
        if not r.get("dense_ms") or r.get("sparse_ms") is None or r.get("active") is None:
            continue
        key = f"D{r['routers']} N{r['batch']} C{r['channels']}"
        series.setdefault(key, []).append((float(r["active"]), r["sparse_ms"] / r["dense_ms"]))
    if not series:
        raise ValueError(f"no '{workload}' rows with blob gates to measure the crossover from")
    found = {k: find_crossover([p[0] for p in v], [p[1] for p in v]) for k, v in series.items()}
    vals = sorted(found.values())
    mid = len(vals) // 2
    threshold = vals[mid] if len(vals) % 2 else 0.5 * (vals[mid - 1] + vals[mid])
    return {"threshold": round(threshold, 4), "series": found}
