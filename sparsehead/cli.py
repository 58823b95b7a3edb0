"""Console entry points: ``sparsehead-train``, ``-eval``, ``-benchmark``, ``-visualize`` and ``-predict``.

Each returns the process exit status; ``tools/*.py`` in the repository call the same functions.
"""
from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["benchmark", "evaluate", "predict", "train", "visualize"]


def train(argv: Optional[Sequence[str]] = None) -> int:
    """``sparsehead-train CONFIG [key=value ...] [--resume]``: see :func:`sparsehead.engine.train_main`."""
    from sparsehead.engine import train_main

    train_main(None if argv is None else list(argv))
    return 0


def evaluate(argv: Optional[Sequence[str]] = None) -> int:
    """``sparsehead-eval CONFIG --weights CKPT [key=value ...]``: see :func:`sparsehead.engine.eval_main`."""
    from sparsehead.engine import eval_main

    eval_main(None if argv is None else list(argv))
    return 0


def benchmark(argv: Optional[Sequence[str]] = None) -> int:
    """``sparsehead-benchmark [--quick] ...``: see :mod:`sparsehead.benchmark.run`."""
    from sparsehead.benchmark.run import main

    return main(argv)


def visualize(argv: Optional[Sequence[str]] = None) -> int:
    """``sparsehead-visualize CONFIG --weights CKPT (--input ... | --val) --out DIR``: see
    :mod:`sparsehead.visualization`."""
    from sparsehead.visualization import main

    return main(argv)


def predict(argv: Optional[Sequence[str]] = None) -> int:
    """``sparsehead-predict CONFIG --weights CKPT --input IMAGE_OR_DIR --out preds.json``: see
    :mod:`sparsehead.engine.predict`."""
    from sparsehead.engine.predict import main

    return main(argv)
