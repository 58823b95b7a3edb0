"""The CPU allocator settings: each case runs in a fresh interpreter, since they last for the process."""
import ctypes.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from sparsehead.utils.allocator import tune_allocator

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# After tune_allocator(MODE): rounds that hold four 12 MiB tensors at once and free them; reports the page
# faults of three rounds after a first one (each fault is the kernel mapping a page in again).
PROBE = """
import json, resource, sys
import torch
from sparsehead.utils.allocator import tune_allocator
described = tune_allocator(sys.argv[1])
def round():
    held = [torch.ones(3 << 20) for _ in range(4)]
    del held
round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    round()
print(json.dumps({"described": described, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""
PAGES = 3 * 48 << 20 >> 12  # the pages of three rounds


def _probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


@glibc
def test_tuned_glibc_keeps_freed_memory_mapped():
    system, tuned = _probe("system"), _probe("tuned")
    assert system["described"] == "glibc malloc, default settings"
    assert tuned["described"].startswith("glibc malloc, freed blocks kept")
    assert system["faults"] > PAGES // 2  # glibc's default gives most of the freed memory back each round
    # Tuned, most rounds map nothing again (one 12 MiB tensor's pages in three rounds); where the kernel
    # places a round's blocks varies, up to 5 tensors' pages were seen, still under half of the default's.
    assert tuned["faults"] * 2 < system["faults"]


@glibc
def test_glibc_environment_is_left_as_set():
    kept, tuned = _probe("tuned", MALLOC_TRIM_THRESHOLD_="131072"), _probe("tuned")
    assert kept["described"] == "glibc malloc as set by MALLOC_TRIM_THRESHOLD_"
    assert kept["faults"] > 3 * tuned["faults"]


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
