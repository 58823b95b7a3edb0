"""The benchmark tool: auto = dense numerics, output files, crossover files and command-line checks."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

import sparsehead
from sparsehead.benchmark import blob_mask, fixed_gates
from sparsehead.benchmark.crossover import (
    DEFAULT_CROSSOVER,
    CrossoverError,
    apply_crossover,
    crossover_from_rows,
    default_crossover,
    find_crossover,
    load_crossover,
    save_crossover,
)
from sparsehead.benchmark.run import WORKLOADS, main, parse_args, pyramid_sizes

REPO = Path(__file__).resolve().parents[2]
KEYS = ("workload", "pattern", "density", "dense_ms", "sparse_ms", "auto_ms", "flops_ratio")


def _mixed_pattern(shape: torch.Size) -> torch.Tensor:
    """Sparse on the finest level, dense elsewhere: auto then runs both ways inside one forward."""
    return blob_mask(shape, 0.1 if shape[-1] >= 12 else 0.9, seed=1)


def test_pyramid_sizes_match_fcos_levels():
    assert pyramid_sizes((800, 1216)) == [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]


def test_auto_equals_dense_with_mixed_densities():
    torch.manual_seed(0)
    tower = sparsehead.DynamicTower(16, 2).eval()
    feats = [torch.randn(2, 16, h, w) for h, w in pyramid_sizes((96, 128))]
    assert apply_crossover(tower, 0.5) == 2
    plans = []
    router = tower.routers[0]
    original = router._plan
    router._plan = lambda *a: plans.extend(original(*a)) or plans[-len(a[0]):]
    with torch.no_grad(), fixed_gates(tower, _mixed_pattern):
        tower.set_execution("dense")
        ref = tower(feats)
        plans.clear()
        tower.set_execution("auto")
        out = tower(feats)
    assert {full for full, _ in plans} == {True, False}, plans  # some paths at all rows, some sparse
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _tiny_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--channels", "16", "--image-size", "32,48", "--routers", "1", "--batches", "1", "--repeats", "1",
        "--warmup", "0", "--densities", "0.2,0.6", "--random-densities", "0.3", "--out", str(tmp_path / "out"),
        "--no-progress", *extra,
    ]


def _check_outputs(out: Path, workloads: set[str]) -> list[dict]:
    rows = json.loads((out / "benchmark.json").read_text())
    assert isinstance(rows, list) and rows
    assert {r["workload"] for r in rows} == workloads
    for r in rows:
        assert set(KEYS) <= set(r)
        assert r["workload"] in WORKLOADS and r["pattern"] in ("blob", "random", "model")
        assert 0.0 <= r["density"] <= 1.0
        assert 0.0 < r["flops_ratio"] <= 1.0 + 1e-6
        for k in ("dense_ms", "sparse_ms", "auto_ms"):
            assert r[k] > 0 and math.isfinite(r[k])
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["sparse_ms"], rel=1e-2)
        assert r["efficiency"] == pytest.approx(r["speedup"] * r["flops_ratio"], rel=1e-2)
    with open(out / "benchmark.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    for r, c in zip(rows, table):
        assert c["workload"] == r["workload"] and c["pattern"] == r["pattern"]
        assert float(c["dense_ms"]) == pytest.approx(r["dense_ms"])
    png = (out / "benchmark.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.pyplot as plt

    assert plt.imread(out / "benchmark.png").ndim == 3
    return rows


def test_tiny_run_writes_outputs_and_crossover(tmp_path):
    cross = tmp_path / "crossover.json"
    args = _tiny_args(tmp_path, "--workloads", "tower,head,router,conv", "--save-crossover", str(cross))
    assert main(args) == 0
    rows = _check_outputs(tmp_path / "out", {"tower", "head", "router", "conv"})
    tower = [r for r in rows if r["workload"] == "tower"]
    assert {r["pattern"] for r in tower} == {"blob", "random"}
    assert {r["density"] for r in tower if r["pattern"] == "blob"} == {0.2, 0.6}
    assert all(r["stage_depth_conv_ms"] >= 0 and r["stage_total_ms"] > 0 for r in tower)
    assert all(r["sparse_mem_mb"] is not None for r in tower)
    assert not list((tmp_path / "out").glob(".*.tmp"))
    rec = json.loads(cross.read_text())
    assert {"device", "threads", "threshold", "measured"} <= set(rec)
    assert load_crossover(cross) == rec["threshold"]


def test_rulebook_option_reaches_the_depth_paths(tmp_path, monkeypatch):
    """--rulebook sets every DepthPath's implementation, and the rows record it."""
    from sparsehead.modeling.router import Router

    seen = []
    original = Router._depth_submanifold

    def spy(self, *args, **kwargs):
        seen.append(self.depth.rulebook)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Router, "_depth_submanifold", spy)
    args = _tiny_args(tmp_path, "--workloads", "tower", "--patterns", "blob", "--rulebook", "submanifold",
                      "--no-profile", "--no-memory", "--no-plot")
    assert main(args) == 0
    rows = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert rows and all(r["rulebook"] == "submanifold" for r in rows)
    assert seen and set(seen) == {"submanifold"}  # the CPU default would be exact
    assert parse_args(_tiny_args(tmp_path))[0].rulebook is None
    with pytest.raises(SystemExit):
        parse_args(_tiny_args(tmp_path, "--rulebook", "dense"))


