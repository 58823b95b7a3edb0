"""Clocks of the benchmark: synchronised wall time, peak memory, the router-stage clock, submodule timers."""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import psutil
import torch
from torch import nn

from ..utils.allocator import glibc_mallinfo, loaded_allocator

__all__ = ["STAGES", "sync", "timed", "peak_memory_mb", "profile_stages", "ModuleTimer", "finite", "cpu_name"]

# Profiler labels inside the model → stage names in the rows.
STAGES = {
    "sparsehead.gate": "gate",
    "sparsehead.gather": "gather",
    "sparsehead.depth_conv": "depth_conv",
    "sparsehead.scale": "scale",
    "sparsehead.scatter": "scatter",
}


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and its logical core count."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} cores)"


def sync(device: torch.device) -> None:
    """Wait for ``device`` (CUDA) to finish its queued work; nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall milliseconds of ``fn()``, synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def finite(x: Optional[float], nd: int = 4) -> Optional[float]:
    """``x`` rounded to ``nd`` digits, or None when it is None or not finite."""
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


class ModuleTimer:
    """Wall time of each forward of a submodule (e.g. a detector's head), by forward hooks."""

    def __init__(self, module: Optional[nn.Module], device: torch.device) -> None:
        self.times: list[float] = []
        self.handles = []
        if module is not None:
            self.handles = [
                module.register_forward_pre_hook(lambda *a: self._start()),
                module.register_forward_hook(lambda *a: self._stop()),
            ]
        self.device = device
        self.t0 = 0.0

    def _start(self) -> None:
        sync(self.device)
        self.t0 = time.perf_counter()

    def _stop(self) -> None:
        sync(self.device)
        self.times.append((time.perf_counter() - self.t0) * 1e3)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so the next forward's growth shows in RSS."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).malloc_trim(0)


def _heap_reader() -> Optional[Callable[[], int]]:
    """Bytes the C heap has handed out and not taken back (the CPU counterpart of
    ``torch.cuda.memory_allocated``): glibc's ``mallinfo2`` (``uordblks + hblkhd``), or under a preloaded
    tcmalloc its ``generic.current_allocated_bytes``; None for other allocators or without these calls."""
    allocator = loaded_allocator()
    if allocator == "glibc":
        info = glibc_mallinfo()
        if info is None:
            return None

        def read() -> int:
            m = info()
            return m.uordblks + m.hblkhd

        return read
    if allocator == "tcmalloc":
        try:
            prop = ctypes.CDLL(None).MallocExtension_GetNumericProperty
        except (AttributeError, OSError):
            return None
        prop.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t)]
        value = ctypes.c_size_t()

        def read_tcmalloc() -> int:
            prop(b"generic.current_allocated_bytes", ctypes.byref(value))
            return value.value

        return read_tcmalloc
    return None


def peak_memory_mb(fn: Callable[[], Any], device: torch.device, interval: float = 0.0005) -> float:
    """Peak memory allocated during ``fn()`` above what was allocated before it, in MiB.

    CUDA: ``max_memory_allocated`` (exact). CPU: the C heap's bytes in use (glibc's ``mallinfo2``, or a
    preloaded tcmalloc's count), sampled every ``interval`` seconds by a thread, a lower bound of the true
    peak; memory the allocator keeps after a free does not count, as on CUDA. Under another allocator: the
    process's RSS, sampled the same way after returning freed heap to the OS.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    read = _heap_reader()
    if read is None:
        _malloc_trim()
        proc = psutil.Process()

        def read() -> int:
            return proc.memory_info().rss

    base = read()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], read())
            time.sleep(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    peak[0] = max(peak[0], read())
    return (peak[0] - base) / 2**20


class _StageClock:
    """Stands in for ``record_function`` during one forward: wall ms per stage label."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ms = {name: 0.0 for name in STAGES.values()}

    @contextlib.contextmanager
    def __call__(self, label: str) -> Iterator[None]:
        sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            if label in STAGES:
                self.ms[STAGES[label]] += (time.perf_counter() - t0) * 1e3


def _label_sites() -> list[tuple[Any, str]]:
    """(module, global name) of every ``record_function`` imported by a loaded ``sparsehead`` module."""
    target = torch.profiler.record_function
    sites = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "sparsehead" or name.startswith("sparsehead.")):
            continue
        sites += [(mod, key) for key, value in list(vars(mod).items()) if value is target]
    return sites


def profile_stages(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Wall ms per stage (the ``sparsehead.*`` profiler labels in :data:`STAGES`) of one forward, plus
    ``other`` and ``total``.

    For this one forward, every ``record_function`` that a ``sparsehead`` module imported is swapped
    for a clock (a torch.profiler session costs seconds per forward here, the clock microseconds); on
    CUDA each stage is synchronised.
    """
    clock = _StageClock(device)
    sites = _label_sites()
    for mod, key in sites:
        setattr(mod, key, clock)
    try:
        total = timed(fn, device)
    finally:
        for mod, key in sites:
            setattr(mod, key, torch.profiler.record_function)
    out = dict(clock.ms)
    out["other"] = max(0.0, total - sum(out.values()))
    out["total"] = total
    return out
