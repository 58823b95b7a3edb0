"""The sweep: grid parsing and planning (errors before any run), static heads once per depth, scheduling with
resume (finished runs are not re-run), the result files; and a real two-point sweep end to end."""

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from sparsehead.engine import sweep
from sparsehead.engine.sweep import (
    SweepError,
    aggregate,
    collect_rows,
    parse_grid,
    plan_sweep,
    run_state,
    run_sweep,
    write_outputs,
)

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
BW, ROUTERS, KIND = "model.head.budget_weight", "model.head.num_routers", "model.head.kind"


# -- grid and planning --------------------------------------------------------------------------------


def test_parse_grid_splits_at_top_level_commas():
    grid = parse_grid([f"{BW}=0,0.1", "solver.steps=[300,370],[200, 300]", "model.arch=fcos"])
    assert grid == {BW: ["0", "0.1"], "solver.steps": ["[300,370]", "[200, 300]"], "model.arch": ["fcos"]}


@pytest.mark.parametrize("items, match", [
    ([f"{BW}="], "empty value"),
    ([f"{BW}=0,,1"], "empty value"),
    ([f"{BW}=0,0"], "repeats"),
    ([f"{BW}=0", f"{BW}=1"], "twice"),
    (["seed=0,1"], "--seeds"),
    (["output_dir=a,b"], "output_dir"),
    ([BW], "dotted.key=value1"),
])
def test_parse_grid_errors(items, match):
    with pytest.raises(SweepError, match=match):
        parse_grid(items)


@pytest.mark.parametrize("grid, overrides, match", [
    ({"model.head.bogus": ["1", "2"]}, [], "unknown config key 'model.head.bogus'"),
    ({ROUTERS: ["2", "0"]}, [], "model.head.num_routers=0.*must be positive"),
    ({BW: ["0"]}, ["solver.nope=1"], "unknown config key 'solver.nope'"),
    ({BW: ["0"]}, [f"{BW}=1"], "also in --grid"),
    ({BW: ["0"]}, ["seed=3"], "--seeds"),
    ({BW: []}, [], "no values"),
])
def test_plan_errors_before_anything_is_written(tmp_path, grid, overrides, match):
    with pytest.raises(SweepError, match=match):
        plan_sweep(DEMO, grid, tmp_path / "sweep", overrides=overrides)
    assert not (tmp_path / "sweep").exists()


def test_plan_missing_config(tmp_path):
    with pytest.raises(SweepError, match="config file not found"):
        plan_sweep(str(tmp_path / "nope.yaml"), {}, tmp_path / "sweep")


def test_main_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sweep.main([DEMO, "--out", str(tmp_path / "s"), "--jobs", "0"])
    assert "--jobs must be >= 1" in capsys.readouterr().err
    assert sweep.main([DEMO, "--grid", "model.head.bogus=1", "--out", str(tmp_path / "s")]) == 2
    assert "unknown config key 'model.head.bogus'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_plan_static_heads_once_per_depth(tmp_path):
    grid = {BW: ["0", "0.5"], ROUTERS: ["1", "2"]}
    runs = plan_sweep(DEMO, grid, tmp_path, seeds=[0, 1], include_static=True, overrides=["device=cpu"])
    points = list(dict.fromkeys(r.point for r in runs))
    assert points == [
        "dynamic_budget_weight-0_num_routers-1", "dynamic_budget_weight-0_num_routers-2",
        "dynamic_budget_weight-0.5_num_routers-1", "dynamic_budget_weight-0.5_num_routers-2",
        "plain", "fixed_num_routers-1", "fixed_num_routers-2",
    ]
    assert len(runs) == 2 * len(points)
    by_name = {r.name: r for r in runs}
    plain = by_name["plain/seed1"]
    assert plain.overrides == (f"{KIND}=plain",) and plain.cfg.model.head.kind == "plain"
    assert plain.cfg.seed == 1 and plain.out_dir == tmp_path.resolve() / "plain" / "seed1"
    fixed = by_name["fixed_num_routers-2/seed0"]
    assert fixed.cfg.model.head.num_routers == 2 and fixed.cfg.model.head.kind == "fixed"
    dyn = by_name["dynamic_budget_weight-0.5_num_routers-1/seed0"]
    assert dyn.cfg.model.head.budget_weight == 0.5 and dyn.cfg.model.head.num_routers == 1
    assert Path(dyn.cfg.output_dir) == dyn.out_dir


