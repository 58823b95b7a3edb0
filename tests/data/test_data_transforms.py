"""Tests for the training augmentation."""

import pytest
import torch

from sparsehead.data import build_transforms
from sparsehead.data.transforms import RandomHorizontalFlip


def _sample():
    image = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(3, 2, 5)
    target = {"boxes": torch.tensor([[0.0, 0.0, 2.0, 1.0], [1.5, 0.5, 5.0, 2.0]]),
              "labels": torch.tensor([0, 1]), "image_id": 3}
    return image, target


def test_build_transforms():
    assert build_transforms(False) is None
    assert build_transforms(True, flip_prob=0.0) is None
    assert build_transforms(True) is not None


def test_flip_image_and_boxes():
    image, target = _sample()
    out_image, out = RandomHorizontalFlip(1.0)(image, target)
    assert torch.equal(out_image, image.flip(-1))
    assert out["boxes"].tolist() == [[3.0, 0.0, 5.0, 1.0], [0.0, 0.5, 3.5, 2.0]]
    assert torch.equal(out["labels"], target["labels"]) and out["image_id"] == 3
    assert target["boxes"][0, 0] == 0.0  # input target untouched
    back_image, back = RandomHorizontalFlip(1.0)(out_image, out)
    assert torch.equal(back_image, image) and torch.equal(back["boxes"], target["boxes"])


def test_flip_empty_boxes():
    image, target = _sample()
    target["boxes"] = torch.zeros((0, 4))
    _, out = RandomHorizontalFlip(1.0)(image, target)
    assert out["boxes"].shape == (0, 4)


def test_flip_probability_and_seed():
    t = build_transforms(True, flip_prob=0.3)
    image, target = _sample()
    torch.manual_seed(0)
    flips = [not torch.equal(t(image, target)[0], image) for _ in range(2000)]
    assert 0.25 < sum(flips) / len(flips) < 0.35
    torch.manual_seed(0)
    again = [not torch.equal(t(image, target)[0], image) for _ in range(2000)]
    assert flips == again
    with pytest.raises(ValueError):
        RandomHorizontalFlip(1.5)
