"""The benchmark's workloads: a gated model, its static baselines and their inputs, built once per case.

A :class:`Case` holds the gated model (timed in the execution modes ``dense``, ``sparse`` and ``auto``),
its static baselines (``fixed``: the same routers with ``gated=False`` holding the same weights; ``plain``:
torchvision's own head, for the head and detector workloads) and the inputs every one of them is called
with. Gate patterns are imposed through :class:`MaskBank`, whose masks stay the same tensors from one
point to the next, so that a compiled graph reads them as inputs instead of compiling again.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence

import torch
from torch import nn

from ..layers.sparse import channels_last, dilate
from ..modeling.cost import collect_cost
from ..modeling.router import Router
from ..modeling.tower import DynamicTower, set_execution
from .compiling import compile_detector, compile_module
from .conv import ConvPair
from .patterns import blob_mask, fixed_gates
from .settings import MODES, PAPER_CONFIGS, Settings

__all__ = [
    "Case", "MaskBank", "build_cases", "pyramid_sizes", "random_pyramid", "load_detector", "checkpoint_images",
    "level_fractions", "levels_pattern", "router_gate_stats", "keep_gates", "copy_matching_weights",
    "checkpoint_level_fractions",
]

Pattern = Callable[[torch.Size], torch.Tensor]
GATE_KINDS = ("down", "up", "depth")  # the gate maps a router keeps (its ``last_gates`` also holds "sites")


# ----------------------------------------------------------------------------------------------------
# Inputs and small helpers


def pyramid_sizes(image: Sequence[int], levels: int = 5, stride: int = 8) -> list[tuple[int, int]]:
    """Spatial sizes of P3..P7 for an (H, W) image: ceil(H / 8) × ceil(W / 8), then halved rounding up."""
    h, w = (math.ceil(s / stride) for s in image)
    sizes = [(h, w)]
    for _ in range(levels - 1):
        h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return sizes


def random_pyramid(batch: int, channels: int, image: Sequence[int], device: torch.device, seed: int) -> list:
    """Random features [(N, C, h_l, w_l)] for P3..P7 of ``image``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=gen).to(device) for h, w in pyramid_sizes(image)]


def _routers(model: nn.Module) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


def _gn_groups(channels: int) -> int:
    return math.gcd(32, channels)


@contextlib.contextmanager
def keep_gates(model: nn.Module) -> Iterator[None]:
    """Within the block, every router of ``model`` keeps the gates of its forwards in ``last_gates``."""
    routers = _routers(model)
    for r in routers:
        r.keep_gates = True
    try:
        yield
    finally:
        for r in routers:
            r.keep_gates = False


def router_gate_stats(model: nn.Module) -> tuple[Optional[float], Optional[float]]:
    """(density, active) from the gates the routers kept in their last forward.

    density: pixel-weighted active fraction over all gated paths; active: the same for the depth
    path's first conv (the dilated gate, the fraction ``auto`` compares for the costliest path).
    """
    on = tot = d_on = d_tot = 0.0
    for r in _routers(model):
        for kind, maps in ((k, r.last_gates[k]) for k in GATE_KINDS):
            for g in maps.values():
                m = (g > 0).any(dim=1, keepdim=True)
                on += float(m.sum())
                tot += m.numel()
                if kind == "depth":
                    d_on += float(dilate(m).sum())
                    d_tot += m.numel()
    if not tot:
        return None, None
    return on / tot, (d_on / d_tot if d_tot else None)


def level_fractions(model: nn.Module, num_levels: int = 5) -> list[float]:
    """Per pyramid level, the pixel-weighted active fraction of all gates the routers of ``model`` kept in
    their last forward at that level (scale gates at their source level, depth gates at their level)."""
    on = [0.0] * num_levels
    tot = [0.0] * num_levels
    for r in _routers(model):
        for maps in (r.last_gates[k] for k in GATE_KINDS):
            for level, g in maps.items():
                m = (g > 0).any(dim=1)
                on[level] += float(m.sum())
                tot[level] += m.numel()
    if not all(tot):
        raise ValueError("the model kept no gates at some level: run a forward with keep_gates first")
    return [a / b for a, b in zip(on, tot)]


