"""Shared fixtures: the device, small pyramids, and the overrides of a tiny demo training run."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

warnings.filterwarnings("ignore", module="spconv")

# The tests run many tiny ops; one thread avoids oversubscribing a 2-core machine. Multi-threaded
# spconv correctness has its own test (tests/layers/test_sparse_ops.py).
torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device", default="cpu", choices=("cpu", "cuda"),
        help="device for the tests that take the `device` fixture (the dense/sparse equivalence tests); "
             "cuda runs them on the GPU through spconv's implicit-GEMM kernels",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "device: runs on the device named by --device (cpu by default)")
    if config.getoption("--device") == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError("--device cuda: CUDA is not available")
        # The dense reference must be float32 arithmetic, not TF32, to be compared at float32 tolerances.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device of ``--device``: run ``pytest --device cuda -m device`` on a GPU machine."""
    return torch.device(request.config.getoption("--device"))


def pyramid_sizes(size: tuple[int, ...], levels: int) -> list[tuple[int, ...]]:
    sizes = [tuple(size)]
    for _ in range(levels - 1):
        sizes.append(tuple((s + 1) // 2 for s in sizes[-1]))
    return sizes


@pytest.fixture
def make_pyramid():
    def make(batch: int, channels: int, size: tuple[int, ...], levels: int, seed: int = 0) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(batch, channels, *s, generator=gen) for s in pyramid_sizes(size, levels)]

    return make


@pytest.fixture
def tiny_demo() -> Callable[..., list[str]]:
    """``tiny_demo(root, **extra)``: ``key=value`` overrides that shrink ``configs/demo.yaml`` to a run of a
    few seconds (8 generated 64-px training images under ``root / "data"``, one router, two iterations),
    ``extra`` added or replacing."""

    def make(root: Path, **extra: Any) -> list[str]:
        opts: dict[str, Any] = {
            "data.synthetic.root": root / "data",
            "data.synthetic.num_train": 8,
            "data.synthetic.num_val": 4,
            "data.synthetic.image_size": 64,
            "data.num_workers": 0,
            "model.min_size": 64,
            "model.max_size": 64,
            "model.backbone.fpn_channels": 32,
            "model.head.gn_groups": 8,
            "model.head.num_routers": 1,
            "solver.max_iter": 2,
            "solver.ims_per_batch": 2,
            "solver.log_period": 1,
            "test.ims_per_batch": 2,
        }
        opts.update(extra)
        return [f"{k}={v}" for k, v in opts.items()]

    return make
