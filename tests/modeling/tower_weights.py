"""Test weights for towers: moved away from their initialisation so that every path and gate matters."""
from __future__ import annotations

import torch

from sparsehead import DynamicTower


def randomise(tower: DynamicTower, seed: int) -> None:
    """Set every parameter of ``tower`` from ``seed``: fixed node-sum weights, perturbed norms, gate biases
    at 0.5 and the other weights drawn at scale 0.15."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if name.endswith("scale_weight"):
                p.fill_(0.6)
            elif name.endswith("output_weight"):
                p.fill_(0.9)
            elif "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif "gate.conv.bias" in name:
                p.fill_(0.5)
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
