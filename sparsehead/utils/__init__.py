"""Small helpers shared across the package."""
from .file_io import atomic_write, default_mode

__all__ = ["atomic_write", "default_mode"]