def test_plan_box_init_is_read_by_every_fcos_head_and_no_retinanet_head(tmp_path):
    grid = {"model.head.box_init": ["0", "1"]}
    fcos = plan_sweep(DEMO, grid, tmp_path / "fcos", seeds=[0], include_static=True, overrides=["device=cpu"])
    assert [r.point for r in fcos] == [f"{k}_box_init-{v}" for k in ("dynamic", "plain", "fixed") for v in (0, 1)]
    assert [r.cfg.model.head.box_init for r in fcos] == [0.0, 1.0] * 3
    retina = str(Path(DEMO).with_name("demo_retinanet.yaml"))
    runs = plan_sweep(retina, grid, tmp_path / "retina", seeds=[0], include_static=True, overrides=["device=cpu"])
    assert [r.point for r in runs] == ["dynamic", "plain", "fixed"]  # a key no head reads makes one point


def test_plan_budget_warmup_trains_the_static_heads_once(tmp_path):
    # only the gated head has a budget term to ramp in: plain and fixed are one point each
    runs = plan_sweep(DEMO, {"model.head.budget_warmup": ["0", "150"]}, tmp_path, seeds=[0], include_static=True,
                      overrides=["device=cpu"])
    assert [r.point for r in runs] == ["dynamic_budget_warmup-0", "dynamic_budget_warmup-150", "plain", "fixed"]
    assert [r.cfg.model.head.budget_warmup for r in runs[:2]] == [0, 150]


def test_plan_threads_and_seeds(tmp_path):
    # demo.yaml leaves num_threads at 0 (torch's default): the sweep sets 1 on the CPU, and keeps any other value
    runs = plan_sweep(DEMO, {}, tmp_path, overrides=["device=cpu"])
    assert [r.name for r in runs] == ["dynamic/seed0"]
    assert runs[0].cfg.num_threads == 1 and "num_threads=1" in runs[0].base
    runs = plan_sweep(DEMO, {}, tmp_path, seeds=[3, 4], overrides=["num_threads=2"])
    assert [r.cfg.num_threads for r in runs] == [2, 2] and [r.cfg.seed for r in runs] == [3, 4]
    with pytest.raises(SweepError, match="distinct"):
        plan_sweep(DEMO, {}, tmp_path, seeds=[1, 1])


def test_plan_names_stay_unique_for_list_values(tmp_path):
    runs = plan_sweep(DEMO, {"solver.steps": ["[300,370]", "[300, 370]", "[200,300]"]}, tmp_path)
    names = [r.point for r in runs]
    assert len(set(names)) == 2  # the first two are the same config: trained once
    assert all("/" not in n and "[" not in n for n in names)


# -- running with a stand-in for the trainer -------------------------------------------------------

FAKE_TRAINER = """
import json, sys
from pathlib import Path
out, config_yaml, metrics, calls, fail = sys.argv[1:6]
out = Path(out)
with open(calls, "a") as f:
    f.write(json.dumps({"run": out.parent.name + "/" + out.name, "resume": "--resume" in sys.argv}) + "\\n")
out.mkdir(parents=True, exist_ok=True)
(out / "config.yaml").write_text(config_yaml)
if fail == "1":
    (out / "checkpoint.pth").write_bytes(b"")
    print("boom", file=sys.stderr)
    sys.exit(1)
(out / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "elapsed": 0.5 * i}) + "\\n" for i in (1, 2)))
(out / "model_final.pth").write_bytes(b"")
(out / "metrics.json").write_text(metrics)
"""


