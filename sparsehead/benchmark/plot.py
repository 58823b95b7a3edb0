"""Plot of benchmark rows: speedup over the best dense execution, then time per forward, vs active fraction.

The first panel shows, for every (workload, routers, batch, channels, image) series, ``speedup`` =
``best_dense_ms / sparse_ms`` (solid) and ``auto_speedup`` (dotted) over the active fraction, with 1 (as
fast as the best dense execution) marked. The next panels, one per series, show the time of each
execution (gated modes, the static baselines, compiled variants dashed), the best dense time (black),
and the ideal ``best_dense_ms × flops_ratio`` (the time if it fell with the realised MACs). Blob points
are joined by lines, random points are open markers, model and levels points stars. matplotlib is
imported here only, with the Agg backend.
"""
from __future__ import annotations

import io
import math
from typing import Any, Sequence

__all__ = ["plot_rows"]

_STYLE = {"dense": ("C0", "o"), "sparse": ("C3", "s"), "auto": ("C2", "^"), "fixed": ("C1", "D"),
          "plain": ("C4", "v")}
_POINTS = (("random", "none"), ("model", None), ("levels", None))


def _key(r: dict[str, Any]) -> tuple:
    return (r["workload"], r.get("arch"), r.get("routers"), r.get("batch"), r.get("channels"), r.get("image"))


def _title(key: tuple) -> str:
    workload, arch, d, b, c, image = key
    return f"{workload}" + (f" {arch}" if arch else "") + (f" D{d}" if d else "") + f" N{b} C{c} {image}"


def _minor_label(value: float, _: Any) -> str:
    """Labels 2× and 5× each power of ten on a log axis, no other minor tick."""
    lead = value / 10 ** math.floor(math.log10(value)) if value > 0 else 0
    return f"{value:g}" if round(lead, 6) in (2.0, 5.0) else ""


def _speedup_panel(ax, series: dict[tuple, list[dict[str, Any]]]) -> None:
    from matplotlib.ticker import FuncFormatter

    for i, (key, group) in enumerate(series.items()):
        col = f"C{i % 10}"
        blob = sorted((r for r in group if r["pattern"] == "blob" and r.get("speedup")), key=lambda r: r["density"])
        if blob:
            x = [r["density"] for r in blob]
            ax.plot(x, [r["speedup"] for r in blob], marker="s", color=col, label=f"sparse, {_title(key)}")
            if all(r.get("auto_speedup") for r in blob):
                ax.plot(x, [r["auto_speedup"] for r in blob], ":", marker="^", color=col, label="auto")
            if all(r.get("flops_ratio") for r in blob):
                ax.plot(x, [1.0 / r["flops_ratio"] for r in blob], "--", lw=0.8, color=col, alpha=0.6,
                        label="ideal = 1 / MACs ratio")
        for pattern, face in _POINTS:
            pts = [r for r in group if r["pattern"] == pattern and r.get("speedup") and r.get("density") is not None]
            if pts:
                ax.scatter([r["density"] for r in pts], [r["speedup"] for r in pts],
                           marker="s" if pattern == "random" else "*", s=40 if pattern == "random" else 80,
                           facecolors=face if face else col, edgecolors=col, label=f"sparse ({pattern})")
    ax.axhline(1.0, color="k", lw=1)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
    ax.set_xlim(0, 1)
    ax.set_xlabel("active fraction")
    ax.set_ylabel("speedup over the best dense execution")
    ax.set_title("speedup over the fastest dense execution\n(gated dense or fixed, eager or compiled)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def _time_panel(ax, key: tuple, group: list[dict[str, Any]]) -> None:
    blob = sorted((r for r in group if r["pattern"] == "blob"), key=lambda r: r["density"])
    if blob:
        x = [r["density"] for r in blob]
        for e, (col, mk) in _STYLE.items():
            for suffix, ls in (("", "-"), ("_compiled", "--")):
                y = [r.get(f"{e}{suffix}_ms") for r in blob]
                if all(v is not None for v in y):
                    ax.plot(x, y, ls, marker=mk, color=col, ms=4, label=f"{e}{' compiled' if suffix else ''}")
        ax.plot(x, [r["best_dense_ms"] for r in blob], "k-", lw=2, alpha=0.5, label="best dense")
        ideal = [r["best_dense_ms"] * r["flops_ratio"] for r in blob if r.get("flops_ratio") is not None]
        if len(ideal) == len(x):
            ax.plot(x, ideal, "k--", lw=1, label="ideal = best dense × MACs ratio")
    for pattern, face in _POINTS:
        pts = [r for r in group if r["pattern"] == pattern and r.get("density") is not None]
        for e in ("sparse", "auto"):
            col, mk = _STYLE[e]
            if pts:
                ax.scatter([r["density"] for r in pts], [r[f"{e}_ms"] for r in pts],
                           marker=mk if pattern == "random" else "*", s=40 if pattern == "random" else 70,
                           facecolors=face if face else col, edgecolors=col, label=f"{e} ({pattern})")
        if pts:
            ax.scatter([r["density"] for r in pts], [r["best_dense_ms"] for r in pts], marker="_", s=200,
                       color="k", label=f"best dense ({pattern})")
    ax.set_title(_title(key), fontsize=10)
    ax.set_xlabel("active fraction")
    ax.set_ylabel("time per forward (ms)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def plot_rows(rows: Sequence[dict[str, Any]], dpi: int = 110) -> bytes:
    """PNG bytes of the speedup panel and the time panels for ``rows`` (benchmark rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(_key(r), []).append(r)
    if len(series) == 1:  # the speedup and the times side by side
        fig, (top, ax) = plt.subplots(1, 2, figsize=(11.5, 4.4))
        _speedup_panel(top, series)
        _time_panel(ax, *next(iter(series.items())))
    else:
        cols = min(3, len(series))
        nrows = 1 + math.ceil(len(series) / cols)
        fig = plt.figure(figsize=(5.4 * cols, 4.0 * nrows))
        grid = fig.add_gridspec(nrows, cols)
        _speedup_panel(fig.add_subplot(grid[0, :]), series)
        for i, (key, group) in enumerate(series.items()):
            _time_panel(fig.add_subplot(grid[1 + i // cols, i % cols]), key, group)
    dev = rows[0].get("device", "") if rows else ""
    thr = rows[0].get("threads", "") if rows else ""
    fig.suptitle(f"sparsehead benchmark ({dev}, {thr} threads)", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
