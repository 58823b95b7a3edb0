"""A run never silently loses or mixes work: the output folder is locked for the run's life (stale locks
are taken over), temporaries of killed writes are removed, SIGTERM/SIGINT stop after a checkpoint, --resume
uses the saved run's settings, unwritable outputs and foreign checkpoints are one clear line, and
``model.num_classes`` left unset is inferred from the training annotations."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_trainer import DEMO, Interrupted, KilledTrainer, read_log, tiny_cfg, tiny_overrides

from sparsehead.engine.checkpoint import read_checkpoint
from sparsehead.engine.launch import train_main
from sparsehead.engine.trainer import RunError, Trainer
from sparsehead.utils.allocator import tune_allocator

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))

HOLD_LOCK = """
import sys, time
from sparsehead.utils.file_io import DirectoryLock
DirectoryLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _holder(directory: Path) -> subprocess.Popen:
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(directory)], stdout=subprocess.PIPE, text=True,
                            env=ENV)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _explicit_paths(root: Path) -> dict:
    return {
        "data.synthetic.enabled": False,
        "data.train.ann_file": root / "annotations" / "train.json", "data.train.img_dir": root / "train",
        "data.val.ann_file": root / "annotations" / "val.json", "data.val.img_dir": root / "val",
        "model.num_classes": "null",
    }


def test_locked_output_dir_refused_then_stale_lock_and_temporaries_taken_over(dataset_root, tmp_path, caplog):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        with pytest.raises(RunError, match=rf"in use by another run \(pid {holder.pid}\)"):
            Trainer(tiny_cfg(dataset_root, out)).run()
    finally:
        holder.kill()  # as kill -9: the holder never releases the lock itself
        holder.wait()
    assert not (out / "checkpoint.pth").exists()
    tmp = out / ".checkpoint.pth.k1ll3d00.tmp"  # what a write killed half-way leaves
    tmp.write_bytes(b"\0" * 4096)
    # explicit data paths (the demo's generated dataset is switched off), model.num_classes inferred
    cfg = tiny_cfg(dataset_root, out, **{"solver.max_iter": 2, **_explicit_paths(dataset_root)})
    assert cfg.model.num_classes is None
    Trainer(cfg).run()
    log = (out / "log.txt").read_text()
    assert f"locked by process {holder.pid}, which is gone" in log
    assert "removed 1 temporary file" in log and not tmp.exists()
    assert f"CPU allocator: {tune_allocator(cfg.cpu_allocator)}" in log
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["num_classes"] == 3
    assert yaml.safe_load(read_checkpoint(out / "model_final.pth")["config"])["model"]["num_classes"] == 3
    assert (out / ".lock").read_text() == ""  # released: nobody holds it


# SIGTERM as a cluster scheduler sends it: to the whole process group, DataLoader workers included.
@pytest.mark.parametrize("sig, group, workers", [(signal.SIGTERM, True, 1), (signal.SIGINT, False, 0)])
def test_signal_stops_after_a_checkpoint(dataset_root, tmp_path, sig, group, workers):
    out = tmp_path / "run"
    opts = tiny_overrides(dataset_root, out, **{"solver.max_iter": 200, "solver.checkpoint_period": 1000,
                                                "data.num_workers": workers})
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "train.py"), str(DEMO), *opts], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    stopped = int(err.split("stopped at iteration ")[1].split(";")[0])
    assert "; resume with --resume" in err
    assert 2 <= stopped < 200
    assert read_checkpoint(out / "checkpoint.pth")["iteration"] == stopped
    assert max(read_log(out)) == stopped
    assert not (out / "model_final.pth").exists()


def test_resume_keeps_the_saved_settings_and_says_so(dataset_root, tmp_path):
    extra = {"solver.max_iter": 7, "solver.checkpoint_period": 4, "solver.warmup_iters": 0}
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        KilledTrainer(tiny_cfg(dataset_root, out, **extra)).run()
    saved_lr = tiny_cfg(dataset_root, out).solver.base_lr
    changed = {**extra, "solver.base_lr": 0.05, "solver.steps": "[5,6]", "solver.max_iter": 6,
               "model.head.kind": "fixed"}
    Trainer(tiny_cfg(dataset_root, out, **changed), resume=True).run()
    used = yaml.safe_load((out / "config.yaml").read_text())
    assert used["solver"]["base_lr"] == saved_lr and used["solver"]["steps"] == [100]
    assert used["model"]["head"]["kind"] == "plain"
    assert used["solver"]["max_iter"] == 6  # a resumable setting: taken from the command line
    assert max(read_log(out)) == 6
    assert all(r["lr"] == saved_lr for r in read_log(out).values())
    lines = [x for x in (out / "log.txt").read_text().splitlines() if "differ from the saved run" in x]
    assert len(lines) == 1
    for part in ("solver.base_lr=0.05 (saved: 0.01)", "solver.steps=[5, 6]", "model.head.kind=fixed"):
        assert part in lines[0]
    assert "changed from the saved run: solver.max_iter=6 (saved: 7)" in (out / "log.txt").read_text()


def test_unusable_output_dirs_and_foreign_checkpoint_are_one_line(dataset_root, tmp_path):
    demo = str(DEMO)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=r"output_dir .*file is a file, not a folder"):
        train_main([demo, *tiny_overrides(dataset_root, tmp_path / "file")])
    with pytest.raises(SystemExit, match=r"output_dir .*file/run cannot be written: Not a directory"):
        train_main([demo, *tiny_overrides(dataset_root, tmp_path / "file" / "run")])

    out = tmp_path / "run"
    Trainer(tiny_cfg(dataset_root, out, **{"solver.max_iter": 2})).run()
    ckpt = read_checkpoint(out / "checkpoint.pth")
    del ckpt["config"]  # a checkpoint that does not say what it is (e.g. copied from elsewhere)
    torch.save(ckpt, out / "checkpoint.pth")
    (out / "config.yaml").unlink()
    (out / "model_final.pth").unlink()
    with pytest.raises(SystemExit, match=r"cannot be resumed: .*does not match the configured model"):
        train_main([demo, *tiny_overrides(dataset_root, out, **{"model.head.kind": "dynamic"}), "--resume"])


def test_full_disk_keeps_the_previous_checkpoint(dataset_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    calls = []

    class FullDisk:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:  # the second checkpoint finds the disk full
            return real_save(obj, FullDisk(f), *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(RunError, match=r"cannot write .*checkpoint.pth: .*\(the previous one was kept\)") as err:
        Trainer(tiny_cfg(dataset_root, out)).run()
    assert "\n" not in str(err.value)
    assert read_checkpoint(out / "checkpoint.pth")["iteration"] == 2
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    json.dumps(str(err.value))