def fake_metrics(cfg) -> dict:
    """Numbers that depend on the run's settings, so the collected rows can be checked against them."""
    bw = cfg.model.head.budget_weight if cfg.model.head.kind == "dynamic" else 0.0
    full = {"plain": 0.3, "fixed": 0.2 * cfg.model.head.num_routers}.get(cfg.model.head.kind, 0.1)
    gmacs = full * (1 - bw) if cfg.model.head.kind == "dynamic" else full
    out = {k: 0.0 for k in sweep.METRIC_KEYS}
    out.update(bbox_mAP=0.2 + 0.01 * cfg.seed + 0.1 * bw, bbox_mAP_50=0.5 + 0.02 * cfg.seed, bbox_mAP_75=0.1,
               head_gmacs_avg=gmacs, head_gmacs_min=0.5 * gmacs, head_gmacs_max=1.5 * gmacs)
    return out


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    calls = tmp_path / "calls.jsonl"
    failing = set()

    def command(run, resume):
        argv = [sys.executable, str(script), str(run.out_dir), OmegaConf.to_yaml(run.cfg),
                json.dumps(fake_metrics(run.cfg)), str(calls), "1" if run.name in failing else "0"]
        return argv + (["--resume"] if resume else [])

    def read_calls():
        return [json.loads(x) for x in calls.read_text().splitlines()] if calls.exists() else []

    command.calls = read_calls
    command.failing = failing
    return command


