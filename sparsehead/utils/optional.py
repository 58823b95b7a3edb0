"""spconv as an optional dependency: one import point, one clear message when it is missing or unusable.

spconv is published as one distribution per CUDA version (``spconv-cu118``, ``spconv-cu120``, ...), all
installing the same ``spconv`` package; the CUDA builds also run on machines without a GPU. They are
offered as sparsehead's extras (``pip install "sparsehead[cu120]"``). sparsehead needs spconv only for the
CUDA submanifold path and for voxel inputs (``SparseConvTensor``); code paths that need it call
:func:`import_spconv`, which raises one ``ImportError`` naming the extras.

The CPU-only ``spconv`` distribution (no ``-cuXXX`` suffix) is refused: with more than one thread its
submanifold convolutions return wrong results in most runs, and its backward pass on CPU fails asking for
a CUDA stream, so no thread setting makes it usable for training.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

__all__ = ["EXTRAS", "SpconvUnavailable", "has_spconv", "import_spconv", "spconv_distribution"]

# extra -> (distribution, what it is for)
EXTRAS = {
    "cu118": ("spconv-cu118", "CUDA 11.8"),
    "cu120": ("spconv-cu120", "CUDA 12.0, Python <= 3.11"),
    "cu121": ("spconv-cu121", "CUDA 12.1"),
    "cu124": ("spconv-cu124", "CUDA 12.4"),
    "cu126": ("spconv-cu126", "CUDA 12.6 and newer drivers"),
}
_CPU_ONLY = "spconv"
_loaded: list = []  # the module, once imported and checked


class SpconvUnavailable(ImportError):
    """spconv is not installed, or the installed one is the refused CPU-only build."""


def _install_hint() -> str:
    extras = ", ".join(f"[{k}] ({v[1]})" for k, v in EXTRAS.items())
    return (
        f'install one of spconv\'s CUDA builds (they also run without a GPU): pip install "sparsehead[cu120]", '
        f"or the extra for your CUDA: {extras}; a spconv-cuXXX already installed by another package works as well"
    )


def spconv_distribution() -> Optional[str]:
    """Name of the installed distribution that provides the ``spconv`` package Python would import, or None."""
    try:
        spec = importlib.util.find_spec("spconv")
    except ImportError:  # an import hook that hides it
        return None
    if spec is None or spec.origin is None:
        return None
    origin = Path(spec.origin).resolve()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        if not re.fullmatch(r"spconv([-_]cu\d+)?", name, flags=re.I):
            continue
        try:
            if Path(dist.locate_file("spconv/__init__.py")).resolve() == origin:
                return name.lower().replace("_", "-")
        except (OSError, TypeError, ValueError):
            continue
    return "unknown"  # importable, but installed without metadata (e.g. from source)


def import_spconv() -> ModuleType:
    """The ``spconv.pytorch`` module; raises :class:`SpconvUnavailable` with what to install.

    spconv's deprecation warnings at import (spconv 2.3 under recent torch) are silenced. The check runs
    once: later calls return the module at once.
    """
    if _loaded:
        return _loaded[0]
    dist = spconv_distribution()
    if dist is None:
        raise SpconvUnavailable(f"this needs spconv, which is not installed: {_install_hint()}")
    if dist == _CPU_ONLY:
        raise SpconvUnavailable(
            "the installed 'spconv' is spconv's CPU-only build, which sparsehead refuses: with more than one "
            "thread it computes wrong sparse convolutions and its backward pass fails on CPU. "
            f"pip uninstall spconv, then {_install_hint()}"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import spconv.pytorch as spconv_pytorch
        except ImportError as e:
            raise SpconvUnavailable(
                f"spconv ({dist}) is installed but cannot be imported ({e}); {_install_hint()}"
            ) from e
    _loaded.append(spconv_pytorch)
    return spconv_pytorch


def has_spconv() -> bool:
    """Whether :func:`import_spconv` succeeds (imports spconv when it is there)."""
    try:
        import_spconv()
    except SpconvUnavailable:
        return False
    return True
