"""Per-image compute cost of the gated head paths, and the budget loss built on it (Eq. 4–6).

Every module that does counted work (a router, a dense prediction conv) sets ``self.last_cost`` to a
:class:`Cost` in each forward, replacing the previous one; reading it changes nothing. After a
forward, :func:`collect_cost` sums them over a model.

For a gated path with per-pixel cost ``c`` (MACs of its convs and norms at one pixel) and gate ``g``:
soft cost ``sum(g * c)``, realised cost ``sum(1[g > 0] * c)``, full cost ``sum(c)`` over the pixels of
each image; the conv of a two-conv stack that feeds a 3×3 conv uses the 3×3 max-pooled gate. Gate
convs and ungated convs count with ``g = 1``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["Cost", "CONVENTIONS", "collect_cost", "conv_macs_per_pixel", "dense_cost"]


CONVENTIONS = ("sparsehead", "paper")


@dataclass
class Cost:
    """Soft, realised and full MACs per image, each a tensor of shape (N,).

    ``paper``: the same three in the paper's reference convention (gated towers only: no gate or
    prediction convs, a scale unit counted as 19·C MACs per pixel at every level; see docs/paper_flops.md),
    where the module that recorded it can tell; None otherwise.
    """

    soft: torch.Tensor
    realized: torch.Tensor
    full: torch.Tensor
    paper: Optional[Cost] = None

    @staticmethod
    def zeros(batch_size: int, device: torch.device | str | None = None) -> Cost:
        z = torch.zeros(batch_size, device=device)
        return Cost(z, z.clone(), z.clone())

    def __add__(self, other: Cost) -> Cost:
        if self.soft.shape != other.soft.shape:
            raise ValueError(f"cannot add costs of batch sizes {self.soft.shape[0]} and {other.soft.shape[0]}")
        papers = [c.paper for c in (self, other) if c.paper is not None]
        paper = papers[0] + papers[1] if len(papers) == 2 else (papers[0] if papers else None)
        return Cost(self.soft + other.soft, self.realized + other.realized, self.full + other.full, paper)

    @property
    def ratio(self) -> torch.Tensor:
        """Realised / full cost per image, (N,)."""
        return self.realized / self.full.clamp_min(1.0)

    def budget_loss(self, lam: float) -> torch.Tensor:
        """``lam * mean_n(soft_n / full_n)``: the resource budget loss (a scalar)."""
        return lam * (self.soft / self.full.clamp_min(1.0)).mean()


def collect_cost(module: nn.Module, convention: str = "sparsehead") -> Cost:
    """Sum the ``last_cost`` of ``module`` and its submodules after a forward.

    ``convention``: ``sparsehead`` (every MAC of the head's work: gated paths, gate convs, prediction convs)
    or ``paper`` (the paper's reference code: the gated towers' paths only, see :class:`Cost`), to compare
    with the paper's tables.

    Raises:
        RuntimeError: if no submodule has recorded a cost (the module has not run yet, or does no
            counted work), or none in the paper's convention (a plain head).
        ValueError: an unknown convention.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    costs = [m.last_cost for m in module.modules() if getattr(m, "last_cost", None) is not None]
    if not costs:
        raise RuntimeError(f"{type(module).__name__} has recorded no cost: run a forward pass first")
    total = costs[0]
    for cost in costs[1:]:
        total = total + cost
    if convention == "paper":
        if total.paper is None:
            raise RuntimeError(f"{type(module).__name__} has no cost in the paper's convention (no gated towers)")
        return total.paper
    return total


def conv_macs_per_pixel(module: nn.Module) -> int:
    """MACs per output pixel of every 2D conv (and one per channel for every GroupNorm) in ``module``."""
    macs = 0
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            macs += m.in_channels * m.out_channels // m.groups * math.prod(m.kernel_size)
        elif isinstance(m, nn.GroupNorm):
            macs += m.num_channels
    return macs


def dense_cost(
    features: list[torch.Tensor] | tuple[torch.Tensor, ...], macs_per_pixel: int,
    valid_sizes: Optional[Sequence[Sequence[int]]] = None,
) -> Cost:
    """Cost of ungated work of ``macs_per_pixel`` at every pixel of every level (N, C, *spatial); with
    ``valid_sizes`` (each image's size at the first level, see :mod:`sparsehead.modeling.valid_region`) at
    each image's own pixels only."""
    n = features[0].shape[0]
    if valid_sizes is None:
        pixels = [sum(x[0, 0].numel() for x in features)] * n
    else:
        pixels = []
        for size in valid_sizes:
            total, size = 0, list(size)
            for x in features:
                total += math.prod(min(a, b) for a, b in zip(size, x.shape[2:]))
                size = [(s + 1) // 2 for s in size]
            pixels.append(total)
    full = torch.tensor([float(p * macs_per_pixel) for p in pixels], device=features[0].device)
    return Cost(full, full.clone(), full.clone())
