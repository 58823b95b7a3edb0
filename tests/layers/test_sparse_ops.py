import pytest
import spconv.pytorch as spconv
import torch
import torch.nn.functional as F
from spconv.core import ConvAlgo

from sparsehead.layers.sparse import (
    Grid,
    SubMConv,
    channels_last,
    conv_algo,
    depthwise_conv_rows,
    dilate,
    flat_index,
    gather_conv,
    grid_of,
    mask_indices,
    to_rows,
)


def test_algorithm_follows_device():
    assert conv_algo(torch.device("cpu")) == ConvAlgo.Native
    assert conv_algo(torch.device("cuda", 0)) == ConvAlgo.MaskImplicitGemm


@pytest.mark.parametrize("size", [(9, 7), (5, 6, 4)])
def test_depthwise_rows_equal_grouped_conv(size, device):
    torch.manual_seed(0)
    ndim = len(size)
    x = torch.randn(2, 6, *size, device=device, requires_grad=True)
    w = torch.randn(6, 1, *([3] * ndim), device=device, requires_grad=True)
    conv = F.conv2d if ndim == 2 else F.conv3d
    ref = conv(x, w, padding=1, groups=6)
    mask = torch.rand(2, 1, *size, device=device) < 0.5
    grid = grid_of(x)
    sites = grid.sites(mask)
    flat = grid.rows(sites)
    assert torch.equal(flat, flat_index(mask_indices(mask), size))
    out = depthwise_conv_rows(to_rows(channels_last(x)), grid.table(sites), w)
    expected = to_rows(channels_last(ref)).index_select(0, flat)
    assert torch.allclose(out, expected, atol=1e-5)
    gx, gw = torch.autograd.grad(out.square().sum(), (x, w))
    rx, rw = torch.autograd.grad(expected.square().sum(), (x, w))
    assert torch.allclose(gx, rx, atol=1e-4) and torch.allclose(gw, rw, atol=1e-3)


@pytest.mark.parametrize("ndim", [2, 3])
def test_submconv_matches_dense_conv_on_its_index_set(ndim, device):
    """Forward and backward (input and weight gradients) of spconv's submanifold conv on the device's
    algorithm (Native on CPU, MaskImplicitGemm on CUDA) against torch's dense conv on masked maps."""
    torch.manual_seed(0)
    size = (8, 7) if ndim == 2 else (5, 6, 4)
    conv = SubMConv(ndim, 5, 4, 3, indice_key="k").to(device)
    x = torch.randn(2, 5, *size, device=device)
    mask = torch.rand(2, 1, *size, device=device) < 0.4
    idx = mask_indices(mask)
    assert idx.is_contiguous() and idx.dtype == torch.int32
    rows = to_rows(channels_last(x)).index_select(0, flat_index(idx, size)).requires_grad_()
    out = conv(spconv.SparseConvTensor(rows, idx, list(size), 2)).dense()
    dense_conv = F.conv2d if ndim == 2 else F.conv3d
    xs = x.clone().requires_grad_()
    ref = dense_conv(xs * mask, conv.dense_weight(), padding=1) * mask
    assert torch.allclose(out, ref, atol=1e-5)
    upstream = torch.randn_like(ref)
    grad_rows, grad_w = torch.autograd.grad((out * upstream).sum(), (rows, conv.weight))
    ref_x, ref_w = torch.autograd.grad((ref * upstream).sum(), (xs, conv.weight))
    assert torch.allclose(grad_rows, to_rows(channels_last(ref_x)).index_select(0, flat_index(idx, size)), atol=1e-5)
    assert torch.allclose(grad_w, ref_w, atol=1e-4)


def test_dilate_is_3x3_neighbourhood():
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    mask[0, 0, 0, 0] = True
    out = dilate(mask)
    assert out[0, 0].sum() == 4 and out[0, 0, :2, :2].all()


