"""The dynamic heads are torchvision's FCOSHead / RetinaNetHead (their __init__, sub-heads, box coders and
losses), with the towers in front; state dicts of earlier versions (prediction convs at the head's top
level) still load, and the parameter order (which optimizer states follow) is the earlier one."""
import pytest
import torch
from torch import nn
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.retinanet import (
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
)

from sparsehead.modeling.heads import FCOSDynamicHead, RetinaNetDynamicHead

FCOS_LEGACY, RETINA_LEGACY = FCOSDynamicHead.LEGACY_KEYS, RetinaNetDynamicHead.LEGACY_KEYS

C, K = 32, 3
CASES = {
    "fcos": (FCOSDynamicHead, FCOSHead, (FCOSClassificationHead, FCOSRegressionHead), 1, FCOS_LEGACY),
    "retinanet": (RetinaNetDynamicHead, RetinaNetHead, (RetinaNetClassificationHead, RetinaNetRegressionHead), 9,
                  RETINA_LEGACY),
}


def _make(name, seed=0):
    cls, _, _, anchors, _ = CASES[name]
    torch.manual_seed(seed)
    return cls(C, anchors, K, num_routers=1, gn_groups=8, execution="dense").eval()


def _pyramid():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, C, s, s, generator=g) for s in (16, 8, 4, 2, 1)]


def _legacy(state, renames):
    inverse = {new: old for old, new in renames.items()}
    out = {}
    for key, value in state.items():
        for new, old in inverse.items():
            if key.startswith(new):
                key = old + key[len(new):]
                break
        out[key] = value
    return out


@pytest.mark.parametrize("name", CASES)
def test_built_by_torchvision_init(name):
    _, tv_cls, (cls_sub, reg_sub), anchors, _ = CASES[name]
    head = _make(name)
    assert isinstance(head.classification_head, cls_sub) and isinstance(head.regression_head, reg_sub)
    # every attribute torchvision's own __init__ sets is there (a torchvision upgrade adding one is covered)
    reference = tv_cls(C, anchors, K, **({"num_convs": 0} if tv_cls is FCOSHead else {}))
    assert set(vars(reference)) - {"_modules"} <= set(vars(head))
    assert set(reference._modules) <= set(head._modules)
    # the towers replace the sub-heads' per-level convs: none are left over
    assert not any(isinstance(m, nn.Conv2d) for m in head.classification_head.conv.modules())
    assert not any(isinstance(m, nn.Conv2d) for m in head.regression_head.conv.modules())


@pytest.mark.parametrize("name", CASES)
def test_legacy_state_dict_loads_with_same_outputs_and_parameter_order(name):
    renames = CASES[name][4]
    src, dst = _make(name, seed=0), _make(name, seed=1)
    legacy = _legacy(src.state_dict(), renames)
    assert any(k.startswith(tuple(renames)) for k in legacy)
    dst.load_state_dict(legacy)  # strict
    x = _pyramid()
    with torch.no_grad():
        a, b = src(x), dst(x)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # earlier versions registered the prediction convs after the towers (FCOS: its scales first)
    legacy_order = list(_legacy(dict(src.named_parameters()), renames))
    tower_first = [k for k in legacy_order if "tower" in k or k == "scales"]
    assert legacy_order[: len(tower_first)] == tower_first
    assert legacy_order[len(tower_first):] == [k for k in legacy_order if k.startswith(tuple(renames))]


def test_legacy_detector_checkpoint_through_load_model_weights(tmp_path):
    from sparsehead.engine.checkpoint import load_model_weights

    src, dst = _make("fcos", 0), _make("fcos", 1)
    model_src, model_dst = nn.ModuleDict({"head": src}), nn.ModuleDict({"head": dst})
    legacy = {"head." + k: v for k, v in _legacy(src.state_dict(), FCOS_LEGACY).items()}
    torch.save({"model": legacy}, tmp_path / "old.pth")
    load_model_weights(model_dst, tmp_path / "old.pth")
    for k, v in model_src.state_dict().items():
        assert torch.equal(v, model_dst.state_dict()[k]), k
    legacy["head.cls_logits.weight"] = legacy["head.cls_logits.weight"][:1]
    with pytest.raises(ValueError, match="does not match the configured model"):
        load_model_weights(model_dst, legacy)
