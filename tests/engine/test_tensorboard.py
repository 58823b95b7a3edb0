"""logging.tensorboard: loss terms, learning rate, cost ratio and evaluation metrics as TensorBoard scalars."""

import importlib.util

import pytest
from test_trainer import tiny_cfg

from sparsehead.engine.trainer import RunError, Trainer

pytestmark = pytest.mark.slow


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_events_written_and_read_back(dataset_root, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(dataset_root, out, **{"solver.max_iter": 3, "solver.eval_period": 2, "logging.tensorboard": True,
                                         "model.head.kind": "dynamic"})
    metrics = Trainer(cfg).run()
    scalars = _scalars(out / "tensorboard")
    for tag in ("train/loss", "train/lr", "train/cost_ratio", "train/loss_budget", "train/classification"):
        assert [step for step, _ in scalars[tag]] == [1, 2, 3], tag
    assert all(0 < v <= 1 for _, v in scalars["train/cost_ratio"])
    assert [step for step, _ in scalars["eval/bbox_mAP"]] == [2, 3]
    assert scalars["eval/head_gmacs_avg"][-1][1] == pytest.approx(metrics["head_gmacs_avg"], rel=1e-6)


def test_off_by_default_and_missing_package_is_named(dataset_root, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(RunError, match=r'needs the tensorboard package: pip install "sparsehead\[tensorboard\]"'):
        Trainer(tiny_cfg(dataset_root, tmp_path / "a", **{"logging.tensorboard": True})).run()
    monkeypatch.undo()
    Trainer(tiny_cfg(dataset_root, tmp_path / "b", **{"solver.max_iter": 1})).run()
    assert not (tmp_path / "b" / "tensorboard").exists()
