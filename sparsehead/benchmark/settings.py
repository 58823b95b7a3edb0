"""What the benchmark tool measures: workloads, gate patterns, executions and the :class:`Settings`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

__all__ = [
    "WORKLOADS", "PATTERNS", "MODES", "BASELINES", "EXECUTIONS", "SPARSE_KINDS", "COMPILE_LEVELS", "ARCHS",
    "PAPER_CONFIGS", "DEFAULT_DENSITIES", "QUICK_DENSITIES", "QUICK_IMAGE", "Settings", "compiled_executions",
]

WORKLOADS = ("tower", "head", "detector", "router", "conv")
PATTERNS = ("blob", "random", "model", "levels")
MODES = ("dense", "sparse", "auto")  # the gated model's execution modes
# Static baselines: ``fixed`` is the paper's Fixed tower/head (the same routers with gated=False, same
# weights, every path computed); ``plain`` is torchvision's own head (head and detector workloads).
BASELINES = ("fixed", "plain")
EXECUTIONS = MODES + BASELINES
SPARSE_KINDS = ("sparse", "auto")  # executions with data-dependent sizes
# --compile: none = eager only; default = also the dense kinds compiled (gated dense and the static
# baselines, which compile to one graph); all = every execution compiled, sparse and auto included.
COMPILE_LEVELS = ("none", "default", "all")
ARCHS = ("fcos", "retinanet")
_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# The paper-scale detector of each architecture (R50-FPN; built with random weights).
PAPER_CONFIGS = {
    "fcos": _CONFIGS / "dynamic_D4_lambda0.1_R50_1x.yaml",
    "retinanet": _CONFIGS / "dynamic_retinanet_D8_lambda0.1_R50_1x.yaml",
}
DEFAULT_DENSITIES = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9, 1.0)
QUICK_DENSITIES = (0.05, 0.1, 0.2, 0.35, 0.5, 0.9, 1.0)
QUICK_IMAGE = (256, 384)


def compiled_executions(level: str) -> tuple[str, ...]:
    """The executions that ``--compile level`` times under ``torch.compile`` as well as eagerly."""
    if level == "none":
        return ()
    if level == "default":
        return ("dense",) + BASELINES
    if level == "all":
        return EXECUTIONS
    raise ValueError(f"compile level must be one of {COMPILE_LEVELS}, got {level!r}")


@dataclass
class Settings:
    """What to measure. Densities are active fractions in [0, 1]; ``image`` is (H, W) of the input.

    ``config``/``weights``: a trained checkpoint (the ``model`` and ``levels`` patterns); ``archs``: the
    paper-scale detectors of the ``detector`` workload under synthetic patterns; ``compile``: one of
    :data:`COMPILE_LEVELS`, with ``compile_backend`` (``torch.compile``'s backend).
    """

    workloads: Sequence[str] = WORKLOADS
    patterns: Sequence[str] = ("blob", "random")
    densities: Sequence[float] = DEFAULT_DENSITIES
    random_densities: Sequence[float] = (0.1, 0.5)
    routers: Sequence[int] = (4, 8)
    batches: Sequence[int] = (1, 2)
    channels: int = 256
    image: tuple[int, int] = (800, 1216)
    num_classes: int = 80
    archs: Sequence[str] = ("fcos",)
    repeats: int = 7
    warmup: int = 1
    device: str = "cpu"
    threads: Optional[int] = None
    cpu_allocator: str = "tuned"
    auto_threshold: Optional[float] = None
    rulebook: Optional[str] = None  # DepthPath.rulebook: exact | submanifold; None: the device's default
    config: Optional[str] = None
    weights: Optional[str] = None
    overrides: Sequence[str] = ()
    compile: str = "default"
    compile_backend: str = "inductor"
    seed: int = 0
    profile: bool = True
    memory: bool = True
    count: bool = True
    progress: bool = True
