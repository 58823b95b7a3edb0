"""Backbone construction: frozen stages, FPN levels and offline pretrained-weight loading."""

import pytest
import torch
from torchvision.models import resnet18
from torchvision.ops.misc import FrozenBatchNorm2d

from sparsehead.modeling import backbone as bb
from sparsehead.modeling.backbone import build_resnet_fpn_backbone


def test_levels_and_frozen_stages():
    net = build_resnet_fpn_backbone(depth=18, trainable_layers=2, fpn_channels=32)
    feats = net(torch.rand(1, 3, 128, 128))
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert all(f.shape[1] == 32 for f in feats.values())
    trainable = {n.split(".")[0] for n, p in net.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    assert isinstance(net.body.bn1, FrozenBatchNorm2d)


def test_local_weights_are_loaded(tmp_path):
    ref = resnet18(weights=None)
    with torch.no_grad():
        ref.layer2[0].conv1.weight.normal_()
        ref.bn1.running_mean.uniform_()
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    net = build_resnet_fpn_backbone(depth=18, weights=str(tmp_path / "r18.pth"), fpn_channels=32)
    assert torch.equal(net.body.layer2[0].conv1.weight, ref.layer2[0].conv1.weight)
    assert torch.equal(net.body.bn1.running_mean, ref.bn1.running_mean)
    # a {"state_dict": ...} wrapper with DDP prefixes works too
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, tmp_path / "w.pth")
    net = build_resnet_fpn_backbone(depth=18, weights=str(tmp_path / "w.pth"), fpn_channels=32)
    assert torch.equal(net.body.layer2[0].conv1.weight, ref.layer2[0].conv1.weight)


def test_mismatched_weights_name_keys(tmp_path):
    state = resnet18(weights=None).state_dict()
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    expected = "missing keys: layer1.0.conv1.weight; unexpected keys: extra.weight"
    with pytest.raises(ValueError, match=expected):
        build_resnet_fpn_backbone(depth=18, weights=str(tmp_path / "bad.pth"))
    state = resnet18(weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(8, 3, 7, 7)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="shape mismatch: conv1.weight"):
        build_resnet_fpn_backbone(depth=18, weights=str(tmp_path / "shape.pth"))


def test_missing_weights_are_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(bb.torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="not in the torch hub cache"):
        build_resnet_fpn_backbone(depth=18, weights="imagenet")
    with pytest.raises(FileNotFoundError, match="backbone weights file not found"):
        build_resnet_fpn_backbone(depth=18, weights=str(tmp_path / "none.pth"))


def test_imagenet_weights_from_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(bb.torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    path = bb.imagenet_weights_path(18)
    path.parent.mkdir(parents=True)
    ref = resnet18(weights=None)
    torch.save(ref.state_dict(), path)
    net = build_resnet_fpn_backbone(depth=18, weights="imagenet")
    assert torch.equal(net.body.conv1.weight, ref.conv1.weight)
