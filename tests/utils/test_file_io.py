"""Atomic writes: all or nothing, and the permissions an ordinary write would give."""
import os
import stat

import pytest

from sparsehead.data import generate_dataset
from sparsehead.engine import atomic_save
from sparsehead.utils import atomic_write


@pytest.fixture
def umask():
    """Set the process umask for one test."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_file_gets_the_umask_permissions(tmp_path, umask, mask, mode):
    umask(mask)
    path = atomic_write(tmp_path / "sub" / "out.bin", lambda f: f.write(b"abc"))
    assert path.read_bytes() == b"abc"
    assert stat.S_IMODE(path.stat().st_mode) == mode
    atomic_save({"x": 1}, tmp_path / "ckpt.pth")
    assert stat.S_IMODE((tmp_path / "ckpt.pth").stat().st_mode) == mode


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_generated_dataset_directory_gets_the_umask_permissions(tmp_path, umask):
    umask(0o022)
    root = tmp_path / "ds"
    generate_dataset(root, 1, 1, image_size=32)
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
