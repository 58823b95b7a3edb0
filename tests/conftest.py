"""Shared fixtures: small pyramids and towers with controllable gate patterns."""
from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", module="spconv")

# The tests run many tiny ops; one thread avoids oversubscribing a 2-core machine. Multi-threaded
# spconv correctness has its own test (tests/layers/test_sparse_ops.py).
torch.set_num_threads(1)


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
