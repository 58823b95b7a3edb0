"""ResNet-FPN backbone for FCOS (P3-P7), with frozen stages and offline-only pretrained weights."""

import os
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

__all__ = ["build_resnet_fpn_backbone", "load_resnet_weights", "imagenet_weights_path"]

_RESNETS = {18: "resnet18", 34: "resnet34", 50: "resnet50"}
_WEIGHTS = {
    18: resnet.ResNet18_Weights.IMAGENET1K_V1,
    34: resnet.ResNet34_Weights.IMAGENET1K_V1,
    50: resnet.ResNet50_Weights.IMAGENET1K_V1,
}


def imagenet_weights_path(depth: int) -> Path:
    """Where torch hub caches torchvision's ImageNet weights for a ResNet of ``depth``."""
    url = _WEIGHTS[depth].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"cannot read backbone weights from {path}: {e}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_resnet_weights(model: resnet.ResNet, path: Path) -> None:
    """Load an ImageNet-style ResNet state dict; the classifier (``fc.*``) may be absent or present.

    Raises ``ValueError`` naming missing and unexpected keys, or keys whose shapes differ.
    """
    state = _read_state_dict(path)
    state = {
        k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = []
        found = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes))
        for name, keys in found:
            if keys:
                shown = ", ".join(keys[:10]) + (f" ... ({len(keys)} in all)" if len(keys) > 10 else "")
                parts.append(f"{name}: {shown}")
        raise ValueError(f"backbone weights {path} do not match the ResNet: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)


def _resolve_weights(depth: int, weights: str) -> Optional[Path]:
    if not weights:
        return None
    if weights == "imagenet":
        path = imagenet_weights_path(depth)
        if not path.is_file():
            raise FileNotFoundError(
                f"ImageNet weights for ResNet-{depth} are not in the torch hub cache ({path}); nothing is "
                "downloaded at run time: copy the file there, or set model.backbone.weights to a local .pth "
                "or to '' to start from random initialisation"
            )
        return path
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    return path


def build_resnet_fpn_backbone(
    depth: int = 50,
    weights: str = "",
    norm: str = "frozen_bn",
    trainable_layers: int = 3,
    fpn_channels: int = 256,
) -> BackboneWithFPN:
    """ResNet with an FPN over stages 3-5 plus P6/P7 (strides 8-128), as torchvision's FCOS builds it.

    Args:
        depth: 18, 34 or 50.
        weights: "" (random init), "imagenet" (torchvision's weights, read from the torch hub cache
            only) or the path of a ResNet state dict.
        norm: "frozen_bn" (FrozenBatchNorm2d, for pretrained weights) or "bn" (BatchNorm2d, meant for
            training from scratch with all stages trainable).
        trainable_layers: stages left trainable, counted from the last (0..5).
        fpn_channels: FPN output channels.
    """
    if depth not in _RESNETS:
        raise ValueError(f"unsupported ResNet depth {depth}; choose from {sorted(_RESNETS)}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
    norm_layer = {"frozen_bn": misc_nn_ops.FrozenBatchNorm2d, "bn": nn.BatchNorm2d}.get(norm)
    if norm_layer is None:
        raise ValueError(f"unsupported norm {norm!r}; choose 'frozen_bn' or 'bn'")
    path = _resolve_weights(depth, weights)
    body = getattr(resnet, _RESNETS[depth])(weights=None, norm_layer=norm_layer)
    if path is not None:
        load_resnet_weights(body, path)

    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for name, param in body.named_parameters():
        if not any(name.startswith(layer) for layer in layers_to_train):
            param.requires_grad_(False)
    returned_layers = [2, 3, 4]
    stage2 = body.inplanes // 8
    in_channels_list = [stage2 * 2 ** (i - 1) for i in returned_layers]
    return BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(v) for v, k in enumerate(returned_layers)},
        in_channels_list=in_channels_list,
        out_channels=fpn_channels,
        extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels),
    )
