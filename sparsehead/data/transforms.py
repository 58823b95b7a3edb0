"""Training-time augmentation for detection samples.

Transforms take and return ``(image, target)`` with ``image`` (3, H, W) float and
``target["boxes"]`` (K, 4) xyxy pixels. Resizing is left to the detector's own
``GeneralizedRCNNTransform`` (``min_size`` / ``max_size``), so nothing here changes the image size.
Randomness comes from ``torch``'s generator, so it follows ``torch.manual_seed`` and the per-worker
seeds of ``DataLoader``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Target = dict[str, Any]


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: list[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms})"


class RandomHorizontalFlip:
    """Flip image (3, H, W) and boxes (K, 4) xyxy left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if self.p > 0 and torch.rand(()).item() < self.p:
            image = image.flip(-1)
            width = image.shape[-1]
            boxes = target["boxes"]
            target = dict(target)
            target["boxes"] = torch.stack(
                [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1
            )
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


def build_transforms(train: bool, flip_prob: float = 0.5) -> Callable | None:
    """Augmentation for training (horizontal flip with ``flip_prob``); ``None`` for evaluation."""
    if not train or flip_prob <= 0:
        return None
    return Compose([RandomHorizontalFlip(flip_prob)])
