"""Datasets, augmentation and the synthetic shapes dataset."""

from .coco import CocoDetection, DatasetError, collate_fn, load_annotations, load_image, read_image_size
from .synthetic import ensure_dataset, generate_dataset
from .transforms import build_transforms

__all__ = [
    "CocoDetection",
    "DatasetError",
    "build_transforms",
    "collate_fn",
    "ensure_dataset",
    "generate_dataset",
    "load_annotations",
    "load_image",
    "read_image_size",
]
