"""Shared fixtures: small pyramids and towers with controllable gate patterns."""
from __future__ import annotations

import warnings

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
