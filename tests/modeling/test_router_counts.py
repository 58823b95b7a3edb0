"""The router's operator contract, counted on the CPU: at most two host reads per sparse forward whatever the
number of levels, none in the dense mode, and a sparse operator count that grows little with the levels."""
import pytest
import torch

from sparsehead import Router
from sparsehead.benchmark.counting import count_ops
from sparsehead.benchmark.patterns import blob_mask, fixed_gates


def _counts(mode: str, levels: int, make_pyramid):
    router = Router(16, gn_groups=4, execution=mode).eval()
    feats = make_pyramid(2, 16, (40, 56), levels, seed=3)
    with torch.no_grad(), fixed_gates(router, lambda shape: blob_mask(shape, 0.3, blob_size=3)):
        router(feats)
        return count_ops(lambda: router(feats))


@pytest.mark.parametrize("levels", [1, 3, 5])
def test_host_reads_per_forward(levels, make_pyramid):
    # One read for both scale units (none with a single level: no neighbours) and one for the depth path.
    assert _counts("sparse", levels, make_pyramid).syncs == (2 if levels > 1 else 1)
    assert _counts("dense", levels, make_pyramid).syncs == 0


def test_sparse_operators_do_not_scale_with_levels(make_pyramid):
    three, five = (_counts("sparse", n, make_pyramid).kernels for n in (3, 5))
    assert five <= 1.1 * three, (three, five)


@pytest.mark.parametrize("levels", [3, 5])
def test_sparse_dispatches_fewer_operators_than_dense(levels, make_pyramid):
    # Both scale units run as one set of pairs: the sparse mode's bookkeeping costs fewer operators than the
    # dense mode's per-level kernels.
    assert _counts("sparse", levels, make_pyramid).kernels < _counts("dense", levels, make_pyramid).kernels
