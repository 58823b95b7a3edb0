import pytest
import torch
import torch.nn.functional as F

from sparsehead.layers.norm import MaskedGroupNorm, group_norm_rows


def _onehot(segment: torch.Tensor, count: int, dtype=torch.float64) -> torch.Tensor:
    return F.one_hot(segment, count).to(dtype)


def _reference(rows: torch.Tensor, segment: torch.Tensor, mask, norm: MaskedGroupNorm) -> torch.Tensor:
    """Per segment: mean and biased variance of its masked rows per group, written out, in float64."""
    rows = rows.double()
    m, c = rows.shape
    g = norm.num_groups
    out = torch.empty_like(rows)
    for s in segment.unique().tolist():
        sel = segment == s
        stats = sel if mask is None else sel & mask
        xs = rows[stats].reshape(-1, g, c // g)
        if xs.shape[0]:
            var, mean = torch.var_mean(xs, dim=(0, 2), correction=0)
        else:
            var, mean = torch.zeros(g, dtype=rows.dtype), torch.zeros(g, dtype=rows.dtype)
        y = (rows[sel].reshape(-1, g, c // g) - mean[:, None]) * torch.rsqrt(var + norm.eps)[:, None]
        out[sel] = y.reshape(-1, c) * norm.weight.double() + norm.bias.double()
    return out


def _norm(groups: int, channels: int) -> MaskedGroupNorm:
    norm = MaskedGroupNorm(groups, channels).double()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    return norm


def test_one_segment_without_mask_equals_torch_group_norm():
    x = torch.randn(1, 8, 5, 6, dtype=torch.float64)
    norm = _norm(4, 8)
    ref = torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, eps=norm.eps)
    rows = x.movedim(1, -1).reshape(-1, 8)
    out = norm.forward_rows(rows, torch.ones(30, 1, dtype=torch.float64))
    assert torch.allclose(out, ref.movedim(1, -1).reshape(-1, 8))


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference"])
@pytest.mark.parametrize("segments", [1, 3, 6])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_statistics_per_segment_over_masked_rows(segments, density, grad):
    torch.manual_seed(0)
    rows = torch.randn(60, 8, dtype=torch.float64) * 2 + 1
    segment = torch.randint(0, segments, (60,))
    mask = torch.rand(60) < density
    norm = _norm(4, 8)
    with torch.set_grad_enabled(grad):
        out = norm.forward_rows(rows, _onehot(segment, segments), mask)
        assert torch.allclose(out, _reference(rows, segment, mask, norm))
        # Rows outside the mask do not change the masked rows' statistics.
        changed = rows.clone()
        changed[~mask] = 100.0
        again = norm.forward_rows(changed, _onehot(segment, segments), mask, overwrite=True)
        assert torch.allclose(again[mask], out[mask])


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference"])
def test_empty_segments_and_per_segment_affine(grad):
    """Segments without rows are allowed; (S, C) weight and bias tables give each segment its own affine."""
    torch.manual_seed(1)
    rows = torch.randn(12, 4, dtype=torch.float64)
    segment = torch.tensor([0] * 6 + [3] * 6)
    weight, bias = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        out = group_norm_rows(rows, _onehot(segment, 5), 2, weight, bias)
    for s in (0, 3):
        norm = MaskedGroupNorm(2, 4).double()
        with torch.no_grad():
            norm.weight.copy_(weight[s])
            norm.bias.copy_(bias[s])
        sel = segment == s
        assert torch.allclose(out[sel], _reference(rows[sel], segment[sel], None, norm))


def test_overwrite_only_without_autograd():
    torch.manual_seed(0)
    norm = _norm(4, 8).float()
    rows = 3.0 + 0.5 * torch.randn(40, 8)
    segment = torch.randint(0, 3, (40,))
    onehot = _onehot(segment, 3, torch.float32)
    expected = norm.forward_rows(rows, onehot)
    kept = rows.clone()
    assert torch.allclose(norm.forward_rows(rows, onehot, overwrite=True), expected)
    assert torch.equal(rows, kept)  # autograd on: the input is left alone
    with torch.no_grad():
        out = norm.forward_rows(rows, onehot, overwrite=True)
    assert out.data_ptr() == rows.data_ptr()
    assert torch.allclose(out, expected.detach(), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_matches_autograd_arithmetic(dtype):
    """Without autograd the rows are normalised in fewer passes: the same function up to rounding, also on a
    strided input (copied, not overwritten) and with a per-segment affine table."""
    torch.manual_seed(3)
    base = 2.0 + torch.randn(8, 200, dtype=dtype)
    rows = base.t()  # (200, 8), not contiguous
    segment = torch.randint(0, 4, (200,))
    onehot, mask = _onehot(segment, 4, dtype), torch.rand(200) < 0.6
    weight, bias = torch.randn(4, 8, dtype=dtype), torch.randn(4, 8, dtype=dtype)
    expected = group_norm_rows(rows, onehot, 2, weight, bias, mask=mask)
    kept = rows.clone()
    with torch.no_grad():
        out = group_norm_rows(rows, onehot, 2, weight, bias, mask=mask, overwrite=True)
    assert torch.equal(rows, kept)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(out, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("subset", [False, True])
def test_far_from_zero_mean_keeps_precision(subset):
    """Two-pass statistics: a mean far from zero costs no precision in float32, with autograd or without;
    gradients too."""
    torch.manual_seed(2)
    norm = _norm(4, 8).float()
    rows = (1000.0 + 0.1 * torch.randn(50, 8)).requires_grad_()
    segment = torch.zeros(50, dtype=torch.int64)
    mask = torch.rand(50) < 0.5 if subset else None
    out = norm.forward_rows(rows, _onehot(segment, 1, torch.float32), mask)
    ref_rows = rows.detach().double().requires_grad_()
    ref = _reference(ref_rows, segment, mask, norm)
    assert torch.allclose(out.double(), ref, atol=2e-3)
    with torch.no_grad():
        inference = norm.forward_rows(rows.detach().clone(), _onehot(segment, 1, torch.float32), mask, True)
    assert torch.allclose(inference.double(), ref.detach(), atol=2e-3)
    upstream = torch.randn(50, 8)
    (grad,) = torch.autograd.grad(out, rows, upstream)
    (ref_grad,) = torch.autograd.grad(ref, ref_rows, upstream.double())
    assert torch.allclose(grad.double(), ref_grad, atol=0.05 * ref_grad.abs().max().item())


def test_group_of_one_value_is_its_bias():
    """One row and one channel per group: each group's one value is its mean, so the output is the bias."""
    norm = MaskedGroupNorm(4, 4)
    torch.nn.init.normal_(norm.bias)
    rows = torch.randn(1, 4, requires_grad=True)
    out = norm.forward_rows(rows, torch.ones(1, 1))
    assert torch.allclose(out, norm.bias.detach()[None])
    (grad,) = torch.autograd.grad(out.sum(), rows)
    assert torch.allclose(grad, torch.zeros(1, 4))
