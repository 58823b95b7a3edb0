"""The CPU allocator settings: each case runs in a fresh interpreter, since they last for the process."""
import ctypes.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from sparsehead.utils.allocator import glibc_mallinfo, tune_allocator

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# After tune_allocator(MODE): where a fresh 30 MiB block comes from (mapped for it alone, or the heap) and
# how much freed memory the process keeps once it is freed (glibc's mallinfo2); then twelve rounds that hold
# four 12 MiB tensors at once and free them, and the page faults of each round (each fault is the kernel
# mapping a page in again).
PROBE = """
import json, resource, sys
import torch
from sparsehead.utils.allocator import glibc_mallinfo, tune_allocator
described = tune_allocator(sys.argv[1])
mallinfo = glibc_mallinfo()
mapped = mallinfo().hblkhd
block = torch.ones(30 << 18)
mapped = mallinfo().hblkhd - mapped
del block
kept = mallinfo().fordblks
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.ones(3 << 20) for _ in range(4)]
    del held
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"described": described, "mapped": mapped >> 20, "kept": kept >> 20, "faults": faults}))
"""
ROUND_PAGES = 48 << 20 >> 12
mallinfo2 = pytest.mark.skipif(glibc_mallinfo() is None, reason="glibc >= 2.33 only")


def _probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


@glibc
@mallinfo2
def test_tuned_glibc_keeps_freed_memory():
    system, tuned = _probe("system"), _probe("tuned")
    assert system["described"] == "glibc malloc, default settings"
    assert tuned["described"].startswith("glibc malloc, freed blocks kept")
    # glibc's default maps a large block for itself and gives it back to the kernel when it is freed.
    assert system["mapped"] == 30 and system["kept"] < 30
    # Tuned, it comes from the heap and stays in the process once freed.
    assert tuned["mapped"] == 0 and tuned["kept"] >= 30
    # The heap grows over the first rounds (up to five were seen) until a round fits in what is kept; from
    # then on a round maps nothing in again.
    assert sum(tuned["faults"][8:]) < ROUND_PAGES // 4


@glibc
@mallinfo2
def test_glibc_environment_is_left_as_set():
    # Any MALLOC_*_ variable fixes glibc's thresholds at what the user set (here the default mmap threshold,
    # 128 KiB): every 12 MiB tensor is mapped for itself and given back, round after round.
    kept = _probe("tuned", MALLOC_TRIM_THRESHOLD_="131072")
    assert kept["described"] == "glibc malloc as set by MALLOC_TRIM_THRESHOLD_"
    assert kept["mapped"] == 30
    assert min(kept["faults"][8:]) > ROUND_PAGES // 2


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="cpu_allocator must be one of"):
        tune_allocator("jemalloc")


def _tcmalloc() -> str | None:
    found = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    if found and not os.path.isabs(found):
        for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"):
            if (Path(folder) / found).exists():
                return str(Path(folder) / found)
    return found


@pytest.mark.skipif(_tcmalloc() is None, reason="tcmalloc is not installed")
def test_preloaded_tcmalloc_is_used_and_measured():
    code = """
import json, time, torch
from sparsehead.utils.allocator import tune_allocator
from sparsehead.benchmark.measure import peak_memory_mb
def hold():
    x = torch.ones(16 << 20)
    time.sleep(0.05)
print(json.dumps({"described": tune_allocator(), "peak": peak_memory_mb(hold, torch.device("cpu"))}))
"""
    env = {**os.environ, "LD_PRELOAD": _tcmalloc()}
    out = json.loads(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                    text=True).stdout.splitlines()[-1])
    assert out["described"] == "tcmalloc"
    assert out["peak"] == pytest.approx(64, abs=4)
