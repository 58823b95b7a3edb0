"""Atomic file writes: a file appears complete under its name or not at all, with the usual permissions."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Union

__all__ = ["atomic_write", "default_mode"]

PathLike = Union[str, os.PathLike]


def default_mode(directory: bool = False) -> int:
    """Permissions a new file (0o666) or directory (0o777) gets under the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path`` (binary), then rename it over ``path``.

    A failure (or kill) during the write leaves any previous ``path`` untouched and no temporary file
    behind. The file gets the permissions of a plain ``open(path, "w")`` (the temporary file's own are
    owner-only). Creates missing parent directories. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
