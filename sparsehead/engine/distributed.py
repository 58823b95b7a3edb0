"""Process helpers: initialisation from torchrun's environment, rank queries, gathers, CPU settings."""

import os
from typing import Any, List, Tuple

import torch
import torch.distributed as dist

from ..utils.allocator import tune_allocator

__all__ = [
    "init_distributed",
    "destroy_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "all_gather_object",
    "all_reduce_mean",
    "resolve_device",
    "configure_cpu",
]


def configure_cpu(num_threads: int, cpu_allocator: str) -> str:
    """This process's CPU settings: ``torch.set_num_threads`` when ``num_threads`` > 0, and the C allocator
    (:func:`~sparsehead.utils.allocator.tune_allocator`). Returns the allocator in words, for the log."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    return tune_allocator(cpu_allocator)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; use device=cpu")
    return torch.device(name)


def init_distributed(device: torch.device) -> Tuple[int, int, torch.device]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns (rank, world, device).

    Uses nccl for CUDA and gloo for CPU; on CUDA each process takes the GPU of its ``LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if _active() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if _active() and get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> List[Any]:
    """List of ``obj`` from every rank (a one-element list without a process group)."""
    if not _active() or get_world_size() == 1:
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (``t`` itself without a process group)."""
    if not _active() or get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / get_world_size()
