"""Data loading whose order is a pure function of (seed, iteration, rank).

The training stream is the concatenation of per-epoch permutations of the dataset (epoch ``e``
shuffled with ``seed`` and ``e``); iteration ``i`` takes the ``ims_per_batch`` positions
``[i * B, (i + 1) * B)`` of that stream and rank ``r`` the ``r``-th contiguous share of them. Each
sample also carries its own seed, so random augmentation does not depend on worker scheduling. A run
resumed at iteration ``i`` therefore sees exactly the batches the uninterrupted run saw.
"""

import random
import signal
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

__all__ = ["IterationBatchSampler", "SeededDataset", "build_train_loader", "build_test_loader"]


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: leave SIGINT and SIGTERM (sent to the whole process group by Ctrl-C and by
    cluster schedulers) to the main process, which stops after the current iteration; the workers end when
    the loader is shut down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

_MIX = 1_000_003


class SeededDataset(Dataset):
    """Wraps a dataset so that ``ds[(index, seed)]`` draws its randomness from ``seed`` alone.

    The global Python/numpy/torch generators are left as they were.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Tuple[int, int]) -> Any:
        index, seed = item
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class IterationBatchSampler(Sampler[List[Tuple[int, int]]]):
    """Yields, for iterations ``start_iter .. max_iter - 1``, this rank's list of (index, seed)."""

    def __init__(
        self,
        size: int,
        ims_per_batch: int,
        seed: int,
        start_iter: int,
        max_iter: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        if ims_per_batch % world_size != 0:
            raise ValueError(
                f"solver.ims_per_batch={ims_per_batch} is not divisible by the number of processes "
                f"({world_size})"
            )
        self.size = size
        self.ims_per_batch = ims_per_batch
        self.per_rank = ims_per_batch // world_size
        self.seed = seed
        self.start_iter = start_iter
        self.max_iter = max_iter
        self.rank = rank
        self._perms: Dict[int, torch.Tensor] = {}

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(self.seed * _MIX + epoch)
            perm = torch.randperm(self.size, generator=g)
            self._perms = {epoch: perm}  # positions only move forward: keep one epoch
        return int(perm[offset])

    def batch(self, iteration: int) -> List[Tuple[int, int]]:
        start = iteration * self.ims_per_batch + self.rank * self.per_rank
        return [
            (self._index(p), (self.seed * _MIX + p) % 2**63) for p in range(start, start + self.per_rank)
        ]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for it in range(self.start_iter, self.max_iter):
            yield self.batch(it)

    def __len__(self) -> int:
        return max(0, self.max_iter - self.start_iter)


def build_train_loader(
    dataset: Dataset,
    collate_fn: Any,
    ims_per_batch: int,
    seed: int,
    start_iter: int,
    max_iter: int,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    sampler = IterationBatchSampler(len(dataset), ims_per_batch, seed, start_iter, max_iter, rank, world_size)
    return DataLoader(
        SeededDataset(dataset), batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
        worker_init_fn=ignore_stop_signals if num_workers else None,
    )


def build_test_loader(
    dataset: Dataset,
    collate_fn: Any,
    ims_per_batch: int,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """In-order loader over this rank's share (``rank::world_size``) of ``dataset``."""
    shard = Subset(dataset, list(range(rank, len(dataset), world_size)))
    batch = max(1, ims_per_batch // world_size)
    return DataLoader(
        shard, batch_size=batch, shuffle=False, collate_fn=collate_fn, num_workers=num_workers,
        worker_init_fn=ignore_stop_signals if num_workers else None,
    )
