"""tools/voxel_example.py on a small scene: figures printed and returned, and consistent."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "voxel_example.py"


def _module():
    spec = importlib.util.spec_from_file_location("voxel_example", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_small_scene_figures_are_consistent(capsys):
    report = _module().main(["--small", "--seed", "1", "--repeats", "2", "--active", "0.2"])
    out = capsys.readouterr().out
    assert report["points"] > 0
    assert len(report["stages"]) == 3 and all(s["voxels"] > 0 for s in report["stages"])
    for stage in report["stages"]:
        assert stage["voxels"] <= stage["shape"][0] * stage["shape"][1] * stage["shape"][2]
    assert [s["channels"] for s in report["stages"]] == [4, 32, 64]
    for tower in report["towers"]:
        assert 0 < tower["realized_macs"] <= tower["full_macs"]
        assert all(0 < r <= 1 for r in tower["router_ratios"])
    # Depth-gated voxels are a strict subset: something is skipped at --active 0.2.
    assert any(t["realized_macs"] < t["full_macs"] for t in report["towers"])
    for key in ("gated", "fixed"):
        assert 0 < report[f"time_{key}_min"] <= report[f"time_{key}"] <= report[f"time_{key}_max"]
    # The printed figures are the returned ones.
    assert report["allocator"] and f"CPU allocator: {report['allocator']}" in out
    printed = [int(v) for v in re.findall(r"stage \d+:\s+(\d+) voxels", out)]
    assert printed == [s["voxels"] for s in report["stages"]]
    assert len(re.findall(r"realised\s+[\d.]+ M MACs of\s+[\d.]+ M full", out)) == 2
    timing = re.search(r"median of 2 interleaved rounds.*gated towers (\d+) ms \(\d+-\d+\), "
                       r"ungated towers (\d+) ms \(\d+-\d+\)", out)
    assert timing and int(timing[1]) == round(1e3 * report["time_gated"])
    assert int(timing[2]) == round(1e3 * report["time_fixed"])


def test_same_seed_same_scene():
    mod = _module()
    a, b = mod.make_scene(3, small=True), mod.make_scene(3, small=True)
    assert a.equal(b) and not a.equal(mod.make_scene(4, small=True))


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--help"], ["--active", "0"], ["--cpu-allocator", "jemalloc"]])
def test_cli(args):
    res = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    if args == ["--help"]:
        assert res.returncode == 0 and "--seed" in res.stdout and "--small" in res.stdout
    else:
        assert res.returncode == 2 and args[0] in res.stderr
