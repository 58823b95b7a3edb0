"""tools/visualize.py: figures of the documented size, work maps that add up to the reported cost, bad input."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsehead import collect_cost
from sparsehead.config import load_config
from sparsehead.data import load_image
from sparsehead.engine.checkpoint import atomic_save
from sparsehead.modeling.build import build_model
from sparsehead.visualization import keep_gates, realized_from_work, work_maps
from sparsehead.visualization.gates import PATHS

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "demo.yaml")
PNG_SIZE = (1600, 900)
OVERRIDES = [
    "device=cpu",
    "model.min_size=64",
    "model.max_size=96",
    "model.backbone.depth=18",
    "model.backbone.fpn_channels=32",
    "model.head.gn_groups=8",
    "model.head.num_routers=2",
    "model.head.execution=sparse",
]


def _tool():
    spec = importlib.util.spec_from_file_location("visualize_tool", REPO / "tools" / "visualize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _model(overrides: list[str] = OVERRIDES, seed: int = 0) -> torch.nn.Module:
    """A tiny detector whose gates are off at some pixels and on at others."""
    torch.manual_seed(seed)
    model = build_model(load_config(CONFIG, overrides)).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.head.named_parameters():
        if ".gate.conv." in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.05 if name.endswith("weight") else 0.4))
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("viz")
    model = _model()
    ckpt = root / "model_final.pth"
    atomic_save({"model": model.state_dict(), "config": "", "iteration": 0}, ckpt)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in (("first.png", (70, 90)), ("second.png", (64, 64))):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(images / name)
    return {"root": root, "model": model, "ckpt": ckpt, "images": images}


def _run(capsys, *args: str) -> tuple[int, str]:
    code = _tool()([CONFIG, *OVERRIDES, *args])
    return code, capsys.readouterr().err


def _check_identity(model: torch.nn.Module, images: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad(), keep_gates(model.head):
        model(images)
    reported = collect_cost(model.head).realized.double()
    work = work_maps(model.head)
    assert set(work["levels"][0]) == set(PATHS)
    torch.testing.assert_close(realized_from_work(work), reported, rtol=1e-6, atol=1.0)
    # some gated work was skipped and some ran: the identity is not trivially the full cost
    assert (reported < collect_cost(model.head).full.double()).all()
    assert sum(float(lv["depth2"]["count"].sum()) for lv in work["levels"]) > 0
    return reported


@pytest.mark.parametrize("execution", ["sparse", "dense"])
def test_work_maps_sum_to_realized_cost(setup, execution):
    model = setup["model"]
    model.head.set_execution(execution)
    try:
        imgs = [torch.rand(3, 70, 90, generator=torch.Generator().manual_seed(1)), torch.rand(3, 64, 64)]
        _check_identity(model, imgs)
    finally:
        model.head.set_execution("sparse")


def test_work_maps_fixed_head():
    model = _model([*OVERRIDES, "model.head.kind=fixed", "model.head.num_routers=1"])
    with torch.no_grad(), keep_gates(model.head):
        model([torch.rand(3, 64, 64)])
    work = work_maps(model.head)
    reported = collect_cost(model.head)
    torch.testing.assert_close(realized_from_work(work), reported.realized.double(), rtol=1e-6, atol=1.0)
    torch.testing.assert_close(reported.realized, reported.full)


def test_tool_writes_figures(setup, capsys, tmp_path):
    out = tmp_path / "out"
    code, err = _run(capsys, "--weights", str(setup["ckpt"]), "--input", str(setup["images"]), "--out", str(out))
    assert code == 0, err
    names = {"first.png", "second.png", "head_gmacs.png", "active_fraction.png"}
    assert names | {"summary.json"} == {p.name for p in out.iterdir()}
    for name in names:
        with Image.open(out / name) as img:
            img.verify()
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.size == PNG_SIZE
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 2 and summary["routers"] == ["cls r0", "cls r1", "reg r0", "reg r1"]
    # the tool runs each input alone; its numbers are the model's realised cost, and the work maps add up to it
    model = setup["model"]
    for name, gmacs in zip(("first.png", "second.png"), summary["head_gmacs"]):
        reported = _check_identity(model, [load_image(str(setup["images"] / name))])
        assert gmacs == pytest.approx(float(reported[0]) / 1e9, rel=1e-6)
    assert summary["head_gmacs_min"] <= summary["head_gmacs_avg"] <= summary["head_gmacs_max"]
    fractions = np.array(summary["active_fraction"]["depth"], dtype=float)
    assert fractions.shape == (4, 5) and ((fractions >= 0) & (fractions <= 1)).all()
    assert summary["active_fraction"]["down"][0][-1] is None and summary["active_fraction"]["up"][0][0] is None


def test_single_image_writes_one_figure(setup, capsys, tmp_path):
    out = tmp_path / "out"
    image = setup["images"] / "second.png"
    code, err = _run(capsys, "--weights", str(setup["ckpt"]), "--input", str(image), "--out", str(out),
                     "--score-thresh", "0.9")
    assert code == 0, err
    assert [p.name for p in out.iterdir()] == ["second.png"]


def test_missing_keys_named(setup, capsys, tmp_path):
    state = dict(setup["model"].state_dict())
    dropped = sorted(k for k in state if k.startswith("head.reg_tower.routers.1.depth.gate"))
    for k in dropped:
        del state[k]
    ckpt = tmp_path / "partial.pth"
    torch.save({"model": state}, ckpt)
    out = tmp_path / "out"
    code, err = _run(capsys, "--weights", str(ckpt), "--input", str(setup["images"]), "--out", str(out))
    assert code == 1
    assert "missing keys" in err and dropped[0] in err
    assert not out.exists()


def test_other_architecture(setup, capsys, tmp_path):
    ckpt = tmp_path / "one_router.pth"
    torch.save({"model": _model([*OVERRIDES, "model.head.num_routers=1"]).state_dict()}, ckpt)
    code, err = _run(capsys, "--weights", str(ckpt), "--input", str(setup["images"]), "--out", str(tmp_path / "o"))
    assert code == 1 and "does not match the configured model" in err and "missing keys" in err


def test_empty_folder(setup, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    code, err = _run(capsys, "--weights", str(setup["ckpt"]), "--input", str(empty), "--out", str(tmp_path / "o"))
    assert code == 1 and "no images" in err and str(empty) in err
    assert not (tmp_path / "o").exists()


def test_unreadable_image_leaves_no_output(setup, capsys, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a_good.png").write_bytes((setup["images"] / "second.png").read_bytes())
    (folder / "b_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"
    out.mkdir()
    code, err = _run(capsys, "--weights", str(setup["ckpt"]), "--input", str(folder), "--out", str(out))
    assert code == 1 and "b_bad.png" in err and "cannot read image" in err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("what", ["weights", "input"])
def test_missing_files(setup, capsys, tmp_path, what):
    weights = str(tmp_path / "nope.pth") if what == "weights" else str(setup["ckpt"])
    image = str(tmp_path / "nope.png") if what == "input" else str(setup["images"])
    code, err = _run(capsys, "--weights", weights, "--input", image, "--out", str(tmp_path / "o"))
    assert code == 1 and "not found" in err and "nope" in err


def test_val_matches_eval(setup, capsys, tmp_path, monkeypatch):
    """``--val`` batches like eval and reports the same realised head GMACs as eval's metrics."""
    from sparsehead.data import collate_fn
    from sparsehead.engine.data import build_test_loader
    from sparsehead.engine.evaluation import evaluate
    from sparsehead.visualization import val_dataset

    monkeypatch.chdir(tmp_path)
    data = [f"data.synthetic.root={tmp_path / 'data'}", "data.synthetic.num_train=2", "data.synthetic.num_val=3",
            "data.synthetic.image_size=64", "test.ims_per_batch=2", "data.num_workers=0"]
    out = tmp_path / "out"
    code = _tool()([CONFIG, *OVERRIDES, *data, "--weights", str(setup["ckpt"]), "--val", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 3 and len(list(out.glob("*.png"))) == 5
    for p in out.glob("*.png"):
        with Image.open(p) as img:
            assert img.size == PNG_SIZE

    cfg = load_config(CONFIG, [*OVERRIDES, *data])
    val = val_dataset(cfg)
    loader = build_test_loader(val, collate_fn, cfg.test.ims_per_batch, 0)
    metrics = evaluate(setup["model"], loader, val, torch.device("cpu"))
    for key in ("avg", "min", "max"):
        assert summary[f"head_gmacs_{key}"] == pytest.approx(metrics[f"head_gmacs_{key}"], rel=1e-9)
