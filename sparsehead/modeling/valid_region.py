"""Which pixels of a padded batch belong to each image: the detector's image sizes handed to its head.

torchvision's detectors batch images padded to a common size and call ``head(features)``. With
:func:`track_image_sizes` the head receives, for that call only, the valid size of each image at the first
feature level, ``valid_sizes=[(h, w), ...]`` with ``h = ceil(image_height / stride)`` (the pixels that
start inside the image); coarser levels halve it rounding up, like the levels themselves. The dynamic
heads run their gated paths on those pixels only (padding is not an object: see
:class:`~sparsehead.layers.sites.SiteRows`), and every head counts only them in its per-image cost.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from torch import nn

__all__ = ["track_image_sizes", "valid_sizes"]


def valid_sizes(
    image_sizes: Sequence[Sequence[int]], padded: Sequence[int], level: Sequence[int]
) -> Optional[list[tuple[int, int]]]:
    """Each image's valid (h, w) at a level of spatial size ``level`` computed from a batch padded to
    ``padded``; None when no image is padded."""
    strides = [round(p / s) for p, s in zip(padded, level)]
    sizes = [tuple(min(math.ceil(i / st), s) for i, st, s in zip(size, strides, level)) for size in image_sizes]
    return None if all(list(s) == list(level) for s in sizes) else sizes


def track_image_sizes(model: nn.Module) -> list:
    """Hooks on ``model.transform`` and ``model.head`` of a torchvision detector: every detector forward hands
    its head ``valid_sizes`` (unless the caller passed them). The sizes are consumed by that head call, so a
    head called on its own afterwards sees none. Returns the hook handles."""
    pending: list = []

    def after_transform(module, args, output):
        images = output[0]
        pending[:] = [([tuple(s) for s in images.image_sizes], tuple(images.tensors.shape[-2:]))]

    def before_head(module, args, kwargs):
        if not pending:
            return None
        sizes, padded = pending.pop()
        if "valid_sizes" not in kwargs:
            kwargs = {**kwargs, "valid_sizes": valid_sizes(sizes, padded, args[0][0].shape[-2:])}
        return args, kwargs

    return [
        model.transform.register_forward_hook(after_transform),
        model.head.register_forward_pre_hook(before_head, with_kwargs=True),
    ]
