import pytest
import spconv.pytorch as spconv
import torch
import torch.nn.functional as F
from spconv.core import ConvAlgo

from sparsehead.layers.sites import SiteRows, map_layout
from sparsehead.layers.sparse import (
    SparseConvWeight,
    channels_last,
    conv_algo,
    depthwise_rows,
    dilate,
    flat_index,
    gather_conv,
    mask_indices,
    matmul_rows,
    to_rows,
    uses_onednn,
)


def test_algorithm_follows_device():
    assert conv_algo(torch.device("cpu")) == ConvAlgo.Native
    assert conv_algo(torch.device("cuda", 0)) == ConvAlgo.MaskImplicitGemm


def _padded_rows(x: torch.Tensor) -> torch.Tensor:
    """The map's rows with one zero row appended (what a missing neighbour reads)."""
    rows = to_rows(channels_last(x))
    return torch.cat([rows, rows.new_zeros(1, rows.shape[1])])


@pytest.mark.parametrize("size", [(9, 7), (5, 6, 4)])
def test_depthwise_rows_equal_grouped_conv(size, device):
    torch.manual_seed(0)
    ndim = len(size)
    x = torch.randn(2, 6, *size, device=device, requires_grad=True)
    w = torch.randn(6, 1, *([3] * ndim), device=device, requires_grad=True)
    conv = F.conv2d if ndim == 2 else F.conv3d
    ref = conv(x, w, padding=1, groups=6)
    mask = torch.rand(2, 1, *size, device=device) < 0.5
    flat = flat_index(mask_indices(mask), size)
    table = map_layout(2, [size], device).neighbours.index_select(0, flat)
    out = depthwise_rows(_padded_rows(x), w, table)
    expected = to_rows(channels_last(ref)).index_select(0, flat)
    assert torch.allclose(out, expected, atol=1e-5)
    gx, gw = torch.autograd.grad(out.square().sum(), (x, w))
    rx, rw = torch.autograd.grad(expected.square().sum(), (x, w))
    assert torch.allclose(gx, rx, atol=1e-4) and torch.allclose(gw, rw, atol=1e-3)


@pytest.mark.parametrize("ndim", [2, 3])
def test_submanifold_matches_dense_conv_on_its_index_set(ndim, device):
    """Forward and backward (input and weight gradients) of spconv's submanifold conv on the device's
    algorithm (Native on CPU, MaskImplicitGemm on CUDA) against torch's dense conv on masked maps."""
    torch.manual_seed(0)
    size = (8, 7) if ndim == 2 else (5, 6, 4)
    conv = SparseConvWeight(ndim, 5, 4, 3).to(device)
    x = torch.randn(2, 5, *size, device=device)
    mask = torch.rand(2, 1, *size, device=device) < 0.4
    idx = mask_indices(mask)
    assert idx.is_contiguous() and idx.dtype == torch.int32
    rows = to_rows(channels_last(x)).index_select(0, flat_index(idx, size)).requires_grad_()
    out = conv.submanifold(spconv.SparseConvTensor(rows, idx, list(size), 2), "k").dense()
    dense_conv = F.conv2d if ndim == 2 else F.conv3d
    xs = x.clone().requires_grad_()
    ref = dense_conv(xs * mask, conv.dense_weight(), padding=1) * mask
    assert torch.allclose(out, ref, atol=1e-5)
    upstream = torch.randn_like(ref)
    grad_rows, grad_w = torch.autograd.grad((out * upstream).sum(), (rows, conv.weight))
    ref_x, ref_w = torch.autograd.grad((ref * upstream).sum(), (xs, conv.weight))
    assert torch.allclose(grad_rows, to_rows(channels_last(ref_x)).index_select(0, flat_index(idx, size)), atol=1e-5)
    assert torch.allclose(grad_w, ref_w, atol=1e-4)
    assert [n for n, _ in conv.named_parameters()] == ["weight"]  # spconv's module shares the one weight


def test_dilate_is_3x3_neighbourhood():
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    mask[0, 0, 0, 0] = True
    out = dilate(mask)
    assert out[0, 0].sum() == 4 and out[0, 0, :2, :2].all()