@pytest.mark.slow
def test_detector_and_model_pattern(tmp_path):
    from sparsehead.config import load_config
    from sparsehead.modeling.build import build_model

    cfg_path = REPO / "configs" / "demo.yaml"
    model = build_model(load_config(cfg_path))
    ckpt = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    args = _tiny_args(
        tmp_path, "--workloads", "detector,tower,conv", "--patterns", "blob,model", "--densities", "0.3",
        "--config", str(cfg_path), "--weights", str(ckpt), "--image-size", "64,64",
    )
    assert main(args) == 0
    rows = _check_outputs(tmp_path / "out", {"detector", "tower", "conv"})
    det = [r for r in rows if r["workload"] == "detector"]
    assert {r["pattern"] for r in det} == {"blob", "model"}
    assert all(0 < r["head_macs_share"] < 1 and r["sparse_head_ms"] > 0 for r in det)


def test_crossover_round_trip_and_apply(tmp_path):
    path = tmp_path / "sub" / "cross.json"
    rec = save_crossover(path, 0.42, "test-cpu", 2)
    assert load_crossover(path) == 0.42
    data = json.loads(path.read_text())
    assert data["device"] == "test-cpu" and data["threads"] == 2 and data["measured"] == rec["measured"]
    tower = sparsehead.DynamicTower(16, 3)
    assert apply_crossover(tower, load_crossover(path)) == 3
    assert all(r.auto_threshold == 0.42 for r in tower.routers)
    with pytest.raises(ValueError):
        apply_crossover(tower, 1.5)


def test_shipped_crossovers_per_device_type():
    """CPU and CUDA each have their own shipped file; other device types use the CPU one."""
    cuda = default_crossover("cuda:0")
    assert cuda != DEFAULT_CROSSOVER and cuda.is_file()
    assert default_crossover("cpu") == default_crossover("meta") == DEFAULT_CROSSOVER
    assert load_crossover(device="cuda") == load_crossover(cuda)
    assert load_crossover(device=torch.device("cpu")) == load_crossover(DEFAULT_CROSSOVER)


def test_shipped_crossover_is_valid():
    assert DEFAULT_CROSSOVER.is_file()
    assert 0.0 <= load_crossover() <= 1.0
    assert load_crossover(None) == load_crossover(DEFAULT_CROSSOVER)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not a valid crossover JSON"),
        ('{"device": "x"}', "'threshold'"),
        ('[0.3]', "'threshold'"),
        ('{"threshold": 2.0}', r"in \[0, 1\]"),
        ('{"threshold": "0.3"}', "must be a number"),
    ],
)
def test_bad_crossover_files_name_the_file(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(CrossoverError, match=match) as err:
        load_crossover(path)
    assert str(path) in str(err.value)


def test_missing_crossover_file(tmp_path):
    with pytest.raises(CrossoverError, match="not found") as err:
        load_crossover(tmp_path / "nope.json")
    assert "nope.json" in str(err.value)


def test_find_crossover():
    assert find_crossover([0.1, 0.5, 0.9], [0.5, 0.9, 1.3]) == pytest.approx(0.6)
    assert find_crossover([0.9, 0.1], [0.8, 0.5]) == 1.0
    assert find_crossover([0.1, 0.9], [1.2, 2.0]) == 0.0
    # Only the top three points are fitted: a flat start does not drag the line away from the bend.
    assert find_crossover([0.1, 0.3, 0.5, 0.8, 0.9, 1.0], [0.2, 0.2, 0.2, 0.8, 0.9, 1.0]) == pytest.approx(1.0)
    assert find_crossover([0.1, 0.3, 0.5, 0.8, 0.9, 1.0], [0.2, 0.2, 0.2, 0.7, 0.9, 1.1]) == pytest.approx(0.95)
    rows = [
        {"workload": "tower", "pattern": "blob", "routers": 4, "batch": 1, "channels": 8, "active": a,
         "dense_ms": 10.0, "sparse_ms": s}
        for a, s in ((0.2, 5.0), (0.6, 15.0))
    ]
    assert crossover_from_rows(rows)["threshold"] == pytest.approx(0.4)
    with pytest.raises(ValueError):
        crossover_from_rows([])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--workloads", "tower,backbone"], "unknown workload 'backbone'"),
        (["--patterns", "stripes"], "unknown pattern 'stripes'"),
        (["--densities", "0.1,1.5"], "outside [0, 1]"),
        (["--random-densities", "-0.1"], "outside [0, 1]"),
        (["--weights", "w.pth"], "--weights needs --config"),
        (["--config", "/nonexistent/cfg.yaml"], "file not found: /nonexistent/cfg.yaml"),
        (["--patterns", "model"], "needs --config and --weights"),
        (["--crossover", "/nonexistent/c.json"], "file not found: /nonexistent/c.json"),
        (["--auto-threshold", "3"], "outside [0, 1]"),
        (["--densities", "a,b"], "comma-separated"),
        (["--repeats", "0"], "--repeats"),
    ],
)
def test_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_crossover_content_is_a_cli_error(tmp_path, capsys):
    bad = tmp_path / "c.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit):
        parse_args(["--crossover", str(bad)])
    assert str(bad) in capsys.readouterr().err


def test_quick_settings():
    s, _ = parse_args(["--quick"])
    assert list(s.workloads) == ["tower"] and list(s.routers) == [4] and list(s.batches) == [1]
    assert list(s.densities) == [0.05, 0.1, 0.2, 0.35, 0.5, 0.9, 1.0]
    assert list(s.patterns) == ["blob", "random"] and len(s.random_densities) == 1
