"""``solver.compile``: training with ``torch.compile``.

The detector's backbone (with its FPN) and its head are compiled in place (``nn.Module.compile``: their
parameter names, and so the checkpoints, are unchanged). The transform, the anchor matching and the
losses stay eager: their shapes change with the boxes of every image. A gated head must train in the
dense execution (the config checks refuse ``solver.compile`` otherwise): the sparse and auto modes read
data-dependent sizes, each of which breaks the graph. Evaluation runs eagerly
(:func:`evaluation_stance`), in ``model.head.execution``.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch
from torch import nn

__all__ = ["compile_for_training", "evaluation_stance"]


def compile_for_training(model: nn.Module) -> None:
    """Compile ``model.backbone`` and ``model.head`` (a torchvision detector) in place with ``torch.compile``."""
    model.backbone.compile()
    model.head.compile()


def evaluation_stance(compiled: bool) -> ContextManager[Any]:
    """Within the block, compiled modules run their eager code (evaluation uses the head's own execution)."""
    return torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()
