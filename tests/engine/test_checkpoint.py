"""Atomic writes, RNG state round trips, strict model-weight loading, solver and data order."""

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from sparsehead.engine import checkpoint as ckpt_mod
from sparsehead.engine.checkpoint import (
    atomic_save,
    atomic_write_json,
    get_rng_state,
    load_model_weights,
    read_checkpoint,
    set_rng_state,
)
from sparsehead.engine.data import IterationBatchSampler, SeededDataset
from sparsehead.engine.solver import WarmupMultiStep


def test_atomic_save_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    atomic_save({"iteration": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"iteration": 2}, path)
    monkeypatch.undo()
    assert read_checkpoint(path)["iteration"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]  # no temporary file left behind


def test_atomic_write_json(tmp_path):
    atomic_write_json({"a": 1.5}, tmp_path / "m.json")
    assert (tmp_path / "m.json").read_text().strip() == '{\n  "a": 1.5\n}'


def test_rng_state_round_trip(tmp_path):
    state = get_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    atomic_save({"rng": state}, tmp_path / "r.pth")
    set_rng_state(read_checkpoint(tmp_path / "r.pth")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_load_model_weights_names_keys(tmp_path):
    src = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    atomic_save({"model": src.state_dict()}, tmp_path / "ok.pth")
    dst = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    load_model_weights(dst, tmp_path / "ok.pth")
    assert torch.equal(dst[0].weight, src[0].weight)

    other = nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 1), nn.ReLU(), nn.Linear(1, 1))
    atomic_save({"module." + k: v for k, v in other.state_dict().items()}, tmp_path / "other.pth")
    with pytest.raises(ValueError) as err:
        load_model_weights(dst, tmp_path / "other.pth")
    msg = str(err.value)
    assert "unexpected keys: 3.bias, 3.weight" in msg
    assert "shape mismatch" in msg and "0.weight" in msg
    atomic_save({"model": {"0.weight": src[0].weight}}, tmp_path / "part.pth")
    with pytest.raises(ValueError, match="missing keys: 0.bias, 1.bias, 1.weight"):
        load_model_weights(dst, tmp_path / "part.pth")


def test_read_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "none.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path / "junk.pth")


def test_warmup_multistep():
    f = WarmupMultiStep(steps=[10, 20], gamma=0.1, warmup_iters=4, warmup_factor=0.25)
    assert f(0) == pytest.approx(0.25)
    assert f(2) == pytest.approx(0.625)
    assert [f(4), f(9), f(10), f(19), f(20)] == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    state = sched.state_dict()
    assert state["lr_lambdas"][0]["steps"] == [10, 20]  # picklable callable: stored in the checkpoint


def test_sampler_is_a_function_of_iteration():
    full = list(IterationBatchSampler(10, 4, seed=3, start_iter=0, max_iter=7))
    resumed = list(IterationBatchSampler(10, 4, seed=3, start_iter=4, max_iter=7))
    assert resumed == full[4:]
    # each epoch covers the dataset once
    positions = [i for batch in full for i, _ in batch]
    assert sorted(positions[:10]) == list(range(10)) and sorted(positions[10:20]) == list(range(10))
    # a different seed gives a different order
    assert list(IterationBatchSampler(10, 4, seed=4, start_iter=0, max_iter=7)) != full
    # ranks take disjoint shares of the global batch
    r0 = list(IterationBatchSampler(10, 4, seed=3, start_iter=0, max_iter=7, rank=0, world_size=2))
    r1 = list(IterationBatchSampler(10, 4, seed=3, start_iter=0, max_iter=7, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1)] == full
    with pytest.raises(ValueError, match="not divisible"):
        IterationBatchSampler(10, 3, seed=0, start_iter=0, max_iter=1, world_size=2)


def test_seeded_dataset_is_reproducible_and_leaves_global_rng():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.rand(1).item() + random.random()

    ds = SeededDataset(Noise())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, b = ds[(0, 5)], ds[(0, 5)]
    assert a == b and ds[(0, 6)] != a
    assert torch.equal(torch.get_rng_state(), before)
