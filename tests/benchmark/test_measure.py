"""The benchmark's peak-memory probe on CPU."""
import time

import pytest
import torch

from sparsehead.benchmark.measure import peak_memory_mb

CPU = torch.device("cpu")


def _hold(mib: int) -> None:
    x = torch.ones(mib << 18)  # float32: mib MiB
    time.sleep(0.05)  # long enough for the sampling thread
    del x


def test_a_temporary_is_counted():
    assert peak_memory_mb(lambda: _hold(64), CPU) == pytest.approx(64, abs=4)


def test_memory_freed_inside_is_not_growth():
    before = torch.ones(64 << 18)

    def free_then_hold() -> None:
        nonlocal before
        before = None
        _hold(16)

    assert peak_memory_mb(free_then_hold, CPU) < 8
