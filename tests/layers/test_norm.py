import pytest
import torch

from sparsehead.layers.norm import MaskedGroupNorm
from sparsehead.layers.sparse import channels_last, flat_index, mask_indices, to_rows


def test_full_mask_equals_torch_group_norm():
    x = torch.randn(2, 8, 5, 6)
    norm = MaskedGroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    ref = torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, eps=norm.eps)
    mask = torch.ones(2, 1, 5, 6, dtype=torch.bool)
    assert torch.allclose(norm.forward_dense(x, mask), ref, atol=1e-5)


def test_statistics_cover_only_masked_pixels():
    x = torch.randn(1, 4, 6, 6)
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    mask[..., :3, :] = True
    norm = MaskedGroupNorm(2, 4)
    out = norm.forward_dense(x, mask)
    # Changing the unmasked pixels must not change the masked outputs.
    x2 = x.clone()
    x2[..., 3:, :] = 100.0
    out2 = norm.forward_dense(x2, mask)
    assert torch.allclose(out[..., :3, :], out2[..., :3, :])
    # Each group of masked outputs has zero mean and unit variance.
    masked = out[0, :, :3, :].reshape(2, -1)
    assert torch.allclose(masked.mean(dim=1), torch.zeros(2), atol=1e-5)
    assert torch.allclose(masked.var(dim=1, unbiased=False), torch.ones(2), atol=1e-3)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_rows_match_dense(density, batch):
    torch.manual_seed(0)
    x = torch.randn(batch, 8, 7, 5)
    mask = torch.rand(batch, 1, 7, 5) < density
    if batch > 1:
        mask[1] = False  # an image with nothing active
    norm = MaskedGroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    dense = norm.forward_dense(x, mask)
    idx = mask_indices(mask)
    flat = flat_index(idx, (7, 5))
    rows = to_rows(channels_last(x)).index_select(0, flat)
    sparse = norm.forward_rows(rows, idx[:, 0].long(), batch)
    assert torch.allclose(sparse, to_rows(channels_last(dense)).index_select(0, flat), atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_rows_statistics_over_a_subset(batch):
    # Rows outside ``mask`` are normalised but do not enter the statistics.
    torch.manual_seed(1)
    rows = torch.randn(20, 8, dtype=torch.float64)
    image = torch.arange(20) % batch
    image = image.sort().values
    mask = torch.rand(20) < 0.6
    norm = MaskedGroupNorm(2, 8).double()
    out = norm.forward_rows(rows, image, batch, mask)
    for b in range(batch):
        sel = (image == b) & mask
        xs = rows[sel].reshape(-1, 2, 4)
        mean = xs.mean(dim=(0, 2))
        var = xs.var(dim=(0, 2), unbiased=False)
        want = (rows[image == b].reshape(-1, 2, 4) - mean[:, None]) / torch.sqrt(var[:, None] + norm.eps)
        assert torch.allclose(out[image == b], want.reshape(-1, 8))


@pytest.mark.parametrize("batch", [1, 3])
def test_rows_overwrite_only_without_autograd(batch):
    torch.manual_seed(0)
    norm = MaskedGroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight)
    rows = 3.0 + 0.5 * torch.randn(40, 8)  # an offset mean: the shifted one-pass variance must hold
    index = torch.randint(0, batch, (40,))
    expected = norm.forward_rows(rows, index, batch)
    per_row = rows.view(40, 4, 2)
    for i in range(batch):
        var, mean = torch.var_mean(per_row[index == i], dim=(0, 2), correction=0)
        ref = (per_row[index == i] - mean[:, None]) * torch.rsqrt(var + norm.eps)[:, None]
        assert torch.allclose(expected[index == i], ref.reshape(-1, 8) * norm.weight + norm.bias, atol=1e-5)
    # With autograd the input is left alone even when the caller allows overwriting.
    kept = rows.clone()
    assert torch.allclose(norm.forward_rows(rows, index, batch, overwrite=True), expected)
    assert torch.equal(rows, kept)
    with torch.no_grad():
        out = norm.forward_rows(rows, index, batch, overwrite=True)
    assert torch.allclose(out, expected.detach(), atol=1e-5)


@pytest.mark.parametrize("subset", [False, True])
def test_rows_one_image_far_from_zero_mean(subset):
    """One image: the statistics come from shifted data, so a mean far from zero costs no precision;
    values and gradients match the float64 reference, with and without a statistics mask."""
    torch.manual_seed(2)
    norm = MaskedGroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    rows = (1000.0 + 0.1 * torch.randn(50, 8)).requires_grad_()
    mask = torch.rand(50) < 0.5 if subset else None
    out = norm.forward_rows(rows, None, 1, mask)
    ref_rows = rows.detach().double().requires_grad_()
    stats = ref_rows if mask is None else ref_rows[mask]
    var, mean = torch.var_mean(stats.view(-1, 4, 2), dim=(0, 2), correction=0)
    ref = (ref_rows.view(-1, 4, 2) - mean[:, None]) * torch.rsqrt(var + norm.eps)[:, None]
    ref = ref.reshape(-1, 8) * norm.weight.double() + norm.bias.double()
    assert torch.allclose(out.double(), ref, atol=2e-3)
    upstream = torch.randn(50, 8)
    (grad,) = torch.autograd.grad(out, rows, upstream)
    (ref_grad,) = torch.autograd.grad(ref, ref_rows, upstream.double())
    assert torch.allclose(grad.double(), ref_grad, atol=0.05 * ref_grad.abs().max().item())


def test_rows_need_batch_indices_for_several_images():
    norm = MaskedGroupNorm(2, 4)
    with pytest.raises(ValueError, match="batch indices"):
        norm.forward_rows(torch.randn(6, 4), None, 2)


def test_rows_one_channel_per_group_in_place():
    """With one channel per group the shift is a row's own values: it must be a copy."""
    norm = MaskedGroupNorm(4, 4)
    rows = torch.randn(9, 4) + 5.0
    expected = norm.forward_rows(rows, None, 1)
    with torch.no_grad():
        out = norm.forward_rows(rows.clone(), None, 1, overwrite=True)
    assert torch.allclose(out, expected, atol=1e-5)


def test_rows_group_of_one_value_is_its_bias():
    """One row and one channel per group: each group's one value is its mean, so the output is the bias."""
    norm = MaskedGroupNorm(4, 4)
    torch.nn.init.normal_(norm.bias)
    rows = torch.randn(1, 4, requires_grad=True)
    out = norm.forward_rows(rows, None, 1)
    assert torch.allclose(out, norm.bias.detach()[None])
    (grad,) = torch.autograd.grad(out.sum(), rows)
    assert torch.allclose(grad, torch.zeros(1, 4))
