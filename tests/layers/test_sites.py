"""Site layouts: the packed rows of every level and image, their neighbour and segment tables."""
import pytest
import torch
import torch.nn.functional as F

from sparsehead.layers.gates import SpatialGate
from sparsehead.layers.sites import SiteRows, index_layout, map_layout
from sparsehead.layers.sparse import channels_last, to_rows

SIZES = [(13, 19), (7, 10), (4, 5)]


def _maps(batch, channels, sizes, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, *s, generator=gen, dtype=dtype) for s in sizes]


def test_rows_are_levels_then_images_and_round_trip():
    maps = _maps(2, 3, SIZES)
    rows = SiteRows.from_maps(maps)
    lay = rows.layout
    assert lay.rows == sum(2 * h * w for h, w in SIZES) and rows.buf.shape == (lay.rows + 1, 3)
    assert torch.all(rows.buf[-1] == 0)
    assert torch.equal(rows.features[: 2 * 13 * 19], to_rows(channels_last(maps[0])))
    out = rows.to_maps()
    assert all(torch.equal(a, b) for a, b in zip(out, maps))
    assert all(o.data_ptr() != m.data_ptr() for o, m in zip(out, maps))  # packing copies
    seg = lay.segment.tolist()
    assert seg[0] == 0 and seg[13 * 19] == 1 and seg[2 * 13 * 19] == 2 and seg[-1] == 5
    assert map_layout(2, SIZES, "cpu") is lay  # cached per shape


@pytest.mark.parametrize("size", [(6, 5), (4, 3, 5)])
def test_neighbours_are_the_kernel_taps_in_torch_order(size):
    """Gathering the rows at each tap and summing with a conv weight equals torch's conv."""
    ndim = len(size)
    x = _maps(2, 4, [size])[0]
    w = torch.randn(3, 4, *([3] * ndim), dtype=torch.float64)
    rows = SiteRows.from_maps([x])
    cols = rows.buf[rows.layout.neighbours]  # (R, K, C)
    got = torch.einsum("rkc,okc->ro", cols, w.flatten(2).transpose(1, 2))
    ref = (F.conv2d if ndim == 2 else F.conv3d)(x, w, padding=1)
    assert torch.allclose(got, to_rows(channels_last(ref)))


def test_gate_conv_and_neighbour_max_equal_maps():
    maps = _maps(2, 8, SIZES, seed=1)
    rows = SiteRows.from_maps(maps)
    gate = SpatialGate(8, num_groups=2).double()
    torch.nn.init.normal_(gate.conv.weight)
    got = gate(rows)
    assert torch.allclose(got, rows.layout.pack_levels([gate(m) for m in maps]))
    pooled = rows.layout.neighbour_max(got)
    assert torch.allclose(pooled, rows.layout.pack_levels([F.max_pool2d(gate(m), 3, 1, 1) for m in maps]))


def test_coarse_gate_on_rows_is_the_mean_per_image_and_level():
    maps = _maps(2, 8, SIZES, seed=2)
    gate = SpatialGate(8, coarse=True).double()
    torch.nn.init.normal_(gate.conv.weight)
    got = gate(SiteRows.from_maps(maps))
    lay = map_layout(2, SIZES, "cpu")
    expected = lay.pack_levels([gate(m).expand(-1, -1, *m.shape[2:]) for m in maps])
    assert torch.allclose(got, expected)


def test_index_layout_of_full_grids_equals_the_map_layout():
    sizes = [(4, 3, 5), (2, 2, 3)]
    indices = [torch.nonzero(torch.ones(2, *s)).int() for s in sizes]
    sparse, dense = index_layout(indices, sizes, 2), map_layout(2, sizes, "cpu")
    for name in ("segment", "image", "neighbours", "coords"):
        assert torch.equal(getattr(sparse, name), getattr(dense, name)), name
    for name in ("down", "up"):
        for a, b in zip(getattr(sparse, name), getattr(dense, name)):
            assert torch.equal(a, b), name


def test_valid_sizes_make_padding_rows_non_sites():
    """Batch padding: rows outside each image's valid region are not sites, hold zeros and are missing
    neighbours; costs count sites only."""
    maps = _maps(2, 3, SIZES)
    valid = [(13, 19), (9, 11)]
    rows = SiteRows.from_maps(maps, valid_sizes=valid)
    lay = rows.layout
    level0 = lay.level(lay.valid[:, None], 0)
    assert level0[0].all() and level0[1, 0, :9, :11].all() and not level0[1, 0, 9:].any()
    assert not lay.level(lay.valid[:, None], 1)[1, 0, 5:].any()  # 9 -> 5 rows at the next level
    assert torch.all(rows.features[~lay.valid] == 0)
    assert torch.all(lay.neighbours[~lay.valid] == lay.rows)
    nbr = lay.neighbours[lay.valid]
    assert torch.all((nbr == lay.rows) | lay.valid[nbr.clamp_max(lay.rows - 1)])
    per_image = lay.sites_per_level_image().sum(dim=0)
    expected = [sum(h * w for h, w in SIZES), 9 * 11 + 5 * 6 + 3 * 3]
    assert per_image.tolist() == expected
