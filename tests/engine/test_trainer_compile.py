"""solver.compile: training with torch.compile gives the eager losses; sparse training execution is refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsehead.config import ConfigError, load_config
from sparsehead.engine.trainer import Trainer

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def test_compile_needs_dense_training_execution():
    with pytest.raises(ConfigError, match="solver.compile.*'sparse'"):
        load_config(DEMO, ["solver.compile=true", "model.head.train_execution=sparse"])
    with pytest.raises(ConfigError, match="solver.compile.*'auto'"):
        load_config(DEMO, ["solver.compile=true", "model.head.train_execution=", "model.head.execution=auto"])
    assert load_config(DEMO, ["solver.compile=true"]).solver.compile  # the demo trains dense
    # The plain head has no execution mode.
    assert load_config(DEMO, ["solver.compile=true", "model.head.kind=plain", "model.head.train_execution=sparse",
                              "model.backbone.fpn_channels=64"]).solver.compile


@pytest.mark.slow
def test_compiled_training_losses_equal_eager(tmp_path):
    from torch._dynamo.utils import counters

    from sparsehead.data import ensure_dataset

    root = ensure_dataset(tmp_path / "data", num_train=4, num_val=2, image_size=64, num_classes=3, seed=0)
    losses = {}
    for compiled in (False, True):
        out = tmp_path / f"run_{compiled}"
        cfg = load_config(DEMO, [
            f"output_dir={out}", f"data.synthetic.root={root}", "data.synthetic.num_train=4",
            "data.synthetic.num_val=2", "data.synthetic.image_size=64", "data.synthetic.num_classes=3",
            "model.num_classes=3", "model.min_size=64", "model.max_size=64", "model.backbone.fpn_channels=32",
            "model.head.num_routers=1", "model.head.gn_groups=8", "data.flip_prob=0", "solver.max_iter=3",
            "solver.ims_per_batch=2", "solver.base_lr=0.005", "solver.warmup_iters=0", "solver.steps=[100]",
            "solver.log_period=1",
            "solver.checkpoint_period=100", "test.ims_per_batch=2", f"solver.compile={str(compiled).lower()}",
        ])
        before = counters["stats"]["unique_graphs"]
        Trainer(cfg).run()
        assert (counters["stats"]["unique_graphs"] > before) == compiled  # the backbone and head compiled
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[compiled] = [r for r in recs if "eval" not in r]
    eager, comp = losses[False], losses[True]
    assert [r["iteration"] for r in eager] == [r["iteration"] for r in comp] == [1, 2, 3]
    for a, b in zip(eager, comp):
        for key in ("loss", "loss_budget", "classification", "bbox_regression"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["iteration"], key)
