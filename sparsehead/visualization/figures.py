"""Matplotlib figures of a dynamic head's gates and work (Agg backend; ``pip install sparsehead[viz]``).

Every figure is ``FIG_SIZE`` inches at ``DPI``: a PNG of ``PNG_SIZE`` = 1600 × 900 pixels.

- :func:`image_figure`: the image with its detections, and per level the mean depth gate, the mean
  scale gate and the work count, each overlaid on the image; plus the gated MACs per image pixel.
- :func:`cost_figure`: histogram of the realised head GMACs per image with avg / min / max.
- :func:`active_figure`: heat tables of the active fraction per router × level, one per path kind.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..utils.file_io import atomic_write

__all__ = ["DPI", "FIG_SIZE", "PNG_SIZE", "active_figure", "cost_figure", "gmacs_str", "image_figure",
           "require_matplotlib", "save_figure"]

FIG_SIZE = (16.0, 9.0)
DPI = 100
PNG_SIZE = (1600, 900)  # width, height in pixels

_plt: Any = None


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the Agg backend; ImportError with the install hint when it is missing."""
    global _plt
    if _plt is None:
        try:
            import matplotlib
        except ImportError:
            raise ImportError(
                "matplotlib is required for visualisation: pip install 'sparsehead[viz]' (or matplotlib>=3.7)"
            ) from None
        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        _plt = plt
    return _plt


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG of :data:`PNG_SIZE` to a temporary file beside ``path``, then rename it."""
    plt = require_matplotlib()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    finally:
        plt.close(fig)


def gmacs_str(v: float) -> str:
    """GMACs with three decimals, or four significant digits below 1."""
    return f"{v:.3f}" if abs(v) >= 1 else f"{v:.4g}"


def _new_figure() -> Any:
    plt = require_matplotlib()
    return plt.figure(figsize=FIG_SIZE, dpi=DPI)


def _show_image(ax: Any, image: np.ndarray, dim: bool = False) -> None:
    h, w = image.shape[:2]
    img = image.mean(axis=2) if dim else image
    ax.imshow(img, cmap="gray" if dim else None, extent=(0, w, h, 0), alpha=0.45 if dim else 1.0,
              vmin=0.0, vmax=1.0, interpolation="bilinear")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def _overlay(ax: Any, image: np.ndarray, values: np.ndarray, extent: Sequence[float], cmap: str,
             vmax: float) -> Any:
    _show_image(ax, image, dim=True)
    im = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=vmax, extent=tuple(extent), alpha=0.7,
                   interpolation="nearest")
    h, w = image.shape[:2]
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    return im


def _draw_detections(ax: Any, dets: dict[str, np.ndarray], class_names: Sequence[str]) -> None:
    plt = require_matplotlib()
    colors = plt.get_cmap("tab10")
    for box, score, label in zip(dets["boxes"], dets["scores"], dets["labels"]):
        x0, y0, x1, y1 = (float(v) for v in box)
        color = colors(int(label) % 10)
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=2))
        name = class_names[int(label)] if 0 <= int(label) < len(class_names) else f"class {int(label)}"
        ax.text(x0, y0, f"{name} {score:.2f}", fontsize=8, color="white", va="bottom",
                bbox={"facecolor": color, "edgecolor": "none", "pad": 1, "alpha": 0.85}, clip_on=True)


def image_figure(
    image: np.ndarray,
    dets: dict[str, np.ndarray],
    class_names: Sequence[str],
    levels: Sequence[dict[str, Any]],
    density: np.ndarray,
    density_extent: Sequence[float],
    title: str,
    subtitle: str,
    score_thresh: float,
) -> Any:
    """The per-image figure.

    Args:
        image: (H, W, 3) float RGB in [0, 1], at its original size.
        dets: ``boxes`` (K, 4) xyxy in image pixels, ``scores`` (K,), ``labels`` (K,); already thresholded.
        class_names: label index -> name.
        levels: per level ``{"name", "depth", "scale", "work", "max_work", "extent"}``: the mean depth
            and scale gate maps and the work count map (2-D arrays at the level's resolution), the
            largest possible count, and the map's extent ``(left, right, bottom, top)`` in image pixels.
        density: gated MACs per image pixel (2-D), drawn at ``density_extent``.
        title, subtitle: figure title lines (file and checkpoint; cost).
        score_thresh: the threshold the detections were filtered with (for the panel title).

    Layout: the image with detections (left, top two thirds) above the MACs density map; right of it
    one column per level with rows "depth gate", "scale gate" and "work", each row sharing a colour bar.
    """
    fig = _new_figure()
    n = len(levels)
    gs = fig.add_gridspec(3, n + 4, width_ratios=[n * 0.95, 0.05, 0.25] + [1.0] * n + [0.05],
                          left=0.015, right=0.955, top=0.87, bottom=0.04, wspace=0.1, hspace=0.25)
    ax = fig.add_subplot(gs[0:2, 0])
    _show_image(ax, image)
    _draw_detections(ax, dets, class_names)
    ax.set_title(f"detections (score ≥ {score_thresh:g}): {len(dets['scores'])}", fontsize=10)

    ax = fig.add_subplot(gs[2, 0])
    im = _overlay(ax, image, density, density_extent, "inferno", max(float(density.max()), 1e-9))
    ax.set_title("gated MACs per image pixel (all levels, paths, routers)", fontsize=9)
    cb = fig.colorbar(im, cax=fig.add_subplot(gs[2, 1]))
    cb.set_label("MACs / pixel", fontsize=8)
    cb.ax.tick_params(labelsize=7)

    rows = (
        ("depth", "depth gate", "viridis", "mean gate value\n(0 = path off)"),
        ("scale", "scale gate", "viridis", "mean gate value\n(0 = path off)"),
        ("work", "work", "magma", "gated convs run\nper pixel (count)"),
    )
    for r, (key, label, cmap, unit) in enumerate(rows):
        im = None
        vmax = 1.0 if key != "work" else float(max(lv["max_work"] for lv in levels))
        for c, lv in enumerate(levels):
            ax = fig.add_subplot(gs[r, 3 + c])
            im = _overlay(ax, image, lv[key], lv["extent"], cmap, vmax)
            mean = float(np.mean(lv[key]))
            ax.set_title(f"{lv['name']} · {label}\nmean {mean:.2f}", fontsize=8)
        cb = fig.colorbar(im, cax=fig.add_subplot(gs[r, 3 + n]))
        cb.set_label(unit, fontsize=7)
        cb.ax.tick_params(labelsize=7)
    fig.suptitle(f"{title}\n{subtitle}", fontsize=11)
    return fig


def cost_figure(gmacs: Sequence[float], title: str, full_gmacs: float | None = None) -> Any:
    """Histogram of realised head GMACs per image with avg / min / max lines (and the full cost)."""
    fig = _new_figure()
    ax = fig.add_axes((0.07, 0.1, 0.88, 0.75))
    values = np.asarray(gmacs, dtype=np.float64)
    bins = min(40, max(5, int(np.sqrt(len(values))) * 2))
    ax.hist(values, bins=bins, color="#4c72b0", edgecolor="white")
    avg, lo, hi = float(values.mean()), float(values.min()), float(values.max())
    for v, name, style in ((avg, "avg", "-"), (lo, "min", "--"), (hi, "max", "--")):
        ax.axvline(v, color="#c44e52", linestyle=style, linewidth=1.5)
        ax.annotate(f"{name} {gmacs_str(v)}", (v, 0.98), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=9, color="#c44e52",
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1, "alpha": 0.8})
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("realised head GMACs per image (collect_cost(model.head).realized / 1e9)")
    ax.set_ylabel("images")
    ratio = f"; full (all gates on) {gmacs_str(full_gmacs)}, avg/full {avg / full_gmacs:.1%}" if full_gmacs else ""
    ax.set_title(f"{len(values)} images: avg {gmacs_str(avg)}, min {gmacs_str(lo)}, max {gmacs_str(hi)} GMACs{ratio}",
                 fontsize=11)
    fig.suptitle(title, fontsize=12)
    return fig


def active_figure(fractions: dict[str, np.ndarray], rows: Sequence[str], level_names: Sequence[str],
                  title: str) -> Any:
    """One heat table per path kind: active fraction (gate > 0) per router (rows) × level (columns)."""
    plt = require_matplotlib()
    fig = _new_figure()
    names = {"depth": "depth path", "down": "scale path: down unit (feeds next level)",
             "up": "scale path: up unit (feeds previous level)"}
    paths = list(fractions)
    gs = fig.add_gridspec(1, len(paths) + 1, width_ratios=[1.0] * len(paths) + [0.04],
                          left=0.06, right=0.94, top=0.84, bottom=0.08, wspace=0.25)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    im = None
    for i, p in enumerate(paths):
        ax = fig.add_subplot(gs[0, i])
        data = np.ma.masked_invalid(fractions[p])
        im = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(level_names)), level_names)
        ax.set_yticks(range(len(rows)), rows if i == 0 else [""] * len(rows))
        ax.set_xlabel("level")
        ax.set_title(names.get(p, p), fontsize=10)
        small = len(rows) * len(level_names) <= 200
        for (r, c), v in np.ndenumerate(fractions[p]):
            if small:
                text = "—" if np.isnan(v) else f"{v:.2f}"
                color = "black" if np.isnan(v) or v > 0.6 else "white"
                ax.text(c, r, text, ha="center", va="center", fontsize=8, color=color)
    if rows:
        fig.axes[0].set_ylabel("router (tower, index; input side at top)")
    cb = fig.colorbar(im, cax=fig.add_subplot(gs[0, -1]))
    cb.set_label("active fraction of pixels (gate > 0)")
    fig.suptitle(title, fontsize=12)
    return fig