def test_submconv_is_correct_with_two_threads():
    """spconv's CPU-only wheel gives wrong results with several threads; the CUDA wheel must not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        conv = SubMConv(2, 16, 16, 3)
        x = torch.randn(2, 16, 40, 40)
        mask = torch.rand(2, 1, 40, 40) < 0.3
        idx = mask_indices(mask)
        rows = to_rows(channels_last(x)).index_select(0, flat_index(idx, (40, 40)))
        ref = F.conv2d(x * mask, conv.dense_weight(), padding=1) * mask
        for _ in range(5):
            out = conv(spconv.SparseConvTensor(rows, idx, [40, 40], 2)).dense()
            assert torch.allclose(out, ref, atol=1e-4)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("size", [(9, 7), (5, 4, 6)])
def test_gather_conv_computes_exact_output_set(size, device):
    """Outputs on one pixel set, inputs read from the whole map's rows or from another row set."""
    torch.manual_seed(0)
    ndim = len(size)
    x = torch.randn(2, 6, *size, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(5, *([3] * ndim), 6, dtype=torch.float64, device=device, requires_grad=True)  # spconv layout
    conv = F.conv2d if ndim == 2 else F.conv3d
    out_mask = torch.rand(2, 1, *size, device=device) < 0.3
    idx = mask_indices(out_mask)
    grid = grid_of(x)
    sites = grid.sites(out_mask)
    rows = to_rows(channels_last(x))
    got = gather_conv(rows, w, grid.table(sites))
    ref = conv(x, w.movedim(-1, 1), padding=1)
    expected = to_rows(channels_last(ref)).index_select(0, flat_index(idx, size))
    assert torch.allclose(got, expected)
    gx, gw = torch.autograd.grad(got.sin().sum(), (x, w))
    rx, rw = torch.autograd.grad(expected.sin().sum(), (x, w))
    assert torch.allclose(gx, rx) and torch.allclose(gw, rw)

    # Inputs from a subset of rows (zeros elsewhere) through a lookup table.
    in_mask = dilate(out_mask) & (torch.rand(2, 1, *size, device=device) < 0.7)
    in_sites = grid.sites(in_mask)
    in_flat = grid.rows(in_sites)
    got = gather_conv(rows.index_select(0, in_flat), w, grid.table(sites, grid.lookup(in_sites)))
    ref = conv(x * in_mask, w.movedim(-1, 1), padding=1)
    assert torch.allclose(got, to_rows(channels_last(ref)).index_select(0, flat_index(idx, size)))
    gx, gw = torch.autograd.grad(got.sin().sum(), (x, w))
    rx, rw = torch.autograd.grad(to_rows(channels_last(ref)).index_select(0, flat_index(idx, size)).sin().sum(), (x, w))
    assert torch.allclose(gx, rx) and torch.allclose(gw, rw)


@pytest.mark.parametrize("depthwise", [False, True])
def test_gathered_convs_do_not_depend_on_chunks(monkeypatch, depthwise):
    """Outputs and gradients do not depend on how many rows each gathered chunk takes."""
    import sparsehead.layers.sparse as sparse

    torch.manual_seed(0)
    size = (11, 13)
    x = torch.randn(1, 4, *size, dtype=torch.float64)
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64) if depthwise else torch.randn(3, 3, 3, 4, dtype=torch.float64)
    mask = torch.rand(1, 1, *size) < 0.5
    grid = Grid(1, size, "cpu")
    table = grid.table(grid.sites(mask))

    def run():
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        rows = to_rows(channels_last(xs))
        out = depthwise_conv_rows(rows, table, ws) if depthwise else gather_conv(rows, ws, table)
        return (out, *torch.autograd.grad(out.cos().sum(), (xs, ws)))

    whole = run()
    monkeypatch.setattr(sparse, "_GATHER_CHUNK_BYTES", 3 * 36 * 8)  # 3 rows per chunk
    assert len(sparse._gather_chunks(table, 36 * 8)) == -(-int(mask.sum()) // 3) > 1
    assert (table < 0).any()  # the chunks must also carry the zero padding
    for a, b in zip(whole, run()):
        assert torch.allclose(a, b)


def test_grid_table_marks_outside_and_missing_pixels():
    size = (3, 4)
    grid = Grid(1, size, "cpu")
    mask = torch.zeros(1, 1, *size, dtype=torch.bool)
    mask[0, 0, 0, 0] = mask[0, 0, 1, 2] = True
    sites = grid.sites(mask)
    assert grid.rows(sites).tolist() == [0, 6]
    table = grid.table(sites)
    # Corner pixel (0, 0): taps with a -1 row or column offset fall outside the grid.
    assert table[0].tolist() == [-1, -1, -1, -1, 0, 1, -1, 4, 5]
    assert table[1].tolist() == [1, 2, 3, 5, 6, 7, 9, 10, 11]
    only = torch.zeros_like(mask)
    only[0, 0, 1, 2] = True  # only pixel (1, 2) has an input row
    assert grid.table(sites, grid.lookup(grid.sites(only)))[1].tolist() == [-1, -1, -1, -1, 0, -1, -1, -1, -1]


@pytest.mark.parametrize("size", [(4, 5), (3, 2, 4)])
def test_grid_rows_and_images_follow_mask_order(size):
    torch.manual_seed(0)
    mask = torch.rand(3, 1, *size) < 0.5
    grid = grid_of(torch.empty(3, 1, *size))
    flat = grid.rows(grid.sites(mask))
    idx = mask_indices(mask)
    assert torch.equal(flat, flat_index(idx, size))
    assert torch.equal(grid.images(flat), idx[:, 0].long())
    assert grid_of(torch.empty(3, 7, *size)) is grid  # cached per shape and device
