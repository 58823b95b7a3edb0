"""The dynamic RetinaNet head is a drop-in head for torchvision's RetinaNet."""
import pytest
import torch
from torchvision.models import resnet18
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from sparsehead import collect_cost
from sparsehead.modeling.heads.retinanet import RetinaNetDynamicHead, RetinaNetPlainHead

ANCHORS = 9  # RetinaNet's default anchor generator: 3 sizes × 3 aspect ratios per location


def _retinanet(head):
    backbone = _resnet_fpn_extractor(resnet18(), 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return RetinaNet(backbone, num_classes=3, head=head, min_size=96, max_size=128)


def _batch():
    images = [torch.rand(3, 90, 120), torch.rand(3, 100, 80)]
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, targets


def test_training_losses_include_budget_and_backpropagate():
    torch.manual_seed(0)
    model = _retinanet(RetinaNetDynamicHead(256, ANCHORS, 3, num_routers=1, budget_weight=0.5))
    model.train()
    losses = model(*_batch())
    assert set(losses) == {"classification", "bbox_regression", "loss_budget"}
    assert all(torch.isfinite(v) for v in losses.values())
    # The gate biases start at 0.99 and the random gate convs spread the gates around it: the budget loss
    # is a little under 0.5 * 0.99 (0.46-0.50 over seeds) and can never exceed 0.5.
    assert 0.4 < losses["loss_budget"].item() <= 0.5
    sum(losses.values()).backward()
    for tower in (model.head.cls_tower, model.head.reg_tower):
        bias = tower.routers[0].depth.gate.conv.bias
        assert bias.grad is not None and bias.grad.abs().item() > 0
    assert model.head.classification_head.cls_logits.weight.grad.abs().sum() > 0


def test_fixed_head_has_no_budget_and_full_cost():
    model = _retinanet(RetinaNetDynamicHead(256, ANCHORS, 3, num_routers=1, gated=False, execution="dense"))
    model.train()
    assert "loss_budget" not in model(*_batch())
    cost = collect_cost(model.head)
    assert torch.allclose(cost.realized, cost.full)


def test_no_unused_parameters_and_cost_of_predictors():
    head = RetinaNetDynamicHead(32, ANCHORS, 3, num_routers=1, gn_groups=8, num_levels=2)
    names = [n for n, _ in head.named_parameters()]
    # torchvision's sub-heads keep only the prediction convs: their per-level conv stacks are gone
    sub = sorted(n for n in names if n.startswith(("classification_head", "regression_head")))
    assert sub == ["classification_head.cls_logits.bias", "classification_head.cls_logits.weight",
                   "regression_head.bbox_reg.bias", "regression_head.bbox_reg.weight"]
    feats = [torch.randn(1, 32, 8, 8), torch.randn(1, 32, 4, 4)]
    with torch.no_grad():
        out = head(feats)
    assert set(out) == {"cls_logits", "bbox_regression"}
    assert out["cls_logits"].shape == (1, 80 * ANCHORS, 3) and out["bbox_regression"].shape == (1, 80 * ANCHORS, 4)
    assert head.last_cost.full.item() == 80 * 32 * 9 * ANCHORS * (3 + 4)


def test_eval_returns_detections_and_modes_agree():
    torch.manual_seed(0)
    head = RetinaNetDynamicHead(256, ANCHORS, 3, num_routers=2)
    model = _retinanet(head).eval()
    # Switch part of the gates off so the sparse path has real work to skip.
    with torch.no_grad():
        for tower in (head.cls_tower, head.reg_tower):
            tower.routers[0].depth.gate.conv.weight.normal_(0, 0.05)
            tower.routers[0].depth.gate.conv.bias.fill_(-0.02)
    images, _ = _batch()
    feats = list(model.backbone(model.transform(images)[0].tensors).values())
    outs = {}
    for mode in ("dense", "sparse"):
        head.set_execution(mode)
        with torch.no_grad():
            outs[mode] = head(feats)
    for key in ("cls_logits", "bbox_regression"):
        assert torch.allclose(outs["dense"][key], outs["sparse"][key], atol=1e-4, rtol=1e-4)
    cost = collect_cost(head)
    assert torch.all(cost.realized < cost.full)
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "scores", "labels"}


@pytest.mark.parametrize("norm, groups", [("none", 0), ("gn", 8)])
def test_plain_head_norm(norm, groups):
    head = RetinaNetPlainHead(64, ANCHORS, 3, norm=norm, gn_groups=8)
    norms = [m for m in head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == (8 if groups else 0)  # 4 tower convs in each of the two branches
    assert all(m.num_groups == groups for m in norms)
    with pytest.raises(ValueError, match="norm"):
        RetinaNetPlainHead(64, ANCHORS, 3, norm="bn")
