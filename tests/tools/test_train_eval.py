"""The command-line tools end to end: train.py then eval.py, and a 2-process torchrun run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
KEYS = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l",
        "head_gmacs_avg", "head_gmacs_min", "head_gmacs_max")

pytestmark = pytest.mark.slow


@pytest.fixture
def overrides(tiny_demo):
    def make(tmp: Path, **extra) -> list:
        return tiny_demo(tmp, **{"output_dir": tmp / "out", "data.synthetic.num_classes": 5, "solver.max_iter": 3,
                                 "solver.checkpoint_period": 2, **extra})

    return make


def run(cmd, tmp):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def check_metrics(path: Path) -> dict:
    metrics = json.loads(path.read_text())
    for key in KEYS:
        assert key in metrics, key
    assert 0.0 <= metrics["bbox_mAP"] <= 1.0
    assert 0 < metrics["head_gmacs_min"] <= metrics["head_gmacs_avg"] <= metrics["head_gmacs_max"]
    return metrics


def test_train_then_eval_dynamic_sparse(tmp_path, overrides):
    cmd = [PY, str(REPO / "tools/train.py"), str(REPO / "configs/demo.yaml"), *overrides(tmp_path)]
    proc = run(cmd, tmp_path)
    out = tmp_path / "out"
    assert "mAP" in proc.stdout and "head GMACs" in proc.stdout
    check_metrics(out / "metrics.json")
    expected = {"checkpoint.pth", "model_final.pth", "config.yaml", "log.txt", "metrics.jsonl"}
    assert expected <= set(os.listdir(out))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines if "loss" in r] == [1, 2, 3]
    assert all(0.0 <= r["cost_ratio"] <= 1.0 for r in lines if "loss" in r)
    train_text = (out / "metrics.json").read_text()

    proc = run([PY, str(REPO / "tools/eval.py"), str(REPO / "configs/demo.yaml"),
                "--weights", str(out / "model_final.pth"), *overrides(tmp_path)], tmp_path)
    check_metrics(out / "eval_metrics.json")
    assert (out / "metrics.json").read_text() == train_text

    # a checkpoint of another architecture is refused with the offending keys named
    bad = subprocess.run(
        [PY, str(REPO / "tools/eval.py"), str(REPO / "configs/demo.yaml"), "--weights",
         str(out / "model_final.pth"), *overrides(tmp_path, **{"model.head.kind": "plain"})],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert bad.returncode != 0
    assert "does not match the configured model" in bad.stderr and "keys" in bad.stderr


def test_torchrun_two_processes(tmp_path, overrides):
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", str(REPO / "tools/train.py"),
           str(REPO / "configs/demo.yaml"), *overrides(tmp_path, **{"solver.ims_per_batch": 4})]
    proc = run(cmd, tmp_path)
    out = tmp_path / "out"
    assert proc.stdout.count("[sparsehead] final") == 1  # only rank 0 reports
    check_metrics(out / "metrics.json")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines if "loss" in r] == [1, 2, 3]
    assert sum(1 for r in lines if "eval" in r) == 1
    assert json.loads((out / "metrics.json").read_text())["num_images"] == 4  # both shards gathered
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
