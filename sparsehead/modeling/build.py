"""The one place where a config becomes modules: ``build_model(cfg)`` returns a torchvision FCOS."""

from typing import Any

from torch import nn
from torchvision.models.detection import FCOS

from .backbone import build_resnet_fpn_backbone

__all__ = ["build_backbone", "build_head", "build_model"]

# FCOS predicts one box per location.
NUM_ANCHORS = 1


def build_backbone(cfg: Any) -> nn.Module:
    """ResNet-FPN backbone from ``cfg.model.backbone``."""
    b = cfg.model.backbone
    return build_resnet_fpn_backbone(
        depth=b.depth,
        weights=b.weights,
        norm=b.norm,
        trainable_layers=b.trainable_layers,
        fpn_channels=b.fpn_channels,
    )


def build_head(cfg: Any, in_channels: int) -> nn.Module:
    """Detection head from ``cfg.model.head``: fcos -> plain head, fixed/dynamic -> routers."""
    from .heads import FCOSDynamicHead, FCOSPlainHead

    h, num_classes = cfg.model.head, cfg.model.num_classes
    if h.kind == "fcos":
        return FCOSPlainHead(in_channels, NUM_ANCHORS, num_classes, num_convs=h.num_convs)
    if h.kind in ("fixed", "dynamic"):
        return FCOSDynamicHead(
            in_channels,
            NUM_ANCHORS,
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
        )
    raise ValueError(f"unknown model.head.kind {h.kind!r}; choose fcos, fixed or dynamic")


def build_model(cfg: Any) -> FCOS:
    """torchvision ``FCOS`` with the configured backbone, head and post-processing."""
    m = cfg.model
    backbone = build_backbone(cfg)
    head = build_head(cfg, backbone.out_channels)
    return FCOS(
        backbone,
        num_classes=m.num_classes,
        min_size=m.min_size,
        max_size=m.max_size,
        center_sampling_radius=m.center_sampling_radius,
        score_thresh=m.score_thresh,
        nms_thresh=m.nms_thresh,
        detections_per_img=m.detections_per_img,
        topk_candidates=m.topk_candidates,
        head=head,
    )
