"""Atomic file writes (a file appears complete under its name or not at all, with the usual permissions),
the clean-up of their temporaries after a kill, and an exclusive lock on a folder held by one process."""
from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from typing import IO, Callable, List, Optional, Union

__all__ = ["DirectoryLock", "LockedError", "atomic_write", "default_mode", "remove_stale_temporaries"]

PathLike = Union[str, os.PathLike]


def default_mode(directory: bool = False) -> int:
    """Permissions a new file (0o666) or directory (0o777) gets under the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


_TMP_SUFFIX = ".tmp"


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path`` (binary), then rename it over ``path``.

    A failure (or kill) during the write leaves any previous ``path`` untouched and no temporary file
    behind. The file gets the permissions of a plain ``open(path, "w")`` (the temporary file's own are
    owner-only). Creates missing parent directories. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
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


def remove_stale_temporaries(directory: PathLike) -> List[Path]:
    """Delete the temporary files that :func:`atomic_write` left in ``directory`` when its process was
    killed mid-write (``.NAME.XXXXXXXX.tmp``); returns them. Call it only while no writer is active there
    (e.g. holding the folder's :class:`DirectoryLock`)."""
    removed = []
    for p in Path(directory).glob(f".*{_TMP_SUFFIX}"):
        if p.is_file() and p.name.count(".") >= 3:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class LockedError(RuntimeError):
    """The folder is locked by another live process (``pid``, None when it could not be read)."""

    def __init__(self, directory: Path, pid: Optional[int]) -> None:
        self.directory, self.pid = directory, pid
        who = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"{directory} is in use by {who}")


class DirectoryLock:
    """An exclusive lock on a folder for the life of one process: ``flock`` on ``directory/.lock``.

    The operating system releases the lock when the process ends, however it ends, so a lock is never left
    behind by a crash: the file then still holds the dead holder's pid, and :meth:`acquire` reports it as
    taken over. :meth:`acquire` raises :class:`LockedError` naming the live holder's pid.
    """

    NAME = ".lock"

    def __init__(self, directory: PathLike) -> None:
        self.directory = Path(directory)
        self.path = self.directory / self.NAME
        self._fd: Optional[int] = None

    def _read_pid(self, fd: int) -> Optional[int]:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode(errors="replace").strip()
        return int(text) if text.isdigit() else None

    def acquire(self) -> Optional[int]:
        """Take the lock; returns the pid of a holder that ended without releasing it (taken over), or None."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, default_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = self._read_pid(fd)
            os.close(fd)
            raise LockedError(self.directory, pid) from None
        except BaseException:
            os.close(fd)
            raise
        stale = self._read_pid(fd)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return stale if stale != os.getpid() else None

    def release(self) -> None:
        """Give the lock up (the file stays, emptied: no holder to report)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
