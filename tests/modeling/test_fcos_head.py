"""The dynamic FCOS head is a drop-in head for torchvision's FCOS."""
import pytest
import torch
from torchvision.models import resnet18
from torchvision.models.detection import FCOS
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from sparsehead import collect_cost
from sparsehead.modeling.heads import FCOSDynamicHead, FCOSPlainHead


def _fcos(head):
    backbone = _resnet_fpn_extractor(resnet18(), 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return FCOS(backbone, num_classes=3, head=head, min_size=96, max_size=128)


def _batch():
    images = [torch.rand(3, 90, 120), torch.rand(3, 100, 80)]
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, targets


def _to(batch, device: torch.device):
    images, targets = batch
    return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def test_training_losses_include_budget_and_backpropagate(device):
    torch.manual_seed(0)
    model = _fcos(FCOSDynamicHead(256, 1, 3, num_routers=1, budget_weight=0.5, gn_groups=32)).to(device)
    model.train()
    losses = model(*_to(_batch(), device))
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness", "loss_budget"}
    # All gates start at 0.99: the budget loss is about 0.5 * 0.99.
    assert losses["loss_budget"].item() == pytest.approx(0.5 * 0.99, abs=0.01)
    sum(losses.values()).backward()
    gate_bias = model.head.cls_tower.routers[0].depth.gate.conv.bias
    assert gate_bias.grad is not None and gate_bias.grad.abs().item() > 0


def test_fixed_head_has_no_budget_and_full_cost():
    model = _fcos(FCOSDynamicHead(256, 1, 3, num_routers=1, gated=False, execution="dense"))
    model.train()
    assert "loss_budget" not in model(*_batch())
    cost = collect_cost(model.head)
    assert torch.allclose(cost.realized, cost.full)


def test_eval_returns_detections_and_modes_agree(device):
    torch.manual_seed(0)
    head = FCOSDynamicHead(256, 1, 3, num_routers=2)
    model = _fcos(head).eval().to(device)
    # Switch part of the gates off so the sparse path has real work to skip.
    with torch.no_grad():
        for tower in (head.cls_tower, head.reg_tower):
            tower.routers[0].depth.gate.conv.weight.normal_(0, 0.05)
            tower.routers[0].depth.gate.conv.bias.fill_(-0.02)
    images, _ = _to(_batch(), device)
    feats = list(model.backbone(model.transform(images)[0].tensors).values())
    outs = {}
    for mode in ("dense", "sparse"):
        head.set_execution(mode)
        with torch.no_grad():
            outs[mode] = head(feats)
    for key in ("cls_logits", "bbox_regression", "bbox_ctrness"):
        assert torch.allclose(outs["dense"][key], outs["sparse"][key], atol=1e-4, rtol=1e-4)
    cost = collect_cost(head)
    assert torch.all(cost.realized < cost.full)
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "scores", "labels"}


def test_plain_head_records_dense_cost():
    model = _fcos(FCOSPlainHead(256, 1, 3, num_convs=2)).eval()
    with torch.no_grad():
        model([torch.rand(3, 96, 96)])
    cost = collect_cost(model.head)
    # P3..P7 of a 96×96 input: 12², 6², 3², 2², 1² pixels
    pixels = 144 + 36 + 9 + 4 + 1
    per_pixel = 2 * 2 * (256 * 256 * 9 + 256) + 256 * 9 * (3 + 4 + 1)
    assert cost.full.item() == pytest.approx(pixels * per_pixel)


def test_padded_batch_hands_each_images_size_to_the_head_once():
    """track_image_sizes: in a detector forward the head receives each image's valid size at P3 (the batch is
    padded to a common size) and counts only those pixels; a direct head call afterwards receives none."""
    from sparsehead.modeling.valid_region import track_image_sizes, valid_sizes

    torch.manual_seed(0)
    model = _fcos(FCOSPlainHead(256, 1, 3)).eval()
    track_image_sizes(model)
    seen = []
    model.head.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("valid_sizes")), with_kwargs=True)
    images, _ = _batch()
    with torch.no_grad():
        batch_images, _ = model.transform(images)
        model(images)
    padded = batch_images.tensors.shape[-2:]
    p3 = [(-(-h // 8), -(-w // 8)) for h, w in batch_images.image_sizes]
    assert seen[-1] == p3 and list(padded) != [8 * s for s in p3[1]]  # the second image is padded
    cost = collect_cost(model.head).full
    per_pixel = cost[0] / sum(-(-p3[0][0] // 2**k) * -(-p3[0][1] // 2**k) for k in range(5))
    expected = sum(-(-p3[1][0] // 2**k) * -(-p3[1][1] // 2**k) for k in range(5)) * per_pixel
    torch.testing.assert_close(cost[1], expected)
    with torch.no_grad():
        model.head([torch.randn(1, 256, 8, 8)])
    assert seen[-1] is None
    assert valid_sizes([(64, 64)], (64, 64), (8, 8)) is None  # nothing padded
    assert valid_sizes([(64, 40), (60, 64)], (64, 64), (8, 8)) == [(8, 5), (8, 8)]


@pytest.mark.parametrize("kind", ["dynamic", "plain"])
def test_box_init_keeps_a_box_channel_alive_that_starts_dead(kind):
    """A box channel whose conv output is negative at every location gets no gradient through the ReLU; a
    positive ``box_init`` starts it positive, so the box loss reaches its weights. 0 is torchvision's init."""
    grads, biases = {}, {}
    for box_init in (0.0, 1.0):
        torch.manual_seed(0)
        if kind == "dynamic":
            head = FCOSDynamicHead(256, 1, 3, num_routers=1, gated=False, execution="dense", box_init=box_init)
        else:
            head = FCOSPlainHead(256, 1, 3, num_convs=1, box_init=box_init)
        conv = head.regression_head.bbox_reg
        biases[box_init] = conv.bias.detach().clone()
        with torch.no_grad():  # channel 0 (l) reads the towers' non-negative features with negative weights only
            conv.weight[0] = -conv.weight[0].abs() * 0.01
        model = _fcos(head).train()
        losses = model(*_batch())
        losses["bbox_regression"].backward()
        grads[box_init] = conv.weight.grad[0].abs().sum().item()
    assert torch.equal(biases[0.0], torch.zeros(4)) and torch.equal(biases[1.0], torch.ones(4))
    assert grads[0.0] == 0.0 and grads[1.0] > 0.0
    with pytest.raises(ValueError, match="box_init"):
        FCOSPlainHead(256, 1, 3, box_init=-1.0)
