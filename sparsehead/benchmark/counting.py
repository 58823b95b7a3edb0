"""Operator counts of a forward: the kernels it dispatches and the host reads it forces.

On a GPU at small batch sizes the number of kernel launches and of device-to-host reads, not the
arithmetic, sets the time of a forward. Both can be counted on any device, CPU included, because every
torch operator goes through the dispatcher::

    counts = count_ops(lambda: model(x))
    counts.kernels, counts.syncs, counts.by_op["nonzero"]

Rules (device-independent):

- ``kernels``: calls of torch operators (``func.overloadpacket.__name__``, as a
  :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees them below autograd), except those that
  launch no kernel: views and metadata changes (:data:`NO_KERNEL_OPS`: ``view``, ``permute``, ``select``,
  ``slice``, ``expand``, ``as_strided``, ``detach``, ``split``/``unbind`` and the like), allocations
  without initialisation (``empty*``), tensor literals (``lift_fresh``), the profiler's
  ``record_function`` markers, and ``_local_scalar_dense`` (the host read behind ``.item()``, a copy, not
  a kernel). An operator counts once, whatever it calls inside (``index`` with a boolean mask is one
  operator, not ``nonzero`` + ``index``). Kernels outside torch's dispatcher (spconv's own CUDA kernels)
  are not seen.
- ``syncs``: operations whose result size or value must reach the host before the program can go on:
  the operators in :data:`SYNC_OPS` (``nonzero``, ``masked_select``, ``unique`` variants, ``bincount``,
  ``equal``, ``_local_scalar_dense``, ...), ``repeat_interleave`` of a tensor of repeats without
  ``output_size``, indexing or index assignment with a boolean mask, copies from an accelerator to the
  CPU, and the tensor methods in :data:`HOST_READ_METHODS` (``.item()``, ``.tolist()``, ``.numpy()``,
  ``__array__``, ``bool(t)``, ``int(t)``, ``float(t)``, ``operator.index(t)``), seen by a
  :class:`~torch.overrides.TorchFunctionMode` because on a CPU tensor ``.tolist()`` and ``.numpy()``
  dispatch no operator. A host-read method counts once: the operators it dispatches (``.item()``'s
  ``_local_scalar_dense``, ``.tolist()``'s copy to the CPU) add no further sync.

``by_op`` counts every kernel operator and every sync by name (a ``nonzero`` appears once in it, and
counts in both ``kernels`` and ``syncs``; ``.item()`` appears as ``item``). Only the calling thread is
counted.

A compiled function runs its own fused kernels, which no dispatcher sees: :func:`count_launches` counts
the kernels of any run, compiled or not, from the profiler's record of it::

    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):  # CPU: before compiling
        compiled = torch.compile(model)
        compiled(x)
    count_launches(lambda: compiled(x))

On CUDA it counts the kernel launches the CUDA runtime records (every kernel: torch's, Triton's, cuBLAS',
spconv's). On a CPU it counts the kernels inductor generated (they appear in the profiler only when
compiled with ``cpp.enable_kernel_profile``) and the torch operators the run calls, by the rules of
``kernels`` above: the outermost operator that launches a kernel counts once, composite operators
(``matmul``, ``to``) count as the operators they call. For an eager run on a CPU it equals
``count_ops(fn).kernels``.
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "OpCounts", "OpCounter", "count_ops", "count_launches", "NO_KERNEL_OPS", "SYNC_OPS", "HOST_READ_METHODS",
]

# Operators that launch no kernel: views, metadata and layout changes that share storage, allocations
# without initialisation, tensor literals and profiler markers.
NO_KERNEL_OPS = frozenset({
    # views
    "view", "_unsafe_view", "_reshape_alias", "reshape_alias", "as_strided", "permute", "transpose", "t",
    "select", "slice", "narrow", "unsqueeze", "squeeze", "expand", "diagonal", "unfold", "alias",
    "detach", "split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes", "unbind", "chunk",
    "tensor_split", "movedim", "view_as", "view_as_real", "view_as_complex", "real", "imag", "_conj",
    "_neg_view", "indices", "values", "_indices", "_values", "crow_indices", "col_indices",
    "ccol_indices", "row_indices", "lift", "lift_fresh",
    # in-place metadata changes
    "as_strided_", "transpose_", "t_", "squeeze_", "unsqueeze_", "detach_", "resize_", "resize_as_",
    "set_", "_resize_output_",
    # allocations without initialisation
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted",
    # metadata queries
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_has_same_storage_numel",
    # the host read of a scalar: a copy to the host, counted under syncs
    "_local_scalar_dense",
    # profiler markers (record_function)
    "_record_function_enter", "_record_function_enter_new", "_record_function_exit",
})

# Operators whose output size or value the host must read.
SYNC_OPS = frozenset({
    "nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
    "unique_dim_consecutive", "_local_scalar_dense", "bincount", "equal", "_linalg_check_errors",
})

_MASK_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"})
_COPY_OPS = frozenset({"_to_copy", "copy_", "_copy_from"})

_HOST_READ_NAMES = ("item", "tolist", "numpy", "__array__", "__bool__", "__int__", "__float__", "__index__")
HOST_READ_METHODS = frozenset(getattr(torch.Tensor, name) for name in _HOST_READ_NAMES)


@dataclass(frozen=True)
class OpCounts:
    """Counts of one run (rules in the module docstring).

    ``kernels``: kernel operators; ``syncs``: host reads; ``by_op``: every kernel operator and host read
    by name; ``sync_ops``: the host reads by name.
    """

    kernels: int = 0
    syncs: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    sync_ops: dict[str, int] = field(default_factory=dict)

    def sync_summary(self) -> str:
        """The host reads by name, most frequent first, e.g. ``"nonzero:120 item:36"`` ("" if none)."""
        return " ".join(f"{k}:{v}" for k, v in sorted(self.sync_ops.items(), key=lambda kv: (-kv[1], kv[0])))


def _is_mask(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def _is_sync(name: str, args: tuple, kwargs: dict) -> bool:
    if name in SYNC_OPS:
        return True
    if name == "repeat_interleave":
        # The Tensor-of-repeats overload sums the repeats on the host unless output_size is given.
        output_size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
        return isinstance(args[0], torch.Tensor) and output_size is None
    if name in _MASK_INDEX_OPS:
        indices = kwargs.get("indices", args[1] if len(args) > 1 else ())
        return any(_is_mask(t) for t in (indices or ()))
    if name in _COPY_OPS:  # a copy from an accelerator to the CPU waits for the device
        if name == "_to_copy":
            src, dst = args[0], kwargs.get("device")
        elif name == "copy_":
            src, dst = args[1], args[0].device
        else:  # _copy_from(self, dst)
            src, dst = args[0], args[1].device
        return (
            isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta")
            and dst is not None and torch.device(dst).type == "cpu"
        )
    return False


class _Tally:
    def __init__(self) -> None:
        self.kernels: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.host_read_depth = 0  # > 0 while a host-read method runs: its operators add no sync


class _Dispatch(TorchDispatchMode):
    def __init__(self, tally: _Tally) -> None:
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL_OPS:
            self.tally.kernels[name] += 1
        if not self.tally.host_read_depth and _is_sync(name, args, kwargs):
            self.tally.syncs[name] += 1
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, tally: _Tally) -> None:
        super().__init__()
        self.tally = tally

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in HOST_READ_METHODS:
            return func(*args, **kwargs)
        if not self.tally.host_read_depth:
            self.tally.syncs[func.__name__] += 1
        self.tally.host_read_depth += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.tally.host_read_depth -= 1


class OpCounter:
    """Context manager counting kernels and syncs in its block: ``with OpCounter() as c: ...; c.counts()``."""

    def __init__(self) -> None:
        self._tally = _Tally()
        self._modes: list[Any] = []

    def __enter__(self) -> OpCounter:
        self._modes = [_Function(self._tally), _Dispatch(self._tally)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
        self._modes = []

    def counts(self) -> OpCounts:
        """The counts so far."""
        t = self._tally
        by_op = Counter(t.kernels)
        for name, n in t.syncs.items():
            if name not in by_op:  # a nonzero is one call: counted in both totals, listed once
                by_op[name] = n
        return OpCounts(sum(t.kernels.values()), sum(t.syncs.values()), dict(sorted(by_op.items())), dict(t.syncs))


def count_ops(fn: Callable[[], Any]) -> OpCounts:
    """Run ``fn()`` once and count its kernels and host reads (see the module docstring for the rules).

    Grad mode is the caller's: wrap the call in ``torch.no_grad()`` to count an inference forward.
    """
    with OpCounter() as counter:
        fn()
    return counter.counts()


# CUDA (and ROCm) runtime calls that launch one kernel each, as the profiler records them.
_LAUNCH_CALLS = frozenset({
    "cudaLaunchKernel", "cudaLaunchKernelExC", "cudaLaunchCooperativeKernel", "cuLaunchKernel",
    "cuLaunchKernelEx", "hipLaunchKernel", "hipExtLaunchKernel", "hipModuleLaunchKernel",
    "hipExtModuleLaunchKernel",
})
_GENERATED_KERNEL = "cpp_fused"  # inductor's C++ kernels are named cpp_fused_<ops>_<n>


@functools.cache
def _calls_only_others(name: str) -> bool:
    """Whether the operator ``aten::name`` launches no kernel of its own, only through the operators it
    calls: ``resolve_conj`` / ``resolve_neg`` (a copy only for a conjugated or negated view), or a
    composite operator, one whose default overload is composite or, without one, every overload
    (``matmul``, ``linear``, ``to``; ``index_select`` is not, although its Dimname overload is)."""
    op = name[len("aten::"):]
    if op in ("resolve_conj", "resolve_neg"):
        return True
    packet = getattr(torch.ops.aten, op, None)
    names = packet.overloads() if packet is not None else []
    found = []
    for overload in ["default"] if "default" in names else names:
        try:
            found.append(getattr(packet, overload).has_kernel_for_dispatch_key("CompositeImplicitAutograd"))
        except RuntimeError:  # an overload TorchScript knows but the dispatcher does not
            pass
    return bool(found) and all(found)


def _cpu_kernels(event: FunctionEvent, tally: Counter) -> None:
    name = event.name
    if _GENERATED_KERNEL in name:
        tally[name] += 1
        return
    if name.startswith("aten::") and not _calls_only_others(name):
        op = name[len("aten::"):]
        if op not in NO_KERNEL_OPS:
            tally[op] += 1
        return  # what a kernel operator calls inside is part of it
    for child in event.cpu_children:
        _cpu_kernels(child, tally)


def count_launches(fn: Callable[[], Any]) -> Counter:
    """Run ``fn()`` once under the profiler and count the kernels it launches (rules in the module
    docstring), by name: the operator or generated kernel on a CPU, the runtime call that launched it on
    CUDA. ``sum(counts.values())`` is the total. CUDA is synchronised before and after."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    tally: Counter = Counter()
    launches = [e.name for e in events if e.name in _LAUNCH_CALLS]
    if launches:  # the runtime saw every kernel, whoever launched it
        tally.update(launches)
        return tally
    for event in events:
        if event.cpu_parent is None:
            _cpu_kernels(event, tally)
    return tally
