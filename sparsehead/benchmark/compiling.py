"""``torch.compile`` for the benchmark: compiled modules, graphs compiled so far, graph breaks, output diffs.

Compilation is never timed: a compiled module is called untimed until a call compiles nothing more
(:func:`warm_compiled`), and that time is reported apart from the timings.
"""
from __future__ import annotations

import contextlib
import copy
import time
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

__all__ = ["compile_limits", "compile_module", "compile_detector", "graphs_compiled", "graph_breaks",
           "warm_compiled", "max_abs_diff", "check_backend"]

# Sparse executions compile one graph per level and data-dependent size; dynamo's default limit of 8
# recompilations per function would silently leave the rest of them eager.
RECOMPILE_LIMIT = 256


def check_backend(name: str) -> None:
    """Raise ValueError naming ``name`` if it is not a ``torch.compile`` backend."""
    available = set(torch._dynamo.list_backends(exclude_tags=())) | {"inductor", "eager", "aot_eager"}
    if name not in available:
        raise ValueError(f"unknown torch.compile backend {name!r}; choose from {', '.join(sorted(available))}")


@contextlib.contextmanager
def compile_limits(limit: int = RECOMPILE_LIMIT) -> Iterator[None]:
    """Within the block, dynamo may recompile a function up to ``limit`` times before falling back to eager."""
    cfg = torch._dynamo.config
    saved = cfg.recompile_limit, cfg.accumulated_recompile_limit
    cfg.recompile_limit = limit
    cfg.accumulated_recompile_limit = max(limit * 8, saved[1])
    try:
        yield
    finally:
        cfg.recompile_limit, cfg.accumulated_recompile_limit = saved


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (increases when a call compiles)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_module(module: nn.Module, backend: str = "inductor") -> nn.Module:
    """``torch.compile(module)`` (weights shared with ``module``)."""
    return torch.compile(module, backend=backend)


def compile_detector(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """A twin of a torchvision detector sharing its weights, whose backbone and head are compiled.

    The transform (resizing, batching) and the post-processing (score threshold, NMS), whose shapes
    depend on the images and on the detections, stay eager; the twin's ``head`` is the compiled head.
    """
    twin = copy.copy(model)
    twin._modules = dict(model._modules)  # the original keeps its own submodules
    twin.backbone = compile_module(model.backbone, backend)
    twin.head = compile_module(model.head, backend)
    return twin


def warm_compiled(calls: dict[str, Callable[[], Any]], max_rounds: int = 4) -> dict[str, tuple[Optional[float], Any]]:
    """Call every compiled forward of ``calls`` in turn, round after round, until a whole round compiles no
    new graph (at most ``max_rounds`` rounds): the interleaved timing that follows then compiles nothing.

    Returns, per key, the seconds spent in its calls that compiled (None if none did: compilation, and
    the first run of what was compiled) and its last output.
    """
    spent: dict[str, Optional[float]] = {k: None for k in calls}
    outputs: dict[str, Any] = {}
    for _ in range(max_rounds):
        new = 0
        for key, fn in calls.items():
            before = graphs_compiled()
            t0 = time.perf_counter()
            outputs[key] = fn()
            if graphs_compiled() != before:
                new += 1
                spent[key] = (spent[key] or 0.0) + time.perf_counter() - t0
        if not new:
            break
    return {k: (spent[k], outputs.get(k)) for k in calls}


def graph_breaks(fn: Callable[..., Any], *args: Any) -> int:
    """``torch._dynamo.explain``'s graph-break count for one call ``fn(*args)``.

    The number of graphs dynamo captured during the call, minus one. ``explain`` resets dynamo before and
    after: every compiled module compiles again at its next call.
    """
    with compile_limits():
        return int(torch._dynamo.explain(fn)(*args).graph_break_count)


def max_abs_diff(a: Any, b: Any) -> Optional[float]:
    """Largest absolute difference between the floating tensors of two outputs of the same structure
    (tensors, lists, tuples, dicts); None if the structures or shapes differ."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return None
        if not a.is_floating_point():
            return 0.0 if torch.equal(a, b) else float("inf")
        return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return None
        a, b = [a[k] for k in sorted(a)], [b[k] for k in sorted(b)]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return None
        diffs = [max_abs_diff(x, y) for x, y in zip(a, b)]
        return None if any(d is None for d in diffs) else max(diffs, default=0.0)
    return None
