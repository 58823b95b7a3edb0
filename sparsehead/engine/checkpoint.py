"""Atomic file writes, training checkpoints (with RNG states) and model-weight loading."""

import json
import os
import random
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
from torch import nn

from ..utils.file_io import atomic_write

__all__ = [
    "atomic_save",
    "atomic_write_text",
    "atomic_write_json",
    "get_rng_state",
    "set_rng_state",
    "read_checkpoint",
    "load_model_weights",
    "fill_num_classes",
    "load_trained_model",
    "unwrap",
]

PathLike = Union[str, os.PathLike]


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``.

    A failure (or kill) during the write leaves any previous ``path`` untouched.
    """
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: PathLike) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(obj: Any, path: PathLike) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def get_rng_state() -> Dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generator states, in a form ``weights_only`` loads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Load a checkpoint written by the trainer (or a bare state dict) on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or ``model`` itself)."""
    return model.module if hasattr(model, "module") else model


def _fmt(keys, limit: int = 10) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_model_weights(
    model: nn.Module, source: Union[PathLike, Dict[str, Any]], name: Optional[str] = None
) -> None:
    """Load detector weights strictly; a mismatch raises ``ValueError`` naming the keys.

    ``source`` is a path or an already-loaded object: a trainer checkpoint (``{"model": ...}``) or a
    bare state dict. A ``module.`` prefix from DistributedDataParallel is removed, and keys that the
    model's ``load_state_dict`` pre-hooks rename (state dicts of earlier versions) are accepted.
    """
    name = name or str(source)
    obj = read_checkpoint(source) if not isinstance(source, dict) else source
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{name} does not hold model weights (a state dict of tensors or {{'model': ...}})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    shapes = {k for k in set(own) & set(state) if own[k].shape != state[k].shape}
    if missing or unexpected or shapes:
        try:
            # load_state_dict's pre-hooks rename the keys of earlier versions (see the heads' LEGACY_KEYS)
            model.load_state_dict(state)
            return
        except RuntimeError:
            pass
        parts = []
        if missing:
            parts.append(f"missing keys: {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt(unexpected)}")
        if shapes:
            parts.append(
                "shape mismatch: "
                + _fmt(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes)
            )
        raise ValueError(
            f"{name} does not match the configured model (another architecture or config?): "
            + "; ".join(parts)
        )
    model.load_state_dict(state)


def fill_num_classes(cfg: Any, checkpoint: Dict[str, Any], name: str) -> None:
    """Set ``cfg.model.num_classes`` from the config a trainer checkpoint records when it is unset (None)."""
    if cfg.model.num_classes is not None:
        return
    import yaml

    saved = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    try:
        num = (yaml.safe_load(saved) or {}).get("model", {}).get("num_classes") if isinstance(saved, str) else None
    except (yaml.YAMLError, AttributeError):
        num = None
    if not isinstance(num, int) or num <= 0:
        raise ValueError(f"model.num_classes is not set and {name} does not record it: pass model.num_classes=K")
    cfg.model.num_classes = num


def load_trained_model(cfg: Any, weights: PathLike) -> nn.Module:
    """The detector ``cfg`` describes with the weights of ``weights`` (a trainer checkpoint or a state dict),
    on the CPU; ``model.num_classes`` left unset is taken from the checkpoint's config."""
    from sparsehead.modeling.build import build_model

    checkpoint = read_checkpoint(weights)
    fill_num_classes(cfg, checkpoint, str(weights))
    model = build_model(cfg)
    load_model_weights(model, checkpoint, name=str(weights))
    return model
