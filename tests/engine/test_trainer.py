"""Training loop on a tiny generated dataset: loss goes down, resume is exact, NaN stops the run,
existing runs are not overwritten, bad inputs fail before training, evaluation writes its metrics."""

import json
from pathlib import Path

import pytest
import torch

from sparsehead.config import ConfigError, load_config
from sparsehead.engine import trainer as trainer_mod
from sparsehead.engine.checkpoint import read_checkpoint
from sparsehead.engine.evaluation import METRIC_KEYS
from sparsehead.engine.launch import run_evaluation, train_main
from sparsehead.engine.trainer import RunError, Trainer
from sparsehead.modeling.router import Router

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def tiny_overrides(root: Path, out: Path, **extra) -> list:
    opts = {
        "output_dir": out,
        "data.synthetic.enabled": True,
        "data.synthetic.root": root,
        "data.synthetic.num_train": 8,
        "data.synthetic.num_val": 4,
        "data.synthetic.image_size": 64,
        "data.synthetic.num_classes": 3,
        "data.num_workers": 0,
        "model.num_classes": 3,
        "model.min_size": 64,
        "model.max_size": 64,
        "model.backbone.depth": 18,
        "model.backbone.fpn_channels": 32,
        "model.backbone.norm": "bn",
        "model.backbone.trainable_layers": 5,
        "model.head.kind": "plain",
        "model.head.num_convs": 1,
        "model.head.num_routers": 1,
        "model.head.gn_groups": 8,
        "solver.max_iter": 4,
        "solver.ims_per_batch": 2,
        "solver.base_lr": 0.01,
        "solver.warmup_iters": 0,
        "solver.steps": "[100]",
        "solver.checkpoint_period": 2,
        "solver.log_period": 1,
        "test.ims_per_batch": 4,
    }
    opts.update(extra)
    return [f"{k}={v}" for k, v in opts.items()]


def tiny_cfg(root, out, **extra):
    from sparsehead.config import DEFAULT_CONFIG

    return load_config(DEFAULT_CONFIG, tiny_overrides(root, out, **extra))


def read_log(out: Path) -> dict:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r for r in recs if "eval" not in r}


@pytest.mark.parametrize("arch, kind", [("fcos", "plain"), ("retinanet", "dynamic")])
def test_loss_decreases(dataset_root, tmp_path, monkeypatch, arch, kind):
    # The same 4 images every step (no flip): the loss has to go down.
    cfg = tiny_cfg(dataset_root, tmp_path / "run", **{
        "solver.max_iter": 12, "solver.ims_per_batch": 4, "data.synthetic.num_train": 8,
        "data.flip_prob": 0.0, "solver.checkpoint_period": 100, "model.arch": arch, "model.head.kind": kind,
    })
    subset = [0, 1, 2, 3]
    orig = trainer_mod.build_train_loader

    def fixed_loader(dataset, *args, **kwargs):
        return orig(torch.utils.data.Subset(dataset, subset), *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "build_train_loader", fixed_loader)
    Trainer(cfg).run()
    losses = [r["loss"] for _, r in sorted(read_log(tmp_path / "run").items())]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


class Interrupted(Exception):
    pass


class KilledTrainer(Trainer):
    def after_step(self, iteration):
        if iteration == 5:  # after the checkpoint at 4 and the log record of 5
            raise Interrupted


def test_resume_reproduces_uninterrupted_run(dataset_root, tmp_path):
    extra = {"solver.max_iter": 7, "solver.checkpoint_period": 4, "solver.warmup_iters": 3}
    full = tmp_path / "full"
    Trainer(tiny_cfg(dataset_root, full, **extra)).run()

    part = tmp_path / "part"
    with pytest.raises(Interrupted):
        KilledTrainer(tiny_cfg(dataset_root, part, **extra)).run()
    assert read_checkpoint(part / "checkpoint.pth")["iteration"] == 4
    assert max(read_log(part)) == 5
    with pytest.raises(RunError, match="--resume"):
        Trainer(tiny_cfg(dataset_root, part, **extra)).run()
    Trainer(tiny_cfg(dataset_root, part, **extra), resume=True).run()

    a, b = read_log(full), read_log(part)
    assert sorted(b) == list(range(1, 8))  # the record of iteration 5 written before the kill was replaced
    for it in range(1, 8):
        for key in ("loss", "classification", "bbox_regression", "bbox_ctrness", "lr"):
            assert a[it][key] == b[it][key], (it, key, a[it][key], b[it][key])
    assert json.loads((full / "metrics.json").read_text()) == json.loads((part / "metrics.json").read_text())


