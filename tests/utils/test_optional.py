"""spconv is optional: one clear message naming the extras when it is missing, the CPU-only build refused,
and any spconv-cuXXX accepted. Run in fresh interpreters that see only what each test lays out."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OPTIONAL = REPO / "sparsehead" / "utils" / "optional.py"

# Loads the module by its path (not through the package, whose other modules need torch): `-I -S` gives an
# interpreter without site-packages, so only the folders the test puts on sys.path are seen.
PROBE = textwrap.dedent("""
    import importlib.util, sys
    sys.path[:0] = sys.argv[2:]
    spec = importlib.util.spec_from_file_location("optional", sys.argv[1])
    optional = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(optional)
    print("distribution:", optional.spconv_distribution())
    print("has_spconv:", optional.has_spconv())
    try:
        module = optional.import_spconv()
        print("imported:", module.__name__)
    except optional.SpconvUnavailable as e:
        print("error:", e)
""")


def _probe(*paths: Path) -> str:
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", PROBE, str(OPTIONAL), *map(str, paths)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _fake_spconv(root: Path, dist: str, with_pytorch: bool = True) -> Path:
    pkg = root / "spconv"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    if with_pytorch:
        (pkg / "pytorch.py").write_text("")
    info = root / f"{dist.replace('-', '_')}-2.3.8.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 2.3.8\n")
    return root


def test_missing_spconv_names_the_extras():
    out = _probe()
    assert "distribution: None" in out and "has_spconv: False" in out
    assert "not installed" in out
    for extra in ("cu118", "cu120", "cu121", "cu124", "cu126"):
        assert f"[{extra}]" in out


def test_cpu_only_build_is_refused(tmp_path):
    out = _probe(_fake_spconv(tmp_path, "spconv"))
    assert "distribution: spconv\n" in out and "has_spconv: False" in out
    assert "CPU-only build" in out and "pip uninstall spconv" in out and "sparsehead[cu120]" in out


@pytest.mark.parametrize("dist", ["spconv-cu120", "spconv-cu126"])
def test_any_cuda_build_is_accepted(tmp_path, dist):
    out = _probe(_fake_spconv(tmp_path, dist))
    assert f"distribution: {dist}\n" in out and "has_spconv: True" in out and "imported: spconv.pytorch" in out


def test_broken_install_is_named(tmp_path):
    out = _probe(_fake_spconv(tmp_path, "spconv-cu118", with_pytorch=False))
    assert "spconv (spconv-cu118) is installed but cannot be imported" in out


BLOCKED = textwrap.dedent("""
    import sys

    class HideSpconv:
        def find_spec(self, name, path=None, target=None):
            if name == "spconv" or name.startswith("spconv."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, HideSpconv())
    import torch
    import sparsehead
    from sparsehead import DynamicTower, has_spconv, import_spconv

    assert not has_spconv()
    try:
        import_spconv()
    except ImportError as e:
        assert "sparsehead[cu120]" in str(e)
    torch.manual_seed(0)
    tower = DynamicTower(16, 1, gn_groups=4, num_levels=2).eval()
    feats = [torch.randn(1, 16, 8, 8), torch.randn(1, 16, 4, 4)]
    outs = {}
    with torch.no_grad():
        for mode in ("dense", "sparse"):
            tower.set_execution(mode)
            outs[mode] = tower(feats)
    for a, b in zip(outs["dense"], outs["sparse"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    print("ok")
""")


def _run_script(script: str) -> None:
    """Run ``script`` in a fresh interpreter on this checkout; it must print exactly ``ok``."""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_cpu_tower_runs_without_spconv():
    _run_script(BLOCKED)


LAZY = textwrap.dedent("""
    import sys

    import torch
    import sparsehead
    from sparsehead import DynamicTower

    assert "spconv" not in sys.modules, "import sparsehead imported spconv"
    tower = DynamicTower(16, 1, gn_groups=4, num_levels=2).eval()
    tower.set_execution("sparse")
    with torch.no_grad():
        tower([torch.randn(1, 16, 8, 8), torch.randn(1, 16, 4, 4)])
    assert "spconv" not in sys.modules, "a CPU tower imported spconv"
    assert sparsehead.has_spconv() == ("spconv.pytorch" in sys.modules)
    print("ok")
""")


def test_spconv_is_imported_only_when_needed():
    """2D towers on CPU never need spconv: importing the package and running one leaves it unimported."""
    _run_script(LAZY)