def levels_pattern(fractions: Sequence[float], sizes: Sequence[Sequence[int]], seed: int = 0) -> Pattern:
    """Blob gates whose active fraction at each pyramid level is ``fractions[level]``; a gate's level is
    found from its spatial size in ``sizes`` (the levels' (h, w), finest first). Levels of the same size
    (the coarsest ones of a tiny input) share the mean of their fractions."""
    by_size: dict[tuple, list[float]] = {}
    for f, size in zip(fractions, sizes):
        by_size.setdefault(tuple(size), []).append(f)

    def pattern(shape: torch.Size) -> torch.Tensor:
        found = by_size.get(tuple(shape[2:]))
        if found is None:
            raise ValueError(f"a gate of spatial size {tuple(shape[2:])} is at none of the levels {list(sizes)}")
        return blob_mask(shape, sum(found) / len(found), seed)

    return pattern


def _cost_macs(model: nn.Module) -> tuple[float, float]:
    c = collect_cost(model)
    return float(c.realized.sum()), float(c.full.sum())


def copy_matching_weights(dst: nn.Module, src: nn.Module) -> int:
    """Copy into ``dst`` every parameter and buffer of ``src`` with the same name and shape; returns how many."""
    mine = dst.state_dict()
    same = {k: v for k, v in src.state_dict().items() if k in mine and mine[k].shape == v.shape}
    dst.load_state_dict(same, strict=False)
    return len(same)


