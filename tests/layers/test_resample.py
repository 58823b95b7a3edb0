import pytest
import torch

from sparsehead.layers.resample import downsample, downsample_parents, half_size, upsample, upsample_rows
from sparsehead.layers.sparse import channels_last, flat_index, from_rows, mask_indices, to_rows


def test_downsample_odd_size_zero_pads():
    x = torch.arange(15.0).view(1, 1, 3, 5)
    out = downsample(x)
    assert out.shape == (1, 1, 2, 3)
    assert out[0, 0, 0, 0] == (0 + 1 + 5 + 6) / 4
    assert out[0, 0, 0, 2] == (4 + 9) / 4  # right border column: two pixels and two zeros
    assert out[0, 0, 1, 2] == 14 / 4  # corner: one pixel and three zeros


def test_upsample_nearest_and_crop():
    x = torch.arange(6.0).view(1, 1, 2, 3)
    out = upsample(x, (3, 5))
    assert out.shape == (1, 1, 3, 5)
    assert out[0, 0].tolist() == [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]]


@pytest.mark.parametrize("size", [(13, 19), (8, 8), (6, 5, 7)])
def test_row_resampling_equals_dense(size):
    torch.manual_seed(0)
    ndim = len(size)
    mask = torch.rand(2, 1, *size) < 0.4
    x = torch.randn(2, 3, *size) * mask
    flat = flat_index(mask_indices(mask), size)
    rows = to_rows(channels_last(x)).index_select(0, flat)

    coarse = half_size(size)
    cflat, crows = downsample_parents(flat, 2, size), rows / 2**ndim
    out = torch.zeros(2 * torch.Size(coarse).numel(), 3).index_add(0, cflat, crows)
    assert torch.allclose(from_rows(out, (2, 3, *coarse)), downsample(x), atol=1e-6)

    for fine in ([2 * s for s in size], [2 * s - 1 for s in size]):  # odd: the last children are cropped
        fflat, frows = upsample_rows(flat, rows, 2, size, fine)
        out = torch.zeros(2 * torch.Size(fine).numel(), 3).index_add(0, fflat, frows)
        assert torch.allclose(from_rows(out, (2, 3, *fine)), upsample(x, fine))
        assert fflat.shape[0] <= flat.shape[0] * 2**ndim