def test_submanifold_is_correct_with_two_threads():
    """spconv's CPU-only wheel gives wrong results with several threads; the CUDA wheel must not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        conv = SparseConvWeight(2, 16, 16, 3)
        x = torch.randn(2, 16, 40, 40)
        mask = torch.rand(2, 1, 40, 40) < 0.3
        idx = mask_indices(mask)
        rows = to_rows(channels_last(x)).index_select(0, flat_index(idx, (40, 40)))
        ref = F.conv2d(x * mask, conv.dense_weight(), padding=1) * mask
        with torch.no_grad():
            for _ in range(5):
                out = conv.submanifold(spconv.SparseConvTensor(rows, idx, [40, 40], 2), "k").dense()
                assert torch.allclose(out, ref, atol=1e-4)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("size", [(9, 7), (5, 4, 6)])
def test_gather_conv_computes_exact_output_set(size, device):
    """Outputs on one pixel set, inputs read from the whole map's rows or from another row set (in both, a
    missing neighbour reads a zero row)."""
    torch.manual_seed(0)
    ndim = len(size)
    x = torch.randn(2, 6, *size, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(5, *([3] * ndim), 6, dtype=torch.float64, device=device, requires_grad=True)  # spconv layout
    conv = F.conv2d if ndim == 2 else F.conv3d
    lay = map_layout(2, [size], device)
    out_mask = torch.rand(2, 1, *size, device=device) < 0.3
    out_flat = flat_index(mask_indices(out_mask), size)
    got = gather_conv(_padded_rows(x), w, lay.neighbours.index_select(0, out_flat))
    ref = conv(x, w.movedim(-1, 1), padding=1)
    expected = to_rows(channels_last(ref)).index_select(0, out_flat)
    assert torch.allclose(got, expected)
    gx, gw = torch.autograd.grad(got.sin().sum(), (x, w))
    rx, rw = torch.autograd.grad(expected.sin().sum(), (x, w))
    assert torch.allclose(gx, rx) and torch.allclose(gw, rw)

    # Inputs from a subset of rows (zeros elsewhere) through a position table, the others at its zero row.
    in_mask = dilate(out_mask) & (torch.rand(2, 1, *size, device=device) < 0.7)
    in_flat = flat_index(mask_indices(in_mask), size)
    zero = in_flat.shape[0]
    position = torch.full((lay.rows + 1,), zero, dtype=torch.int64, device=device)
    position[in_flat] = torch.arange(zero, device=device)
    table = position[lay.neighbours.index_select(0, out_flat)]
    assert (table == zero).any()
    got = gather_conv(_padded_rows(x.movedim(1, -1).reshape(-1, 6).index_select(0, in_flat).t()[None, :, :, None]),
                      w, table)
    ref = to_rows(channels_last(conv(x * in_mask, w.movedim(-1, 1), padding=1))).index_select(0, out_flat)
    assert torch.allclose(got, ref)
    gx, gw = torch.autograd.grad(got.sin().sum(), (x, w))
    rx, rw = torch.autograd.grad(ref.sin().sum(), (x, w))
    assert torch.allclose(gx, rx) and torch.allclose(gw, rw)


def test_gather_conv_without_outputs():
    w = torch.randn(3, 3, 3, 4, requires_grad=True)
    out = gather_conv(torch.randn(5, 4), w, torch.zeros(0, 9, dtype=torch.int64))
    assert out.shape == (0, 3)


def test_gather_conv_chunks_do_not_change_the_result(monkeypatch):
    """On CPU the gathered columns go through the GEMM in chunks; results and gradients do not depend on them."""
    import sparsehead.layers.sparse as sparse

    torch.manual_seed(0)
    x = torch.randn(50, 4, dtype=torch.float64)
    w = torch.randn(3, 3, 3, 4, dtype=torch.float64)
    table = torch.randint(0, 50, (40, 9))

    def run():
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = gather_conv(xs, ws, table)
        return (out, *torch.autograd.grad(out.cos().sum(), (xs, ws)))

    whole = run()
    monkeypatch.setattr(sparse, "_CPU_CHUNK_BYTES", 3 * 36 * 8)  # 3 rows per chunk
    assert len(sparse._chunks(40, 36 * 8, x.device)) == 14
    for a, b in zip(whole, run()):
        assert torch.allclose(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gather_conv_gemm_kernel_follows_dtype_and_flag(dtype, device, monkeypatch):
    """On CPU the forward GEMMs of float32 rows, and of bfloat16 rows where oneDNN has a bfloat16 GEMM for the
    CPU, run on oneDNN (unless torch.backends.mkldnn is disabled), the others on torch.mm; every kernel gives
    torch's conv at the rows, with gradients."""
    import sparsehead.layers.sparse as sparse

    if sparse._ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN linear")
    calls = []
    linear = sparse._ONEDNN_LINEAR

    def counted(*args):
        calls.append(args[0].shape)
        return linear(*args)

    monkeypatch.setattr(sparse, "_ONEDNN_LINEAR", counted)
    monkeypatch.setattr(sparse, "_CPU_CHUNK_BYTES", 5 * 9 * 16 * 4)  # several chunks
    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 7, device=device)
    w = torch.randn(8, 3, 3, 16, device=device) * 0.1
    out_flat = flat_index(mask_indices(torch.rand(2, 1, 9, 7, device=device) < 0.4), (9, 7))
    table = map_layout(2, [(9, 7)], device).neighbours.index_select(0, out_flat)
    expected = to_rows(channels_last(F.conv2d(x, w.movedim(-1, 1), padding=1))).index_select(0, out_flat)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5

    def run(enabled: bool):
        calls.clear()
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", enabled)
        xs, ws = _padded_rows(x).to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        got = gather_conv(xs, ws, table)
        assert got.dtype == dtype and got.shape == expected.shape
        assert torch.allclose(got.float(), expected, atol=tol, rtol=tol)
        gx, gw = torch.autograd.grad(got.float().square().sum(), (xs, ws))
        return gx.float(), gw.float(), len(calls)

    gx, gw, used = run(True)
    onednn = device.type == "cpu" and (dtype == torch.float32 or (
        dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    assert uses_onednn(x.to(dtype)) == onednn
    chunks = sparse._chunks(table.shape[0], 9 * 16 * torch.finfo(dtype).bits // 8, x.device)
    assert used == (len(chunks) if onednn else 0) and (len(chunks) > 1 or not onednn)
    rx, rw, used = run(False)
    assert used == 0
    assert torch.allclose(gx, rx, atol=10 * tol, rtol=10 * tol) and torch.allclose(gw, rw, atol=10 * tol, rtol=10 * tol)


def test_matmul_rows_uses_onednn_only_without_gradients(device, monkeypatch):
    import sparsehead.layers.sparse as sparse

    calls = []
    linear = sparse._ONEDNN_LINEAR
    if linear is None:
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(sparse, "_ONEDNN_LINEAR", lambda *args: calls.append(1) or linear(*args))
    torch.manual_seed(0)
    rows, right = torch.randn(40, 16, device=device), torch.randn(16, 27, device=device)
    expected = rows.double() @ right.double()
    with torch.no_grad():
        out = matmul_rows(rows, right.t().contiguous().t())  # a transposed right operand
    assert torch.allclose(out.double(), expected, atol=1e-5) and out.shape == (40, 27)
    assert len(calls) == (1 if uses_onednn(rows) else 0) and uses_onednn(rows) == (device.type == "cpu")
    calls.clear()
    right.requires_grad_()
    out = matmul_rows(rows, right)  # recorded for autograd: torch.matmul
    assert not calls and torch.allclose(out.double(), expected, atol=1e-5)
    (grad,) = torch.autograd.grad(out.sum(), right)
    assert torch.allclose(grad, rows.sum(0)[:, None].expand(16, 27), atol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_conv_rows_rulebooks_agree_with_dense_conv(ndim, device):
    """The depth path's one-conv kernel (the conv workload's) at chosen rows of a two-level pyramid: the
    gathered GEMM (exact) and spconv's submanifold conv on what it reads give torch's conv of each level."""
    from sparsehead.modeling.router import conv_rows

    torch.manual_seed(0)
    sizes = [(9, 7), (5, 4)] if ndim == 2 else [(5, 6, 4), (3, 3, 2)]
    maps = [torch.randn(2, 4, *s, device=device) for s in sizes]
    rows = SiteRows.from_maps(maps)
    conv = SparseConvWeight(ndim, 4, 3, 3).to(device)
    chosen = (torch.rand(rows.layout.rows, device=device) < 0.4).nonzero()[:, 0]
    dense = (F.conv2d if ndim == 2 else F.conv3d)
    expected = torch.cat([to_rows(channels_last(dense(m, conv.dense_weight(), padding=1))) for m in maps])
    for rulebook in ("exact", "submanifold"):
        out = conv_rows(conv, rows, chosen, rulebook)
        assert torch.allclose(out, expected.index_select(0, chosen), atol=1e-5), rulebook