class MaskBank:
    """A gate pattern for :func:`~sparsehead.benchmark.patterns.fixed_gates` whose mask for each gate
    shape stays one tensor: :meth:`set` rewrites the masks in place for the next point, so compiled graphs
    that read them need not compile again."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.device = device
        self.dtype = dtype
        self.pattern: Optional[Pattern] = None
        self.masks: dict[torch.Size, torch.Tensor] = {}

    def set(self, pattern: Pattern) -> None:
        self.pattern = pattern
        for shape, mask in self.masks.items():
            mask.copy_(pattern(shape))

    def __call__(self, shape: torch.Size) -> torch.Tensor:
        mask = self.masks.get(shape)
        if mask is None:
            assert self.pattern is not None, "set a pattern first"
            mask = self.masks[shape] = self.pattern(shape).to(self.device, self.dtype)
        return mask


# ----------------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    """One gated model and its baselines, called as ``module(inputs)``.

    ``baselines`` maps ``fixed``/``plain`` to modules; ``set_pattern`` imposes a gate pattern (a no-op
    when the model's own gates are measured, ``imposed=False``); ``context()`` holds what the case needs
    for its whole life (the gate hooks); ``levels``: the spatial sizes of its pyramid levels.
    """

    workload: str
    routers: int
    batch: int
    channels: int
    image: tuple[int, int]
    model: nn.Module
    inputs: Any
    set_mode: Callable[[str], None]  # the gated model's execution mode
    set_pattern: Callable[[Pattern], None]
    macs: Callable[[], tuple[float, float]]  # (realised, full) MACs of the last forward, whole batch
    stats: Callable[[], tuple[Optional[float], Optional[float]]]  # (gate density, auto fraction)
    levels: list[tuple[int, ...]]
    baselines: dict[str, nn.Module] = field(default_factory=dict)
    context: Callable[[], ContextManager[Any]] = contextlib.nullcontext
    imposed: bool = True
    arch: Optional[str] = None
    detector: bool = False  # head timed separately; backbone and head compiled, the rest eager
    explain_inputs: Any = None  # the head's input features (detector)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def executions(self) -> list[str]:
        return list(MODES) + list(self.baselines)

    def module(self, execution: str) -> nn.Module:
        return self.model if execution in MODES else self.baselines[execution]

    def prepare(self, execution: str) -> None:
        """Set the gated model's mode for ``execution`` (baselines have none)."""
        if execution in MODES:
            self.set_mode(execution)

    def compiled(self, execution: str, backend: str) -> nn.Module:
        """The module of ``execution`` under ``torch.compile`` (a detector: its backbone and head)."""
        m = self.module(execution)
        return compile_detector(m, backend) if self.detector else compile_module(m, backend)

    def head(self, module: nn.Module) -> Optional[nn.Module]:
        """The submodule whose time is reported apart (a detector's head), or None."""
        return module.head if self.detector else None

    def explain_target(self, execution: str) -> tuple[nn.Module, Any]:
        """What ``torch._dynamo.explain`` traces for ``execution``: the compiled part of it (a detector:
        its head, on the features) and its input."""
        m = self.module(execution)
        return (m.head, self.explain_inputs) if self.detector else (m, self.inputs)


def _router_case(
    workload: str, model: nn.Module, inputs: Any, routers: int, batch: int, channels: int, image: tuple[int, int],
    levels: list, baselines: dict[str, nn.Module], device: torch.device, imposed: bool = True,
    cost_module: Optional[nn.Module] = None, extra_macs: float = 0.0, extra: Optional[dict] = None, **kw: Any,
) -> Case:
    bank = MaskBank(device)

    def macs() -> tuple[float, float]:
        r, f = _cost_macs(cost_module if cost_module is not None else model)
        return r + extra_macs, f + extra_macs

    for b in baselines.values():
        set_execution(b, "dense")  # a fixed tower computes every path: densely
    extra = dict(extra or {})
    if extra_macs:
        extra["backbone_macs"] = extra_macs
    return Case(
        workload, routers, batch, channels, image, model, inputs,
        set_mode=lambda mode: set_execution(model, mode),
        set_pattern=bank.set if imposed else (lambda p: None),
        macs=macs, stats=lambda: router_gate_stats(model), levels=levels, baselines=baselines,
        context=(lambda: fixed_gates(model, bank, cache=False)) if imposed else contextlib.nullcontext,
        imposed=imposed, extra=extra, **kw,
    )


def _conv_case(feat: torch.Tensor, channels: int, image: tuple[int, int], fixed_mask=None,
               extra: Optional[dict] = None) -> Case:
    """``feat`` (N, C, H, W) P3 features; ``fixed_mask`` (N, 1, H, W) bool for the model's own gates."""
    conv = ConvPair(channels).to(feat.device).eval()
    x = channels_last(feat)
    conv.mask = fixed_mask

    def set_pattern(pattern: Pattern) -> None:
        if fixed_mask is None:
            conv.mask = pattern(torch.Size((x.shape[0], 1, *x.shape[2:]))).to(x.device) > 0

    def stats() -> tuple[Optional[float], Optional[float]]:
        f = float(conv.mask.float().mean())
        return f, f

    def set_mode(mode: str) -> None:
        conv.execution = mode

    return Case("conv", 0, x.shape[0], channels, image, conv, x, set_mode, set_pattern, macs=conv.macs,
                stats=stats, levels=[tuple(x.shape[2:])], imposed=fixed_mask is None, extra=dict(extra or {}))


def _twin(fixed: nn.Module, gated: nn.Module) -> nn.Module:
    """``fixed`` (built like ``gated`` with ``gated=False``) holding ``gated``'s weights, on its device."""
    copy_matching_weights(fixed, gated)
    return fixed.to(next(gated.parameters()).device).eval()


def _backbone_macs(model: nn.Module, images: list[torch.Tensor]) -> float:
    """MACs of the detector's transform + backbone + FPN on ``images`` (counted once, dense)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.backbone(model.transform(images)[0].tensors)
    return counter.get_total_flops() / 2.0


def _features(model: nn.Module, images: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model.backbone(model.transform(images)[0].tensors).values())


def load_detector(
    cfg_path: str | Path, overrides: Sequence[str], weights: Optional[str] = None
) -> tuple[nn.Module, Any]:
    """Build a detector from a config (random backbone unless the config names weights) and load
    ``weights`` (a checkpoint of the same architecture); returns (model in eval mode, config)."""
    from ..config import load_config
    from ..modeling.build import build_model

    if not Path(cfg_path).is_file():
        raise FileNotFoundError(f"detector config not found: {cfg_path}")
    cfg = load_config(cfg_path, list(overrides))
    model = build_model(cfg)
    if weights:
        from ..engine.checkpoint import load_model_weights

        load_model_weights(model, weights)
    return model.eval(), cfg


def _detector_baselines(cfg_path: str | Path, overrides: Sequence[str], model: nn.Module,
                        device: torch.device) -> dict[str, nn.Module]:
    """The same detector with the ``fixed`` and with the ``plain`` head, holding ``model``'s weights where
    names and shapes match (backbone and FPN always; the fixed head's routers and predictors too)."""
    out = {}
    for kind in ("fixed", "plain"):
        m, _ = load_detector(cfg_path, [*overrides, "model.backbone.weights=''", f"model.head.kind={kind}"])
        copy_matching_weights(m, model)
        out[kind] = m.to(device).eval()
    return out


def generated_images(batch: int, image: tuple[int, int], num_classes: int, seed: int) -> list[torch.Tensor]:
    """``batch`` generated shape images, each (3, H, W) float in [0, 1]."""
    import numpy as np

    from ..data.synthetic import CLASSES, render_sample

    out = []
    for i in range(batch):
        rng = np.random.default_rng(seed + i)
        img, _ = render_sample(rng, image[1], image[0], min(num_classes, len(CLASSES)))
        out.append(torch.from_numpy(img).permute(2, 0, 1).float() / 255.0)
    return out


def checkpoint_images(cfg: Any, batch: int, seed: int) -> tuple[list[torch.Tensor], str]:
    """The first ``batch`` images of the config's val split, and ``"val"``; when that split's annotation
    file does not exist, ``batch`` generated shape images of ``model.min_size`` px and ``"generated"``."""
    ann, img_dir = cfg.data.val.ann_file, cfg.data.val.img_dir
    if ann and Path(ann).is_file():
        from ..data import CocoDetection

        ds = CocoDetection(ann, img_dir, transforms=None, train=False)
        return [ds[i % len(ds)][0] for i in range(batch)], "val"
    size = (cfg.model.min_size, cfg.model.min_size)
    return generated_images(batch, size, cfg.model.num_classes, seed), "generated"


def _dynamic_overrides(s: Settings, routers: int, image: Sequence[int]) -> list[str]:
    return ["model.backbone.weights=''", f"model.head.num_routers={routers}", "model.head.kind=dynamic",
            f"model.min_size={min(image)}", f"model.max_size={max(image)}", *s.overrides]


def _synthetic_model(workload: str, channels: int, routers: int, num_classes: int, gated: bool) -> nn.Module:
    """The router, tower or FCOS head of the synthetic workloads (``gated=False``: its Fixed twin)."""
    gn = _gn_groups(channels)
    if workload == "router":
        return Router(channels, gated=gated, gn_groups=gn, name="bench")
    if workload == "tower":
        return DynamicTower(channels, routers, gated=gated, gn_groups=gn)
    from ..modeling.heads import FCOSDynamicHead

    return FCOSDynamicHead(channels, 1, num_classes, num_routers=routers, gated=gated, gn_groups=gn)


def build_cases(s: Settings, workload: str, pattern: str, device: torch.device) -> Iterator[Case]:
    """The cases of one workload under one pattern family (``model``: the checkpoint's own gates)."""
    if pattern == "model":
        yield from _checkpoint_cases(s, workload, device)
        return
    c, img = s.channels, tuple(s.image)
    for arch in (s.archs if workload == "detector" else [None]):
        for d in s.routers:
            for n in s.batches:
                seed = s.seed + 1000 * d + n
                torch.manual_seed(seed)
                if workload in ("conv", "router") and d != s.routers[0]:
                    continue
                if workload == "detector":
                    yield _paper_detector_case(s, arch, d, n, img, device, seed)
                    continue
                x = random_pyramid(n, c, img, device, seed)
                levels = pyramid_sizes(img)
                if workload == "conv":
                    yield _conv_case(x[0], c, img)
                    continue
                model = _synthetic_model(workload, c, d, s.num_classes, gated=True).to(device).eval()
                baselines = {"fixed": _twin(_synthetic_model(workload, c, d, s.num_classes, gated=False), model)}
                if workload == "head" and c % 32 == 0:  # torchvision's FCOS head has GroupNorm(32)
                    from ..modeling.heads import FCOSPlainHead

                    baselines["plain"] = FCOSPlainHead(c, 1, s.num_classes).to(device).eval()
                routers = 1 if workload == "router" else d
                yield _router_case(workload, model, x, routers, n, c, img, levels, baselines, device)


def _paper_detector_case(s: Settings, arch: str, routers: int, batch: int, image: tuple[int, int],
                         device: torch.device, seed: int) -> Case:
    """The paper-scale detector of ``arch`` (R50-FPN, random weights) at ``image``, gates imposed."""
    cfg_path = PAPER_CONFIGS[arch]
    over = _dynamic_overrides(s, routers, image)
    model, _ = load_detector(cfg_path, over)
    model.to(device)
    ims = [torch.rand(3, *image, generator=torch.Generator().manual_seed(seed + i)).to(device) for i in range(batch)]
    feats = _features(model, ims)
    return _router_case(
        "detector", model, ims, routers, batch, model.backbone.out_channels, image,
        [tuple(f.shape[2:]) for f in feats], _detector_baselines(cfg_path, over, model, device), device,
        cost_module=model.head, extra_macs=_backbone_macs(model, ims), arch=arch, detector=True,
        explain_inputs=feats,
    )


def _checkpoint_cases(s: Settings, workload: str, device: torch.device) -> Iterator[Case]:
    """Cases whose gates are the trained checkpoint's own, on its val images."""
    model, cfg = load_detector(s.config, list(s.overrides), s.weights)
    model.to(device)
    head = model.head
    if not hasattr(head, "cls_tower"):
        raise ValueError("the 'model' pattern needs a dynamic or fixed head (model.head.kind)")
    c = model.backbone.out_channels
    d = len(head.cls_tower.routers)
    base = _detector_baselines(s.config, list(s.overrides), model, device)  # built from the same config
    fixed_head = base["fixed"].head
    for n in s.batches:
        ims, source = checkpoint_images(cfg, n, s.seed + 100 * n)
        ims = [im.to(device) for im in ims]
        feats = _features(model, ims)
        size = tuple(int(v) for v in model.transform(ims)[0].tensors.shape[-2:])
        levels = [tuple(f.shape[2:]) for f in feats]
        common = dict(imposed=False, arch=cfg.model.arch, extra={"images": source})
        if workload == "detector":
            yield _router_case("detector", model, ims, d, n, c, size, levels, base, device, cost_module=head,
                               extra_macs=_backbone_macs(model, ims), detector=True, explain_inputs=feats, **common)
        elif workload == "head":
            yield _router_case("head", head, feats, d, n, c, size, levels, {k: m.head for k, m in base.items()},
                               device, **common)
        elif workload == "tower":
            yield _router_case("tower", head.cls_tower, feats, d, n, c, size, levels,
                               {"fixed": fixed_head.cls_tower}, device, **common)
        elif workload == "router":
            yield _router_case("router", head.cls_tower.routers[0], feats, 1, n, c, size, levels,
                               {"fixed": fixed_head.cls_tower.routers[0]}, device, **common)
        elif workload == "conv":
            r = head.cls_tower.routers[0]
            with torch.no_grad(), keep_gates(r):
                set_execution(r, "dense")
                r(feats)
                mask = (r.last_gates["depth"][0] > 0).any(dim=1, keepdim=True)
            yield _conv_case(feats[0], c, size, fixed_mask=mask, extra=common["extra"])


def checkpoint_level_fractions(s: Settings, device: torch.device, images: int = 8) -> tuple[list[float], str]:
    """Per-level active fractions of the checkpoint's gates (:func:`level_fractions`, dense execution),
    averaged over ``images`` of its val images (one forward each), and where the images came from
    (``val`` or ``generated``, see :func:`checkpoint_images`)."""
    model, cfg = load_detector(s.config, list(s.overrides), s.weights)
    model.to(device)
    ims, source = checkpoint_images(cfg, images, s.seed)
    on = [0.0] * 5
    with torch.no_grad(), keep_gates(model):
        set_execution(model.head, "dense")
        for im in ims:
            model([im.to(device)])
            on = [a + b for a, b in zip(on, level_fractions(model.head))]
    return [v / len(ims) for v in on], source
