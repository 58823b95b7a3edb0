"""The wheel installs into a fresh virtual environment and runs there without the repository: the console
entry points train the packaged ``demo`` config and predict, and the metadata requires no spconv build.

The fresh environment sees the heavy dependencies (torch, torchvision, spconv, ...) of the environment
running the tests through a ``.pth`` file, so nothing is downloaded; the wheel is installed with
``--no-deps`` and must be the ``sparsehead`` that is imported.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "output_dir": "out", "data.synthetic.root": "data", "data.synthetic.num_train": 8, "data.synthetic.num_val": 4,
    "data.synthetic.image_size": 64, "data.num_workers": 0, "model.min_size": 64, "model.max_size": 64,
    "model.backbone.fpn_channels": 32, "model.head.gn_groups": 8, "model.head.num_routers": 1,
    "solver.ims_per_batch": 2, "solver.checkpoint_period": 2, "test.ims_per_batch": 2,
}


def _run(cmd, cwd, env, timeout=600):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy, so that the build leaves nothing in the repository
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "datasets", "output", "outputs", ".*_cache"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src],
         tmp, env)
    (wheel,) = (tmp / "dist").glob("sparsehead-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp, env)
    py = venv / "bin" / "python"
    purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env).stdout
    purelib = Path(purelib.strip())
    (purelib / "heavy_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp, env)
    work = tmp / "work"
    work.mkdir()
    env["OMP_NUM_THREADS"] = "1"
    return {"bin": venv / "bin", "py": py, "purelib": purelib, "work": work, "env": env}


def test_imports_from_the_installed_wheel_and_requires_no_spconv_build(venv):
    out = _run([venv["py"], "-c",
                "import importlib.metadata as m, json, sparsehead; "
                "print(json.dumps({'file': sparsehead.__file__, 'requires': m.requires('sparsehead')}))"],
               venv["work"], venv["env"]).stdout
    info = json.loads(out.strip().splitlines()[-1])
    assert Path(info["file"]).is_relative_to(venv["purelib"]), info["file"]
    assert not Path(info["file"]).is_relative_to(REPO)
    unconditional = [r for r in info["requires"] if ";" not in r]
    assert not [r for r in unconditional if r.startswith("spconv")], unconditional
    assert any(r.startswith("spconv-cu126") and 'extra == "cu126"' in r for r in info["requires"])


def test_train_then_predict_with_the_console_scripts(venv):
    work, env, bin_ = venv["work"], venv["env"], venv["bin"]
    opts = [f"{k}={v}" for k, v in TINY.items()]
    proc = _run([bin_ / "sparsehead-train", "demo", "solver.max_iter=2", *opts], work, env)
    assert "[sparsehead] final" in proc.stdout
    config = (work / "out" / "config.yaml").read_text()
    assert "max_iter: 2" in config
    proc = _run([bin_ / "sparsehead-predict", "demo", *opts, "--weights", work / "out" / "model_final.pth",
                 "--input", work / "data" / "val", "--out", work / "preds.json"], work, env)
    record = json.loads((work / "preds_images.json").read_text())
    assert record["num_images"] == 4 and all(r["head_gmacs"] > 0 for r in record["images"])
    assert isinstance(json.loads((work / "preds.json").read_text()), list)
    for tool in ("sparsehead-eval", "sparsehead-benchmark", "sparsehead-visualize"):
        assert "usage:" in _run([bin_ / tool, "--help"], work, env).stdout
