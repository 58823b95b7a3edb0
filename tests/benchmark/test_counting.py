"""Kernel and host-read counts on small functions whose operators are counted by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.profiler import record_function

from sparsehead.benchmark.counting import OpCounter, count_launches, count_ops


def _x() -> torch.Tensor:
    return torch.arange(-3.0, 3.0).view(2, 3)


def test_elementwise_chain():
    x = _x()
    c = count_ops(lambda: (x + 1).relu().sum())  # add, relu, sum
    assert (c.kernels, c.syncs) == (3, 0)
    assert c.by_op == {"add": 1, "relu": 1, "sum": 1}
    assert c.sync_summary() == ""


def test_views_launch_no_kernel():
    x = _x()
    # view, permute, unsqueeze, expand, t, split: no kernel; contiguous of a permuted tensor: one clone.
    c = count_ops(lambda: (x.reshape(3, 2).permute(1, 0).contiguous(), x.flatten().unsqueeze(0).expand(2, 6),
                           x.t(), x.chunk(3, dim=1), x[:, 1:], x[0]))
    assert (c.kernels, c.syncs) == (1, 0)
    assert c.by_op == {"clone": 1}


def test_profiler_labels_are_not_counted():
    x = _x()

    def fn():
        with record_function("sparsehead.gate"):
            return x * 2

    assert count_ops(fn).by_op == {"mul": 1}


def test_scalar_reads_count_once():
    x = _x()
    c = count_ops(lambda: x.sum().item())  # sum; item (its _local_scalar_dense is not a second read)
    assert (c.kernels, c.syncs) == (1, 1)
    assert c.sync_ops == {"item": 1}
    c = count_ops(lambda: (bool(x.any()), int(x[0, 0]), float(x.max())))  # any, max; three reads
    assert (c.kernels, c.syncs) == (2, 3)
    assert c.sync_ops == {"__bool__": 1, "__int__": 1, "__float__": 1}


def test_host_copies_without_operators_are_syncs():
    x = _x()
    c = count_ops(lambda: (x.tolist(), x.numpy(), np.asarray(x)))  # numpy's detach is a view
    assert (c.kernels, c.syncs) == (0, 3)
    assert c.sync_ops == {"tolist": 1, "numpy": 1, "__array__": 1}


def test_data_dependent_sizes_are_syncs():
    x = _x()
    mask = x > 0
    repeats = torch.tensor([1, 2])

    def fn():
        x[mask]  # index with a boolean mask: 1 kernel, 1 read
        x.nonzero()  # 1 kernel, 1 read
        torch.unique(x)  # _unique2: 1 kernel, 1 read
        x.masked_select(mask)  # 1 kernel, 1 read
        torch.repeat_interleave(x, repeats, dim=0)  # repeat_interleave (read) + index_select
        torch.repeat_interleave(x, repeats, dim=0, output_size=3)  # the same without the read
        x[torch.tensor([1, 0])]  # index with integers: 1 kernel, no read
        x.index_select(0, torch.tensor([1]))  # 1 kernel

    c = count_ops(fn)
    assert c.kernels == 1 + 1 + 1 + 1 + 2 + 2 + 1 + 1
    assert c.syncs == 5
    assert c.sync_ops == {"index": 1, "nonzero": 1, "_unique2": 1, "masked_select": 1, "repeat_interleave": 1}
    assert c.by_op["index"] == 2 and c.by_op["repeat_interleave"] == 2 and c.by_op["index_select"] == 3


def test_boolean_mask_assignment_is_a_sync():
    y = _x()
    mask = y > 0
    c = count_ops(lambda: y.__setitem__(mask, 0.0))  # index_put_ with a mask
    assert (c.kernels, c.syncs) == (1, 1) and c.sync_ops == {"index_put_": 1}


def test_small_module_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 25, 2)).eval()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        c = count_ops(lambda: model(x))
    # convolution, native_group_norm, relu, (flatten: a view), addmm (the linear layer; its weight's
    # transpose is a view).
    assert c.by_op == {"convolution": 1, "native_group_norm": 1, "relu": 1, "addmm": 1}
    assert (c.kernels, c.syncs) == (4, 0)
    # The profiler's count of the same forward follows the same rules.
    with torch.no_grad():
        assert count_launches(lambda: model(x)) == c.by_op


def test_launches_of_an_eager_run_follow_the_dispatcher_rules():
    x = _x()
    # matmul and to() are composite: counted as the mm and the copy they call; a to() to the same dtype,
    # views and the profiler's labels launch nothing.
    def fn():
        with record_function("sparsehead.gate"):
            return (x @ x.t()).relu().to(torch.float64), x.to(torch.float32), x.t()[0]

    assert count_launches(fn) == count_ops(fn).by_op == {"mm": 1, "relu": 1, "_to_copy": 1}


def test_launches_of_elementwise_ops_on_the_device(device):
    """One kernel per elementwise operator, counted on a CPU from the operators and on CUDA from the
    runtime's launches."""
    x = torch.randn(1000, device=device)
    (x + 1).relu()
    assert sum(count_launches(lambda: x + 1).values()) == 1
    assert sum(count_launches(lambda: (x + 1).relu()).values()) == 2


@pytest.mark.slow
def test_launches_of_a_compiled_run_are_its_fused_kernels():
    """Inductor fuses an elementwise chain into one generated kernel, which the profiler then records."""
    import torch._inductor.config

    x = torch.randn(64, 64)
    eager = lambda: ((x * 2).sin() + 1).mm(x)  # noqa: E731
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        compiled = torch.compile(eager)
        compiled()
        counts = count_launches(compiled)
    assert sum(count_launches(eager).values()) == 4  # mul, sin, add, mm
    generated = [k for k in counts if "cpp_fused" in k]
    assert len(generated) == 1 and counts[generated[0]] == 1
    assert counts["mm"] == 1 and sum(counts.values()) == 2


def test_counter_context_and_nesting_restored():
    x = _x()
    with OpCounter() as counter:
        x + x
        bool(x.all())
    c = counter.counts()
    assert (c.kernels, c.syncs) == (2, 1)
    # Nothing is counted after the block.
    x * x
    assert counter.counts() == c


@pytest.mark.parametrize("grad", [False, True])
def test_counts_do_not_depend_on_grad_mode_for_a_forward(grad):
    w = torch.ones(3, requires_grad=True)
    x = _x()
    with torch.set_grad_enabled(grad):
        c = count_ops(lambda: (x * w).sum())
    assert (c.kernels, c.syncs) == (2, 0)