def test_nan_loss_stops_and_keeps_checkpoint(dataset_root, tmp_path, monkeypatch):
    orig = trainer_mod.build_model

    def poisoned(cfg):
        model = orig(cfg)
        forward, calls = model.forward, [0]

        def forward_nan(images, targets=None):
            out = forward(images, targets)
            calls[0] += 1
            if model.training and calls[0] == 3:
                out["bbox_regression"] = out["bbox_regression"] * float("nan")
            return out

        model.forward = forward_nan
        return model

    monkeypatch.setattr(trainer_mod, "build_model", poisoned)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"iteration 3: bbox_regression=nan"):
        Trainer(tiny_cfg(dataset_root, out)).run()
    ckpt = read_checkpoint(out / "checkpoint.pth")
    assert ckpt["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "model_final.pth").exists() and not (out / "metrics.json").exists()
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


def test_cli_refuses_existing_run(dataset_root, tmp_path):
    out = tmp_path / "run"
    (out).mkdir()
    (out / "checkpoint.pth").write_bytes(b"x")
    with pytest.raises(SystemExit, match="already holds a run"):
        train_main([str(DEMO), *tiny_overrides(dataset_root, out)])
    assert (out / "checkpoint.pth").read_bytes() == b"x"


def test_bad_inputs_fail_before_training(dataset_root, tmp_path):
    demo = str(DEMO)
    with pytest.raises(SystemExit, match="unknown config key 'solver.lr'"):
        train_main([demo, "solver.lr=0.1"])
    missing = tiny_overrides(dataset_root, tmp_path / "a", **{"data.synthetic.enabled": False}) + [
        f"data.train.ann_file={tmp_path / 'none.json'}", f"data.train.img_dir={tmp_path}",
        f"data.val.ann_file={tmp_path / 'none.json'}", f"data.val.img_dir={tmp_path}",
    ]
    with pytest.raises(SystemExit, match="data.train.ann_file not found"):
        train_main([demo] + missing)
    wrong_classes = tiny_overrides(dataset_root, tmp_path / "b", **{"data.synthetic.enabled": False}) + [
        f"data.train.ann_file={dataset_root / 'annotations' / 'train.json'}",
        f"data.train.img_dir={dataset_root / 'train'}",
        f"data.val.ann_file={dataset_root / 'annotations' / 'val.json'}",
        f"data.val.img_dir={dataset_root / 'val'}",
        "model.num_classes=4",
    ]
    with pytest.raises(SystemExit, match=r"model.num_classes=4 but data.(val|train)"):
        train_main([demo] + wrong_classes)
    with pytest.raises(SystemExit, match="not in the torch hub cache|backbone weights file not found"):
        train_main([demo] + tiny_overrides(dataset_root, tmp_path / "c", **{
            "model.backbone.weights": tmp_path / "missing.pth"}))
    with pytest.raises(ConfigError):
        tiny_cfg(dataset_root, tmp_path / "d", **{"model.head.gn_groups": 7})
    for name in "abcd":
        assert not (tmp_path / name / "checkpoint.pth").exists()


def test_eval_writes_metrics_and_rejects_other_architecture(dataset_root, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_cfg(dataset_root, out, **{"solver.max_iter": 2})).run()
    train_text = (out / "metrics.json").read_text()
    train_metrics = json.loads(train_text)
    metrics = run_evaluation(tiny_cfg(dataset_root, out), str(out / "model_final.pth"))
    assert (out / "metrics.json").read_text() == train_text  # the training run's file is kept
    written = json.loads((out / "eval_metrics.json").read_text())
    for key in METRIC_KEYS:
        assert key in written and key in train_metrics
    for key in METRIC_KEYS[:6]:
        assert -1.0 <= written[key] <= 1.0
    assert written["head_gmacs_avg"] > 0 and written["head_gmacs_min"] <= written["head_gmacs_max"]
    assert written["num_images"] == 4
    assert metrics["bbox_mAP"] == pytest.approx(train_metrics["bbox_mAP"])
    # the full training checkpoint is accepted as well
    run_evaluation(tiny_cfg(dataset_root, out), str(out / "checkpoint.pth"))

    with pytest.raises(ValueError, match="does not match the configured model.*shape mismatch"):
        run_evaluation(tiny_cfg(dataset_root, tmp_path / "e", **{"model.backbone.fpn_channels": 64}),
                       str(out / "model_final.pth"))
    with pytest.raises(ValueError, match="missing keys: .*head"):
        run_evaluation(tiny_cfg(dataset_root, tmp_path / "e", **{"model.head.num_convs": 2}),
                       str(out / "model_final.pth"))


def test_budget_weight_ramps_up_over_the_warmup(dataset_root, tmp_path):
    """model.head.budget_warmup: the budget term is scaled by iteration / warmup until then (gates start at
    about 0.99, so the unscaled term is about 0.99 λ)."""
    extra = {"model.head.kind": "dynamic", "model.head.budget_weight": 0.5, "solver.max_iter": 3}
    Trainer(tiny_cfg(dataset_root, tmp_path / "ramp", **extra, **{"model.head.budget_warmup": 1000})).run()
    Trainer(tiny_cfg(dataset_root, tmp_path / "flat", **extra, **{"model.head.budget_warmup": 0})).run()
    ramp, flat = read_log(tmp_path / "ramp"), read_log(tmp_path / "flat")
    for it in (1, 2, 3):
        assert flat[it]["loss_budget"] == pytest.approx(0.5 * 0.99, rel=0.05)
        assert ramp[it]["loss_budget"] == pytest.approx(it / 1000 * 0.5 * 0.99, rel=0.05)


class ExecutionRecorder(Trainer):
    """Records the execution mode of every router after each training step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.modes = set()

    def after_step(self, iteration):
        self.modes |= {m.execution for m in self.model.modules() if isinstance(m, Router)}


def test_sparse_and_dense_training_give_the_same_losses(dataset_root, tmp_path):
    """model.head.train_execution: the routers run in that mode while training; the sparse and dense
    executions are one function, so a few steps give the same losses (float32) and evaluate alike."""
    extra = {"model.head.kind": "dynamic", "model.head.budget_weight": 0.5, "model.head.budget_warmup": 0,
             "model.head.execution": "sparse", "solver.max_iter": 4, "data.flip_prob": 0.0}
    logs = {}
    for mode in ("sparse", "dense"):
        trainer = ExecutionRecorder(tiny_cfg(dataset_root, tmp_path / mode, **extra,
                                             **{"model.head.train_execution": mode}))
        trainer.run()
        assert trainer.modes == {mode}
        logs[mode] = read_log(tmp_path / mode)
    assert sorted(logs["sparse"]) == sorted(logs["dense"]) == [1, 2, 3, 4]
    for it, rec in logs["dense"].items():
        for key in ("loss", "loss_budget", "classification", "bbox_regression", "bbox_ctrness"):
            assert logs["sparse"][it][key] == pytest.approx(rec[key], rel=1e-4, abs=1e-6), (it, key)
    metrics = [json.loads((tmp_path / mode / "metrics.json").read_text()) for mode in ("sparse", "dense")]
    assert metrics[0]["head_gmacs_avg"] == pytest.approx(metrics[1]["head_gmacs_avg"], rel=1e-3)
