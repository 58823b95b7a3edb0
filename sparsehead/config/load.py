"""Loading configs: YAML files (with ``_base_`` inheritance) merged onto the schema, then overrides.

A config file may name a parent file with ``_base_: other.yaml`` (relative to the file); the parent
is loaded first and the child merged over it. Command-line overrides are ``dotted.key=value`` strings
parsed as YAML values (``solver.steps=[100,200]``). Unknown keys and badly typed values raise
:class:`ConfigError` naming the key.
"""

import logging
import os
from pathlib import Path
from typing import Any, Iterable, List, Optional, Union

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..utils.allocator import ALLOCATOR_MODES
from .schema import Config

__all__ = [
    "CONFIG_DIR", "ConfigError", "DEFAULT_CONFIG", "load_config", "packaged_configs", "parse_overrides",
    "resolve_config", "validate_config",
]

# The configs shipped with the package (in a source checkout, a link to the repository's configs/ folder).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"

_BASE_KEY = "_base_"
_HEAD_KINDS = ("plain", "fixed", "dynamic")
_HEAD_NORMS = ("none", "gn")
_ARCHS = ("fcos", "retinanet")
_EXECUTIONS = ("dense", "sparse", "auto")
_GATE_ACTIVATIONS = ("geretanh", "retanh", "sigmoid")
_DEPTHS = (18, 34, 50)
_NORMS = ("frozen_bn", "bn")
_DEVICES = ("auto", "cpu", "cuda")
_DATA_PATHS = tuple(f"data.{split}.{key}" for split in ("train", "val") for key in ("ann_file", "img_dir"))

logger = logging.getLogger("sparsehead")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the offending key."""


def _describe(err: OmegaConfBaseException, source: str, key_hint: str = "") -> str:
    key = getattr(err, "full_key", None) or key_hint
    msg = str(getattr(err, "msg", None) or err).splitlines()[0]
    if type(err).__name__ == "ConfigKeyError" or "not in" in msg:
        return f"{source}: unknown config key '{key}'"
    return f"{source}: invalid value for '{key}': {msg}"


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if path in seen:
        raise ConfigError(f"{path}: circular '{_BASE_KEY}' chain")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop(_BASE_KEY, None)
    if base is None:
        return data
    bases = [base] if isinstance(base, str) else list(base)
    merged: dict = {}
    for b in bases:
        parent = _read_yaml((path.parent / b).resolve(), seen + (path,))
        merged = _deep_merge(merged, parent)
    return _deep_merge(merged, data)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: Iterable[str]) -> List[str]:
    """Check that each override looks like ``key=value``; returns them as a list."""
    out = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' must be of the form dotted.key=value")
        out.append(item)
    return out


def _merge(base: DictConfig, other: Any, source: str, key_hint: str = "") -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e, source, key_hint)) from None


def _resolve(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if path else path


def packaged_configs() -> List[str]:
    """Names of the configs shipped with the package (``demo``, ``fcos_R50_1x``, ...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config(path: Union[str, os.PathLike]) -> Path:
    """The config file ``path`` names: an existing file, else a packaged config by name (``demo`` or
    ``demo.yaml``). Raises :class:`ConfigError` listing the packaged names when neither exists."""
    given = Path(path).expanduser()
    if given.is_file():
        return given
    if given.parent == Path(".") and str(path):
        packaged = CONFIG_DIR / (given.name if given.suffix in (".yaml", ".yml") else f"{given.name}.yaml")
        if packaged.is_file():
            return packaged
    raise ConfigError(f"config file not found: {path} (packaged configs: {', '.join(packaged_configs())})")


def load_config(
    path: Optional[Union[str, os.PathLike]] = None, overrides: Iterable[str] = ()
) -> DictConfig:
    """Load ``path`` (the demo config when None) onto the schema and apply ``key=value`` overrides.

    ``path`` is a YAML file or the name of a packaged config (see :func:`resolve_config`).

    Relative paths in the result are resolved against the current directory. The returned config is
    typed (assigning an unknown key or a wrong type raises) and already validated.
    """
    cfg = OmegaConf.structured(Config)
    path = resolve_config(path) if path is not None else DEFAULT_CONFIG
    cfg = _merge(cfg, _read_yaml(path.resolve()), str(path))
    overrides = parse_overrides(overrides)
    for item in overrides:
        key, _, value = item.partition("=")
        value = value or "''"  # ``key=`` sets an empty string, as in a shell
        try:
            parsed = OmegaConf.from_dotlist([f"{key}={value}"])
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{item}': {e}") from None
        cfg = _merge(cfg, parsed, f"override '{item}'", key)

    _apply_synthetic(cfg, explicit={item.partition("=")[0].strip() for item in overrides})
    for split in ("train", "val"):
        cfg.data[split].ann_file = _resolve(cfg.data[split].ann_file)
        cfg.data[split].img_dir = _resolve(cfg.data[split].img_dir)
    cfg.output_dir = _resolve(cfg.output_dir)
    weights = cfg.model.backbone.weights
    if weights and weights != "imagenet":
        cfg.model.backbone.weights = _resolve(weights)
    validate_config(cfg)
    return cfg


def _apply_synthetic(cfg: DictConfig, explicit: set) -> None:
    """Point the data paths into ``data.synthetic.root`` when the generated dataset is enabled.

    A data path that is set to anything else wins: the generated dataset is switched off (with a warning),
    unless ``data.synthetic.enabled`` was itself given on the command line, which is a conflict.
    """
    syn = cfg.data.synthetic
    if not syn.enabled:
        return
    root = Path(_resolve(syn.root))
    generated = {
        f"data.{split}.{key}": str(root / sub)
        for split in ("train", "val")
        for key, sub in (("ann_file", f"annotations/{split}.json"), ("img_dir", split))
    }
    given = [k for k in _DATA_PATHS if OmegaConf.select(cfg, k) and _resolve(OmegaConf.select(cfg, k)) != generated[k]]
    if given:
        if "data.synthetic.enabled" in explicit:
            raise ConfigError(
                f"data.synthetic.enabled=true and {', '.join(given)} are both given: the generated dataset "
                "uses its own files; drop one of them"
            )
        unset = [k for k in _DATA_PATHS if not OmegaConf.select(cfg, k)]
        if unset:
            raise ConfigError(
                f"{', '.join(unset)} must be set: {', '.join(given)} given, which switches the generated dataset "
                "(data.synthetic) off; set all four data paths, or none to use the generated dataset"
            )
        logger.warning(
            "%s set: the generated dataset (data.synthetic) is switched off and these files are used",
            ", ".join(given),
        )
        syn.enabled = False
        return
    syn.root = str(root)
    if cfg.model.num_classes is None:
        cfg.model.num_classes = syn.num_classes
    for key, path in generated.items():
        OmegaConf.update(cfg, key, path)


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"invalid value for '{key}': {msg}")


