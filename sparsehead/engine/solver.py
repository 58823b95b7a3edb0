"""SGD optimiser and the warm-up + multi-step learning-rate schedule."""

from bisect import bisect_right
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["WarmupMultiStep", "build_optimizer", "build_lr_scheduler"]


class WarmupMultiStep:
    """LR factor at iteration ``it``: linear warm-up from ``warmup_factor`` to 1, then ``gamma``
    per milestone passed. A picklable callable for ``torch.optim.lr_scheduler.LambdaLR``."""

    def __init__(self, steps: Sequence[int], gamma: float, warmup_iters: int, warmup_factor: float) -> None:
        self.steps = list(steps)
        self.gamma = gamma
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor

    def __call__(self, it: int) -> float:
        factor = self.gamma ** bisect_right(self.steps, it)
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor


def build_optimizer(model: nn.Module, solver: Any) -> torch.optim.SGD:
    """SGD with momentum and weight decay over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(
        params, lr=solver.base_lr, momentum=solver.momentum, weight_decay=solver.weight_decay
    )


def build_lr_scheduler(optimizer: torch.optim.Optimizer, solver: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration ``LambdaLR`` (call ``step()`` once per iteration)."""
    fn = WarmupMultiStep(solver.steps, solver.gamma, solver.warmup_iters, solver.warmup_factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
