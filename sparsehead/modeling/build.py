"""The one place where a config becomes modules: ``build_model(cfg)`` returns a torchvision detector.

``model.arch`` picks torchvision's ``FCOS`` or ``RetinaNet``; ``model.head.kind`` picks the head that is
passed in as its ``head=``: ``plain`` (torchvision's own head, recording its cost), ``fixed`` (routers
without gates) or ``dynamic`` (gated routers).
"""

from typing import Any, Union

import torch
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator

from .backbone import build_resnet_fpn_backbone
from .valid_region import track_image_sizes

__all__ = ["auto_threshold", "build_anchor_generator", "build_backbone", "build_head", "build_model", "device_type"]

# FCOS predicts one box per location; RetinaNet three scales times three aspect ratios.
FCOS_ANCHORS = 1
RETINANET_SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
RETINANET_RATIOS = (0.5, 1.0, 2.0)


def build_backbone(cfg: Any) -> nn.Module:
    """ResNet-FPN backbone (P3–P7) from ``cfg.model.backbone``."""
    b = cfg.model.backbone
    return build_resnet_fpn_backbone(
        depth=b.depth,
        weights=b.weights,
        norm=b.norm,
        trainable_layers=b.trainable_layers,
        fpn_channels=b.fpn_channels,
    )


def build_anchor_generator(anchor_sizes: list[int]) -> AnchorGenerator:
    """RetinaNet's anchors: per level, three scales of its base size and three aspect ratios."""
    sizes = tuple(tuple(int(a * s) for s in RETINANET_SCALES) for a in anchor_sizes)
    return AnchorGenerator(sizes, (RETINANET_RATIOS,) * len(sizes))


def build_head(cfg: Any, in_channels: int, num_anchors: int = FCOS_ANCHORS) -> nn.Module:
    """Detection head for ``cfg.model.arch`` from ``cfg.model.head``."""
    from .heads import FCOSDynamicHead, FCOSPlainHead, RetinaNetDynamicHead, RetinaNetPlainHead

    m = cfg.model
    h, num_classes = m.head, m.num_classes
    retinanet = m.arch == "retinanet"
    if h.kind == "plain":
        if retinanet:
            return RetinaNetPlainHead(in_channels, num_anchors, num_classes, norm=h.norm, gn_groups=h.gn_groups)
        return FCOSPlainHead(in_channels, num_anchors, num_classes, num_convs=h.num_convs, box_init=h.box_init)
    if h.kind in ("fixed", "dynamic"):
        head_cls = RetinaNetDynamicHead if retinanet else FCOSDynamicHead
        arch_kwargs = {} if retinanet else {"box_init": h.box_init}  # RetinaNet's box deltas have no ReLU
        return head_cls(
            in_channels,
            num_anchors,
            num_classes,
            num_routers=h.num_routers,
            gated=h.kind == "dynamic",
            tau=h.tau,
            gate_activation=h.gate_activation,
            gate_init=h.gate_init,
            budget_weight=h.budget_weight,
            execution=h.execution,
            gn_groups=h.gn_groups,
            prior_prob=h.prior_prob,
            resample=h.resample,
            scale_bias=h.scale_bias,
            **arch_kwargs,
        )
    raise ValueError(f"unknown model.head.kind {h.kind!r}; choose plain, fixed or dynamic")


def device_type(name: str) -> str:
    """``cfg.device`` (``auto``, ``cpu`` or ``cuda``) as the device type the model will run on."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type


def auto_threshold(cfg: Any) -> float:
    """The active fraction up to which ``auto`` execution runs a gated path sparse: ``model.head.auto_threshold``
    when set, else the crossover shipped with the package for ``cfg.device``'s type."""
    if cfg.model.head.get("auto_threshold") is not None:
        return float(cfg.model.head.auto_threshold)
    from ..benchmark.crossover import load_crossover

    return load_crossover(device=device_type(cfg.device))


def build_model(cfg: Any) -> Union[FCOS, RetinaNet]:
    """torchvision ``FCOS`` or ``RetinaNet`` with the configured backbone, head and post-processing.

    The routers' ``auto_threshold`` is set from :func:`auto_threshold`.
    """
    m = cfg.model
    if m.num_classes is None:
        raise ValueError(
            "model.num_classes is not set: it is inferred from the training annotations when training; "
            "otherwise pass model.num_classes=K"
        )
    backbone = build_backbone(cfg)
    common = dict(
        num_classes=m.num_classes,
        min_size=m.min_size,
        max_size=m.max_size,
        score_thresh=m.score_thresh,
        nms_thresh=m.nms_thresh,
        detections_per_img=m.detections_per_img,
        topk_candidates=m.topk_candidates,
    )
    if m.arch == "retinanet":
        anchors = build_anchor_generator(list(m.anchor_sizes))
        head = build_head(cfg, backbone.out_channels, anchors.num_anchors_per_location()[0])
        model = RetinaNet(backbone, anchor_generator=anchors, head=head, **common)
    elif m.arch == "fcos":
        head = build_head(cfg, backbone.out_channels)
        model = FCOS(backbone, center_sampling_radius=m.center_sampling_radius, head=head, **common)
    else:
        raise ValueError(f"unknown model.arch {m.arch!r}; choose fcos or retinanet")
    if m.head.kind != "plain":
        from ..benchmark.crossover import apply_crossover

        apply_crossover(model.head, auto_threshold(cfg))
    track_image_sizes(model)  # the head runs (and counts) each image's own pixels of a padded batch
    return model
