"""Small helpers shared across the package."""
from .file_io import DirectoryLock, LockedError, atomic_write, default_mode, remove_stale_temporaries

__all__ = ["DirectoryLock", "LockedError", "atomic_write", "default_mode", "remove_stale_temporaries"]