def read_csv(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_runs_resumes_and_writes_results(tmp_path, fake):
    out = tmp_path / "sweep"
    grid = {BW: ["0", "0.5"]}
    runs = plan_sweep(DEMO, grid, out, seeds=[0, 1, 2], include_static=True, overrides=["device=cpu"])
    assert [r.point for r in runs[::3]] == ["dynamic_budget_weight-0", "dynamic_budget_weight-0.5", "plain",
                                            "fixed"]
    fake.failing.add("fixed/seed1")
    messages = []
    status = run_sweep(runs, jobs=3, command=fake, log=messages.append, poll_s=0.01)
    assert sorted(c["run"] for c in fake.calls()) == sorted(r.name for r in runs)
    assert not any(c["resume"] for c in fake.calls())
    assert status["fixed/seed1"] == "failed" and sum(s == "done" for s in status.values()) == len(runs) - 1
    assert any("FAILED  fixed/seed1" in m and "boom" in m for m in messages)

    rows = collect_rows(runs, status)
    paths = write_outputs(out, rows, title="demo.yaml")
    assert {p.name for p in paths} == {"sweep.csv", "sweep_points.csv", "sweep.json", "sweep.png"}
    table = read_csv(out / "sweep.csv")
    assert [(r["point"], int(r["seed"])) for r in table] == [(r.point, r.seed) for r in runs]
    for row, run in zip(table, runs):
        if run.name == "fixed/seed1":
            assert row["status"] == "failed" and row["bbox_mAP"] == ""
            continue
        expected = fake_metrics(run.cfg)
        assert row["status"] == "done" and row["head"] == run.cfg.model.head.kind
        for key in sweep.RESULT_KEYS:
            assert float(row[key]) == pytest.approx(expected[key])
        assert row[BW] == run.settings.get(BW, "") and float(row["train_loop_s"]) == pytest.approx(1.0)
        assert float(row["run_time_s"]) > 0 and row["attempts"] == "1"
    assert {r["budget_weight"] for r in table if r["head"] != "dynamic"} == {""}
    assert {r["depth"] for r in table if r["head"] == "plain"} == {""}

    points = {p["point"]: p for p in read_csv(out / "sweep_points.csv")}
    assert list(points) == ["dynamic_budget_weight-0", "dynamic_budget_weight-0.5", "plain", "fixed"]
    maps = [fake_metrics(r.cfg)["bbox_mAP"] for r in runs if r.point == "dynamic_budget_weight-0.5"]
    p = points["dynamic_budget_weight-0.5"]
    assert float(p["bbox_mAP_mean"]) == pytest.approx(statistics.fmean(maps))
    assert float(p["bbox_mAP_std"]) == pytest.approx(statistics.stdev(maps))
    assert (float(p["bbox_mAP_seed_min"]), float(p["bbox_mAP_seed_max"])) == pytest.approx((min(maps), max(maps)))
    assert p["num_seeds"] == "3" and p["seeds"] == "0 1 2"
    assert points["fixed"]["num_seeds"] == "2" and points["fixed"]["seeds"] == "0 2"
    data = json.loads((out / "sweep.json").read_text())
    assert len(data["runs"]) == len(runs) and [q["point"] for q in data["points"]] == list(points)
    with Image.open(out / "sweep.png") as img:
        assert img.size[0] > 500 and img.size[1] > 200

    # Second invocation: the failed run (it left a checkpoint) is continued with --resume; a run with
    # neither metrics.json nor weights nor checkpoint starts afresh; every finished run is left alone.
    fake.failing.clear()
    redo = runs[1]
    (redo.out_dir / "metrics.json").unlink()
    (redo.out_dir / "model_final.pth").unlink()
    mtimes = {r.name: (r.out_dir / "metrics.json").stat().st_mtime_ns for r in runs if r.name not in
              ("fixed/seed1", redo.name)}
    before = len(fake.calls())
    assert run_state(runs[-2]) == "resume" and run_state(redo) == "new"
    status = run_sweep(runs, jobs=2, command=fake, log=messages.append, poll_s=0.01)
    again = fake.calls()[before:]
    assert sorted((c["run"], c["resume"]) for c in again) == sorted([("fixed/seed1", True), (redo.name, False)])
    assert set(status.values()) == {"done"}
    assert {r.name: (r.out_dir / "metrics.json").stat().st_mtime_ns for r in runs if r.name in mtimes} == mtimes
    assert json.loads((runs[-2].out_dir / sweep.RUN_RECORD).read_text())["attempts"] == 2
    # A third invocation starts nothing.
    before = len(fake.calls())
    run_sweep(runs, jobs=2, command=fake, log=messages.append, poll_s=0.01)
    assert len(fake.calls()) == before


def test_folder_of_another_config_is_refused(tmp_path, fake):
    out = tmp_path / "sweep"
    runs = plan_sweep(DEMO, {BW: ["0"]}, out, overrides=["solver.max_iter=10"])
    run_sweep(runs, command=fake, log=lambda m: None, poll_s=0.01)
    with pytest.raises(SweepError, match=r"another config \(solver.max_iter: 10 -> 20\)"):
        plan_sweep(DEMO, {BW: ["0"]}, out, overrides=["solver.max_iter=20"])
    assert [r.point for r in plan_sweep(DEMO, {BW: ["0"]}, out, overrides=["solver.max_iter=10"])] == [runs[0].point]


def test_interrupt_terminates_the_runs_and_keeps_their_time(tmp_path):
    runs = plan_sweep(DEMO, {BW: ["0", "0.5"]}, tmp_path / "sweep")

    def sleeper(run, resume):
        return [sys.executable, "-c", "import time; time.sleep(120)"]

    def interrupt(signum, frame):  # Ctrl-C, two seconds in
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(2)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(runs, jobs=2, command=sleeper, log=lambda m: None, poll_s=0.01)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    for run in runs:
        rec = json.loads((run.out_dir / sweep.RUN_RECORD).read_text())
        assert rec["attempts"] == 1 and rec["last_returncode"] == -signal.SIGTERM and rec["wall_time_s"] > 0
        assert run_state(run) == "new"


SWEEP_UNDER_SIGTERM = """
import json, sys
from pathlib import Path
from sparsehead.engine.sweep import Terminated, plan_sweep, run_sweep
out = Path(sys.argv[2])
child = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
runs = plan_sweep(sys.argv[1], {"model.head.budget_weight": ["0", "0.5"]}, out / "sweep")
try:
    run_sweep(runs, jobs=2, command=lambda run, resume: [sys.executable, "-c", child, str(run.out_dir / "pid")],
              log=lambda m: None, poll_s=0.01)
except Terminated as e:
    sys.exit(100 + e.signum)
"""


def test_sigterm_stops_the_sweep_and_its_runs(tmp_path):
    """A sweep stopped with SIGTERM (kill, a job scheduler) terminates its running children and says so, instead
    of dying alone and leaving them training unwatched in the folders the next sweep will use."""
    script = tmp_path / "sweep_under_sigterm.py"
    script.write_text(SWEEP_UNDER_SIGTERM)
    parent = subprocess.Popen([sys.executable, str(script), DEMO, str(tmp_path)])
    children: list = []
    try:
        pid_files = sorted((tmp_path / "sweep").rglob("pid"))
        deadline = time.monotonic() + 60
        while len(pid_files) < 2 or not all(p.read_text() for p in pid_files):
            assert time.monotonic() < deadline and parent.poll() is None, "the sweep did not start its two runs"
            time.sleep(0.05)
            pid_files = sorted((tmp_path / "sweep").rglob("pid"))
        children = [int(p.read_text()) for p in pid_files]
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 100 + signal.SIGTERM
        for pid in children:  # reaped by the sweep: no such process any more
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        for run_dir in (p.parent for p in pid_files):
            rec = json.loads((run_dir / sweep.RUN_RECORD).read_text())
            assert rec["attempts"] == 1 and rec["last_returncode"] == -signal.SIGTERM
    finally:  # nothing of a failed check outlives the test
        parent.kill()
        parent.wait()
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_aggregate_single_seed_has_no_spread():
    rows = [{"point": "a", "seed": 0, "status": "done", "head": "dynamic", "depth": 2, "budget_weight": 0.1,
             "overrides": "", "run_dir": "", "attempts": 1, "run_time_s": 3.0, "train_loop_s": 2.0,
             **{k: 0.5 for k in sweep.RESULT_KEYS}}]
    (p,) = aggregate(rows)
    assert p["bbox_mAP_mean"] == 0.5 and p["bbox_mAP_std"] is None and p["num_seeds"] == 1


# -- end to end with the trainer ---------------------------------------------------------------------


@pytest.mark.slow
def test_two_point_sweep_end_to_end(tmp_path, monkeypatch, tiny_demo):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "sweep"
    tiny = tiny_demo(tmp_path, **{"solver.warmup_iters": 0, "solver.steps": "[100]", "solver.checkpoint_period": 1})
    argv = [DEMO, *tiny, "--grid", f"{BW}=0,0.5", "--jobs", "2", "--out", str(out)]
    assert sweep.main(argv) == 0
    table = read_csv(out / "sweep.csv")
    assert [r["point"] for r in table] == ["dynamic_budget_weight-0", "dynamic_budget_weight-0.5"]
    for row in table:
        metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert row["status"] == "done" and float(row["bbox_mAP"]) == pytest.approx(metrics["bbox_mAP"])
        assert 0 < float(row["head_gmacs_min"]) <= float(row["head_gmacs_avg"]) <= float(row["head_gmacs_max"])
        assert float(row["run_time_s"]) > 0 and float(row["train_loop_s"]) > 0
        stored = yaml.safe_load((Path(row["run_dir"]) / "config.yaml").read_text())
        assert stored["num_threads"] == 1 and stored["model"]["head"]["budget_weight"] == float(row[BW])
    assert len(json.loads((out / "sweep.json").read_text())["points"]) == 2
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Interrupt one run after its last checkpoint (no metrics.json): the next sweep resumes only that one.
    kept, redo = (Path(r["run_dir"]) for r in table)
    (redo / "metrics.json").unlink()
    kept_mtime = (kept / "metrics.json").stat().st_mtime_ns
    assert sweep.main(argv) == 0
    assert (kept / "metrics.json").stat().st_mtime_ns == kept_mtime
    assert json.loads((kept / sweep.RUN_RECORD).read_text())["attempts"] == 1
    assert json.loads((redo / sweep.RUN_RECORD).read_text())["attempts"] == 2
    assert "Resumed from" in (redo / "log.txt").read_text()
    assert len(read_csv(out / "sweep.csv")) == 2
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
