"""Plot of benchmark rows: time vs active fraction for dense, sparse and auto, with the ideal line.

The ideal line is ``dense_ms × flops_ratio``: the time if it scaled with the realised MACs. One panel per
(workload, routers, batch, channels) series; blob points are joined by lines, random points are open
markers, model points stars. matplotlib is imported here only, with the Agg backend.
"""
from __future__ import annotations

import io
import math
from typing import Any, Sequence

__all__ = ["plot_rows"]

_STYLE = {"dense": ("C0", "o"), "sparse": ("C3", "s"), "auto": ("C2", "^")}


def _key(r: dict[str, Any]) -> tuple:
    return (r["workload"], r.get("routers"), r.get("batch"), r.get("channels"), r.get("image"))


def plot_rows(rows: Sequence[dict[str, Any]], dpi: int = 110) -> bytes:
    """PNG bytes of the time-vs-active-fraction panels for ``rows`` (benchmark rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(_key(r), []).append(r)
    n = max(1, len(series))
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.9 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (key, group) in zip(axes.flat, series.items()):
        workload, d, b, c, image = key
        blob = sorted((r for r in group if r["pattern"] == "blob"), key=lambda r: r["density"])
        if blob:
            x = [r["density"] for r in blob]
            for mode, (col, mk) in _STYLE.items():
                ax.plot(x, [r[f"{mode}_ms"] for r in blob], marker=mk, color=col, label=f"{mode} (blob)")
            ideal = [r["dense_ms"] * r["flops_ratio"] for r in blob if r.get("flops_ratio") is not None]
            if len(ideal) == len(x):
                ax.plot(x, ideal, "k--", lw=1, label="ideal = dense × MACs ratio")
        for pattern, face in (("random", "none"), ("model", None)):
            pts = [r for r in group if r["pattern"] == pattern and r.get("density") is not None]
            for mode, (col, mk) in _STYLE.items():
                if pts:
                    ax.scatter(
                        [r["density"] for r in pts], [r[f"{mode}_ms"] for r in pts],
                        marker="*" if pattern == "model" else mk, s=70 if pattern == "model" else 40,
                        facecolors=face if face else col, edgecolors=col, label=f"{mode} ({pattern})",
                    )
        title = f"{workload}" + (f" D{d}" if d else "") + f" N{b} C{c} {image}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("active fraction")
        ax.set_ylabel("time per forward (ms)")
        ax.set_xlim(0, 1)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    dev = rows[0].get("device", "") if rows else ""
    thr = rows[0].get("threads", "") if rows else ""
    fig.suptitle(f"dense vs sparse vs auto ({dev}, {thr} threads)", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
