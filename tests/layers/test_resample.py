import pytest
import torch
import torch.nn.functional as F

from sparsehead.layers.resample import downsample, half_size, resample_map, upsample
from sparsehead.layers.sites import index_layout, map_layout


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


def _apply(table, rows: torch.Tensor, source: slice, total: int) -> torch.Tensor:
    """Rows (total, C) that receive the contributions of ``rows`` (the rows in ``source``) through ``table``."""
    index, weight = table
    w = weight[source].to(rows.dtype)[:, :, None]
    out = torch.zeros(total, rows.shape[1], dtype=rows.dtype)
    return out.index_add(0, index[source].reshape(-1), (rows[:, None, :] * w).reshape(-1, rows.shape[1]))


def test_bilinear_is_torch_interpolation_with_aligned_corners():
    x = torch.randn(2, 3, 13, 19, dtype=torch.float64)
    ref = F.interpolate(x, size=(7, 10), mode="bilinear", align_corners=True)
    assert torch.equal(resample_map(x, (7, 10), "bilinear", down=True), ref)
    assert torch.equal(resample_map(x, (7, 10), "pool", down=True), downsample(x))
    with pytest.raises(ValueError, match="resample"):
        resample_map(x, (7, 10), "nearest", down=True)


@pytest.mark.parametrize("mode", ["pool", "bilinear"])
@pytest.mark.parametrize("size", [(13, 19), (8, 8), (6, 5, 7), (1, 3), (25, 38)])
def test_grid_tables_equal_map_resampling(size, mode):
    """Down and up tables of a two-level map layout reproduce the map resampling (``pool``: odd sizes
    cropped; ``bilinear``: F.interpolate with aligned corners), odd sizes included."""
    torch.manual_seed(0)
    coarse = tuple(half_size(size))
    lay = map_layout(2, [size, coarse], "cpu", mode)
    fine_rows, coarse_rows = slice(*lay.level_rows(0, 1)), slice(*lay.level_rows(1, 2))
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    y = torch.randn(2, 3, *coarse, dtype=torch.float64)
    packed = lay.pack_levels([x, y])
    down = _apply(lay.down, packed[fine_rows], fine_rows, lay.rows)
    assert torch.allclose(lay.level(down, 1), resample_map(x, coarse, mode, down=True))
    assert torch.all(down[fine_rows] == 0) and torch.all(lay.down[1][coarse_rows] == 0)  # coarsest: no target
    up = _apply(lay.up, packed[coarse_rows], coarse_rows, lay.rows)
    assert torch.allclose(lay.level(up, 0), resample_map(y, size, mode, down=False))
    assert torch.all(lay.up[1][fine_rows] == 0)


@pytest.mark.parametrize("mode", ["pool", "bilinear"])
def test_index_tables_send_nothing_to_missing_sites(mode):
    """On sparse index sets, resampling is the map resampling of the volume that is zero off the sites, kept
    at the destination's sites only."""
    torch.manual_seed(1)
    size, coarse = (6, 7, 5), tuple(half_size((6, 7, 5)))
    masks = [torch.rand(2, *size) < 0.4, torch.rand(2, *coarse) < 0.6]
    indices = [torch.nonzero(m).int() for m in masks]
    lay = index_layout(indices, [size, coarse], 2, mode)
    vols = [torch.randn(2, 3, *s, dtype=torch.float64) * m[:, None] for s, m in zip((size, coarse), masks)]
    at = [(i[:, 0].long(), slice(None), *i[:, 1:].long().t()) for i in indices]  # each level's sites
    rows = [v[a] for v, a in zip(vols, at)]
    fine, crs = slice(*lay.level_rows(0, 1)), slice(*lay.level_rows(1, 2))
    down = _apply(lay.down, rows[0], fine, lay.rows)[crs]
    expected = resample_map(vols[0], coarse, mode, down=True)[at[1]]
    assert torch.allclose(down, expected)
    up = _apply(lay.up, rows[1], crs, lay.rows)[fine]
    expected = resample_map(vols[1], size, mode, down=False)[at[0]]
    assert torch.allclose(up, expected)
