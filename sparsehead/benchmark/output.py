"""Benchmark outputs: ``benchmark.json``, ``benchmark.csv``, ``benchmark.png`` and the printed tables."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ..utils.file_io import atomic_write
from .settings import EXECUTIONS

__all__ = ["write_outputs", "format_table", "format_counts", "format_detector", "format_tables"]


def write_outputs(rows: list[dict[str, Any]], out: Path, plot: bool = True) -> list[Path]:
    """``out/benchmark.json`` (list of rows), ``out/benchmark.csv`` and ``out/benchmark.png``."""
    out = Path(out)
    written = [out / "benchmark.json", out / "benchmark.csv"]
    data = (json.dumps(rows, indent=1) + "\n").encode()
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    png = None
    if plot:
        from .plot import plot_rows

        png = plot_rows(rows)  # before writing anything: a plotting error leaves no half-written output
    atomic_write(written[0], lambda f: f.write(data))
    atomic_write(written[1], lambda f: f.write(buf.getvalue().encode()))
    if png is not None:
        atomic_write(out / "benchmark.png", lambda f: f.write(png))
        written.append(out / "benchmark.png")
    return written


def _table(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> str:
    cols = [c for c in cols if any(r.get(c[1]) is not None for r in rows)]
    cells = [[h for h, _, _ in cols]]
    for r in rows:
        cells.append([fmt.format(r[k]) if r.get(k) is not None else "-" for _, k, fmt in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c[i].rjust(widths[i]) for i in range(len(cols))) for c in cells)


_CASE = [("workload", "workload", "{}"), ("arch", "arch", "{}"), ("D", "routers", "{}"), ("N", "batch", "{}"),
         ("pattern", "pattern", "{}"), ("density", "density", "{:.3f}")]


def format_table(rows: list[dict[str, Any]]) -> str:
    """Times (ms) and the ratios against the best dense execution."""
    cols = _CASE + [
        ("active", "active", "{:.3f}"), ("best_dense", "best_dense_ms", "{:.1f}"), ("from", "best_dense", "{}"),
        ("dense", "dense_ms", "{:.1f}"), ("dense_c", "dense_compiled_ms", "{:.1f}"), ("fixed", "fixed_ms", "{:.1f}"),
        ("fixed_c", "fixed_compiled_ms", "{:.1f}"), ("plain", "plain_ms", "{:.1f}"),
        ("plain_c", "plain_compiled_ms", "{:.1f}"), ("sparse", "sparse_ms", "{:.1f}"),
        ("sparse_c", "sparse_compiled_ms", "{:.1f}"), ("auto", "auto_ms", "{:.1f}"),
        ("flops", "flops_ratio", "{:.3f}"), ("speedup", "speedup", "{:.2f}"), ("eff", "efficiency", "{:.2f}"),
        ("vs_dense", "speedup_vs_dense", "{:.2f}"), ("sp_MiB", "sparse_mem_mb", "{:.0f}"),
        ("dn_MiB", "dense_mem_mb", "{:.0f}"),
    ]
    return _table(rows, cols)


def format_counts(rows: list[dict[str, Any]]) -> str:
    """Kernels / host reads of one eager forward, and kernels and graph breaks of each compiled execution."""
    cols = list(_CASE)
    for e in EXECUTIONS:
        cols += [(f"{e}_kern", f"{e}_kernels", "{}"), (f"{e}_sync", f"{e}_syncs", "{}")]
    for e in EXECUTIONS:
        cols += [(f"{e}_c_kern", f"{e}_compiled_kernels", "{}"), (f"{e}_breaks", f"{e}_graph_breaks", "{}")]
    return _table(rows, cols)


def format_detector(rows: list[dict[str, Any]]) -> str:
    """Images per second of each detector execution and the head's share of its time."""
    det = [r for r in rows if r.get("workload") == "detector"]
    if not det:
        return ""
    cols = list(_CASE)
    for e in EXECUTIONS:
        for key in (e, f"{e}_compiled"):
            cols += [(f"{key} img/s", f"{key}_images_per_s", "{:.2f}"), ("head", f"{key}_head_share", "{:.0%}")]
    return _table(det, cols)


def format_tables(rows: list[dict[str, Any]]) -> str:
    """The three tables above, each under a title (the detector table only with detector rows)."""
    parts = [("time (ms) and speedup over the best dense execution", format_table(rows)),
             ("kernels / host reads per eager forward, kernels and graph breaks per compiled forward",
              format_counts(rows)),
             ("detector images/s and the head's share of the time", format_detector(rows))]
    return "\n\n".join(f"{title}\n{text}" for title, text in parts if text)
