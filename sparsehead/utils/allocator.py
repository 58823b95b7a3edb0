"""The C allocator behind torch's CPU tensors: which one serves the process, and glibc's settings for it.

torch takes CPU tensors from the C library's ``malloc``. glibc's ``malloc`` serves a block larger than its
mmap threshold (128 KiB, rising only to the largest block freed so far) straight from the kernel and hands
it back when it is freed, and trims the heap once its free top exceeds twice that threshold; so a forward
or a training step whose tensors are megabytes pays the kernel's page faults for them again at every
call. tcmalloc and jemalloc keep freed memory in the process by design. :func:`tune_allocator` makes glibc
do the same with ``mallopt``: blocks up to :data:`MMAP_THRESHOLD` come from the heap, and the heap is
trimmed only when more than :data:`TRIM_THRESHOLD` of it is free. No result changes, only where memory
comes from; the process keeps up to that much freed memory mapped.

The tools apply it once per process (``cpu_allocator`` in the config, ``--cpu-allocator`` of the
benchmark): ``tuned`` (default) or ``system`` (leave the allocator as the process started). An allocator
preloaded by the user (``LD_PRELOAD=…libtcmalloc…``) or glibc's ``MALLOC_*_`` environment variables are
used as they are.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from pathlib import Path
from typing import Callable

__all__ = [
    "ALLOCATOR_MODES", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "MallInfo2", "glibc_mallinfo", "loaded_allocator",
    "tune_allocator",
]

ALLOCATOR_MODES = ("tuned", "system")
MMAP_THRESHOLD = 32 << 20  # glibc's largest mmap threshold on 64-bit systems
TRIM_THRESHOLD = 1 << 30

# mallopt parameters (malloc.h) and the environment variables that set them at start-up.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_OTHERS = ("tcmalloc", "jemalloc", "mimalloc")
_tuned = False


class MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (malloc.h): the main arena's counters in bytes, among them ``hblkhd``
    (blocks mapped for themselves), ``uordblks`` (in use from the heap) and ``fordblks`` (free in the heap)."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def glibc_mallinfo() -> Callable[[], MallInfo2] | None:
    """glibc's ``mallinfo2`` (glibc 2.33 or newer), returning :class:`MallInfo2`; None where the C library
    has no such function."""
    try:
        info = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return None
    info.restype = MallInfo2
    return info


def loaded_allocator() -> str:
    """The allocator serving ``malloc`` in this process: ``tcmalloc``, ``jemalloc`` or ``mimalloc`` when such
    a library is mapped into it (preloaded), ``glibc`` for the GNU C library's own, else ``system``."""
    with contextlib.suppress(OSError):
        maps = Path("/proc/self/maps").read_text()
        for name in _OTHERS:
            if f"lib{name}" in maps:
                return name
    return "glibc" if platform.libc_ver()[0] == "glibc" else "system"


def tune_allocator(mode: str = "tuned") -> str:
    """Apply ``mode`` (one of :data:`ALLOCATOR_MODES`) to this process's allocator; returns what serves the
    process, in words, for the run's log. Idempotent; only glibc's ``malloc`` is changed, and only when
    none of its ``MALLOC_*_`` environment variables is set."""
    if mode not in ALLOCATOR_MODES:
        raise ValueError(f"cpu_allocator must be one of {ALLOCATOR_MODES}, got {mode!r}")
    global _tuned
    name = loaded_allocator()
    if name != "glibc":
        return name if name != "system" else "the system's malloc"
    set_by = [v for v in _GLIBC_ENV if v in os.environ]
    if set_by:
        return f"glibc malloc as set by {', '.join(set_by)}"
    if mode == "tuned" and not _tuned:
        libc = ctypes.CDLL(None)
        ok = [libc.mallopt(param, value) for param, value in
              ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))]
        _tuned = all(ok)
    if _tuned:
        return (f"glibc malloc, freed blocks kept (mmap threshold {MMAP_THRESHOLD >> 20} MiB, "
                f"trim threshold {TRIM_THRESHOLD >> 20} MiB)")
    return "glibc malloc, default settings"
