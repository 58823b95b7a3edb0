import math

import pytest
import torch

from sparsehead import GeReTanH, SpatialGate
from sparsehead.layers.gates import SigmoidGate, SoftmaxGate, apply_gates, build_gate_activation, gate_conv


def test_geretanh_matches_formula_and_is_zero_for_nonpositive_inputs():
    x = torch.linspace(-4, 4, 81)
    tau = 1.5
    t = math.tanh(tau)
    expected = torch.clamp((torch.tanh(x - tau) + t) / (1 + t), min=0)
    assert torch.allclose(GeReTanH(tau)(x), expected)
    out = GeReTanH(tau)(x)
    assert torch.all(out[x <= 0] == 0)
    assert torch.all(out[x > 0] > 0)
    assert out.max() < 1


def test_tau_zero_is_retanh():
    x = torch.randn(1000)
    assert torch.allclose(GeReTanH(0.0)(x), torch.tanh(x).clamp_min(0))
    assert torch.allclose(build_gate_activation("retanh")(x), torch.tanh(x).clamp_min(0))


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.5, 2.0])
@pytest.mark.parametrize("value", [0.5, 0.99])
def test_init_bias_gives_requested_gate_value(tau, value):
    act = GeReTanH(tau)
    bias = act.init_bias(value)
    assert act(torch.tensor(bias)).item() == pytest.approx(value, abs=1e-6)


def test_init_bias_closed_forms_from_paper():
    assert GeReTanH(0.0).init_bias(0.99) == pytest.approx(0.5 * math.log(1.99 / 0.01))
    tau = 1.5
    assert GeReTanH(tau).init_bias(0.99) == pytest.approx(0.5 * math.log((1 + 0.99 * math.exp(2 * tau)) / 0.01))
    assert SigmoidGate().init_bias(0.99) == pytest.approx(0.5 * math.log(0.99 / 0.01))


def test_softmax_gate_groups_compete_and_single_group_is_sigmoid():
    x = torch.randn(2, 1, 4, 4)
    assert torch.allclose(SoftmaxGate()(x), torch.sigmoid(x), atol=1e-6)
    x3 = torch.randn(2, 3, 4, 4)
    g = SoftmaxGate()(x3)
    assert g.shape == x3.shape
    assert torch.all(g.sum(dim=1) < 1) and torch.all(g > 0)
    bias = SoftmaxGate().init_bias(0.3, num_groups=3)
    assert SoftmaxGate()(torch.full((1, 3, 1, 1), bias))[0, :, 0, 0].tolist() == pytest.approx([0.3] * 3)


@pytest.mark.parametrize("ndim", [2, 3])
def test_spatial_gate_starts_at_init_value_and_exposes_torch_conv(ndim):
    gate = SpatialGate(16, ndim=ndim, tau=1.5, init_value=0.99)
    assert isinstance(gate.conv, torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d)
    assert gate.conv.weight.std().item() == pytest.approx(0.01, rel=0.3)
    x = torch.zeros(2, 16, *([5] * ndim))
    g = gate(x)
    assert g.shape == (2, 1) + (5,) * ndim
    assert torch.allclose(g, torch.full_like(g, 0.99), atol=1e-5)
    # A user can set the bias to switch the gate off everywhere.
    with torch.no_grad():
        gate.conv.bias.fill_(-1.0)
    assert torch.all(gate(x) == 0)


def test_coarse_gate_is_one_value_per_image_and_group():
    gate = SpatialGate(8, num_groups=2, coarse=True)
    x = torch.randn(3, 8, 6, 7)
    g = gate(x)
    assert g.shape == (3, 2, 1, 1)
    logits = gate.conv(x).mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(g, gate.activation(logits))


def test_bad_gate_arguments_are_rejected():
    with pytest.raises(ValueError, match="gate_activation"):
        build_gate_activation("relu")
    with pytest.raises(ValueError, match="num_groups"):
        SpatialGate(10, num_groups=3)
    with pytest.raises(ValueError, match="initial gate value"):
        SpatialGate(8, init_value=1.0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_apply_gates_equals_each_gate_and_calls_its_hooks(ndim):
    torch.manual_seed(0)
    gates = [
        SpatialGate(8, 1, ndim),
        SpatialGate(8, 2, ndim, activation="sigmoid"),
        SpatialGate(8, 1, ndim, coarse=True),
    ]
    for g in gates:
        torch.nn.init.normal_(g.conv.weight)
    seen = []
    for g in gates:
        g.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 8, *([5] * ndim), dtype=torch.float32)
    fused = apply_gates(gates, x)
    separate = [g(x) for g in gates]
    assert len(seen) == 6  # every gate's module was called both times
    for a, b in zip(fused, separate):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-6)
    assert apply_gates([], x) == []


@pytest.mark.parametrize("ndim, size", [(2, (7, 5)), (3, (4, 5, 3))])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gate_conv_equals_torch_conv_forward_and_backward(ndim, size, channels_last, with_bias):
    torch.manual_seed(0)
    x = torch.randn(2, 8, *size, dtype=torch.float64, requires_grad=True)
    fmt = torch.channels_last if ndim == 2 else torch.channels_last_3d
    xin = x.contiguous(memory_format=fmt) if channels_last else x
    w = torch.randn(3, 8, *(3,) * ndim, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True) if with_bias else None
    conv = torch.nn.functional.conv2d if ndim == 2 else torch.nn.functional.conv3d
    expected, got = conv(xin, w, b, padding=1), gate_conv(xin, w, b)
    assert got.shape == expected.shape == (2, 3, *size)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(expected)  # a loss that weighs every output differently
    params = [t for t in (x, w, b) if t is not None]
    grads_expected = torch.autograd.grad((expected * weights).sum(), params)
    grads_got = torch.autograd.grad((got * weights).sum(), params)
    for a, e in zip(grads_got, grads_expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