def validate_config(cfg: DictConfig) -> None:
    """Check value ranges and choices that the schema's types cannot express."""
    m, s = cfg.model, cfg.solver
    _check(m.arch in _ARCHS, "model.arch", f"{m.arch!r} not in {_ARCHS}")
    _check(
        len(m.anchor_sizes) == 5 and all(a > 0 for a in m.anchor_sizes),
        "model.anchor_sizes",
        f"needs 5 positive sizes (P3..P7), got {list(m.anchor_sizes)}",
    )
    _check(m.head.kind in _HEAD_KINDS, "model.head.kind", f"{m.head.kind!r} not in {_HEAD_KINDS}")
    _check(
        m.head.execution in _EXECUTIONS, "model.head.execution", f"{m.head.execution!r} not in {_EXECUTIONS}"
    )
    _check(
        m.head.train_execution in ("",) + _EXECUTIONS,
        "model.head.train_execution",
        f"{m.head.train_execution!r} not in {('',) + _EXECUTIONS}",
    )
    _check(m.head.norm in _HEAD_NORMS, "model.head.norm", f"{m.head.norm!r} not in {_HEAD_NORMS}")
    _check(
        m.head.gate_activation in _GATE_ACTIVATIONS,
        "model.head.gate_activation",
        f"{m.head.gate_activation!r} not in {_GATE_ACTIVATIONS}",
    )
    _check(m.backbone.depth in _DEPTHS, "model.backbone.depth", f"{m.backbone.depth} not in {_DEPTHS}")
    _check(m.backbone.norm in _NORMS, "model.backbone.norm", f"{m.backbone.norm!r} not in {_NORMS}")
    _check(0 <= m.backbone.trainable_layers <= 5, "model.backbone.trainable_layers", "must be in [0, 5]")
    _check(m.backbone.fpn_channels > 0, "model.backbone.fpn_channels", "must be positive")
    _check(
        m.backbone.fpn_channels % m.head.gn_groups == 0,
        "model.head.gn_groups",
        f"{m.head.gn_groups} does not divide model.backbone.fpn_channels={m.backbone.fpn_channels}",
    )
    if m.arch == "fcos" and m.head.kind == "plain":
        _check(
            m.backbone.fpn_channels % 32 == 0,
            "model.backbone.fpn_channels",
            f"torchvision's FCOS head uses GroupNorm(32) and needs a multiple of 32, got {m.backbone.fpn_channels}",
        )
    _check(m.head.num_routers > 0, "model.head.num_routers", "must be positive")
    _check(m.head.num_convs > 0, "model.head.num_convs", "must be positive")
    _check(0.0 < m.head.gate_init < 1.0, "model.head.gate_init", "must be in (0, 1)")
    _check(m.head.budget_weight >= 0, "model.head.budget_weight", "must be >= 0")
    _check(m.head.budget_warmup >= 0, "model.head.budget_warmup", "must be >= 0")
    _check(m.head.box_init >= 0, "model.head.box_init", "must be >= 0 (a negative bias starts the box ReLU dead)")
    _check(m.head.resample in ("pool", "bilinear"), "model.head.resample", "must be pool or bilinear")
    _check(m.num_classes is None or m.num_classes > 0, "model.num_classes", "must be positive (or null: inferred)")
    _check(
        m.head.auto_threshold is None or 0.0 <= m.head.auto_threshold <= 1.0,
        "model.head.auto_threshold",
        "must be in [0, 1] (or null: the crossover shipped for the device)",
    )
    _check(0 < m.min_size <= m.max_size, "model.min_size", "must be positive and <= model.max_size")
    _check(0.0 <= m.score_thresh < 1.0, "model.score_thresh", "must be in [0, 1)")
    _check(0.0 < m.nms_thresh <= 1.0, "model.nms_thresh", "must be in (0, 1]")
    _check(m.detections_per_img > 0, "model.detections_per_img", "must be positive")
    _check(m.topk_candidates > 0, "model.topk_candidates", "must be positive")
    _check(s.max_iter > 0, "solver.max_iter", "must be positive")
    _check(s.ims_per_batch > 0, "solver.ims_per_batch", "must be positive")
    _check(s.base_lr > 0, "solver.base_lr", "must be positive")
    _check(s.warmup_iters >= 0, "solver.warmup_iters", "must be >= 0")
    _check(0.0 < s.warmup_factor <= 1.0, "solver.warmup_factor", "must be in (0, 1]")
    _check(list(s.steps) == sorted(s.steps), "solver.steps", f"must be increasing, got {list(s.steps)}")
    _check(s.clip_grad_norm >= 0, "solver.clip_grad_norm", "must be >= 0 (0 disables clipping)")
    _check(s.checkpoint_period > 0, "solver.checkpoint_period", "must be positive")
    _check(s.eval_period >= 0, "solver.eval_period", "must be >= 0 (0: only at the end)")
    _check(s.log_period > 0, "solver.log_period", "must be positive")
    train_mode = m.head.train_execution or m.head.execution
    _check(
        not (s.compile and m.head.kind in ("fixed", "dynamic") and train_mode != "dense"),
        "solver.compile",
        f"true needs the head to train in the dense execution (model.head.train_execution=dense), got "
        f"{train_mode!r}: the sparse and auto modes read data-dependent sizes, each a graph break",
    )
    _check(cfg.test.ims_per_batch > 0, "test.ims_per_batch", "must be positive")
    _check(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(0.0 <= cfg.data.flip_prob <= 1.0, "data.flip_prob", "must be in [0, 1]")
    _check(cfg.device in _DEVICES, "device", f"{cfg.device!r} not in {_DEVICES}")
    _check(cfg.num_threads >= 0, "num_threads", "must be >= 0 (0 keeps torch's default)")
    _check(cfg.cpu_allocator in ALLOCATOR_MODES, "cpu_allocator", f"{cfg.cpu_allocator!r} not in {ALLOCATOR_MODES}")
    _check(bool(cfg.output_dir), "output_dir", "must not be empty")
    syn = cfg.data.synthetic
    if syn.enabled:
        _check(syn.num_train > 0 and syn.num_val > 0, "data.synthetic.num_train", "splits must be non-empty")
        _check(syn.image_size >= 32, "data.synthetic.image_size", "must be >= 32")
        _check(
            m.num_classes is None or syn.num_classes == m.num_classes,
            "model.num_classes",
            f"{m.num_classes} differs from data.synthetic.num_classes={syn.num_classes}",
        )
    for split in ("train", "val"):
        for k in ("ann_file", "img_dir"):
            _check(bool(cfg.data[split][k]), f"data.{split}.{k}", "must be set (or enable data.synthetic)")
