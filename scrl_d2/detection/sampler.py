"""The fine-tuning data order, resumable at any iteration, for both fine-tuning paths.

Detectron2's ``TrainingSampler`` restarts its stream when a run resumes, so a resumed run
sees other images than an uninterrupted one. Here batch ``k`` of every process is a
function of (seed, rank, world size, k) only, and every image's augmentation draws come
from its own seed (:class:`SeededItems`): a run resumed at iteration ``k`` trains on
exactly the batches, flips and scales an uninterrupted run would have.
"""
import random
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.datasets import sample_seed
from ..data.workers import loader_worker_signals
from ..utils import comm

__all__ = ["TrainingBatches", "SeededItems", "ignore_stop_signals"]


class TrainingBatches(torch.utils.data.Sampler):
    """Endless per-process batches of ``(index, seed)`` pairs from iteration ``start_iter``.

    Each pass over the dataset is a permutation shared by all processes (seeded by the run
    seed and the pass), each process taking every ``world``-th image; each occurrence of an
    image gets its own augmentation seed. With ``buckets`` (Detectron2's
    ASPECT_RATIO_GROUPING: 0 landscape, 1 portrait per image) a batch is the first bucket
    to fill. With ``repeat_factors`` (Detectron2's RepeatFactorTrainingSampler, LVIS) each
    pass holds image ``i`` floor(r_i) or ceil(r_i) times (stochastic rounding, drawn from
    the pass's seed). Resuming replays the index stream without reading any image."""

    def __init__(self, size: int, batch_size: int, seed: int, start_iter: int = 0,
                 buckets: Optional[Sequence[int]] = None, rank: Optional[int] = None, world: Optional[int] = None,
                 repeat_factors: Optional[Sequence[float]] = None):
        if seed < 0:
            raise ValueError(f"TrainingBatches: seed must be >= 0, got {seed} (default_setup resolves SEED -1)")
        if size <= 0 or batch_size <= 0:
            raise ValueError(f"TrainingBatches: {size} images, batch size {batch_size}: both must be > 0")
        self.size, self.batch_size, self.seed, self.start_iter = size, batch_size, seed, start_iter
        self.buckets = list(buckets) if buckets is not None else None
        self.rank = comm.get_rank() if rank is None else rank
        self.world = comm.get_world_size() if world is None else world
        self.repeat_factors = None
        if repeat_factors is not None:
            self.repeat_factors = torch.as_tensor(repeat_factors, dtype=torch.float32)
            if len(self.repeat_factors) != size or not bool((self.repeat_factors > 0).all()):
                raise ValueError(f"TrainingBatches: {len(self.repeat_factors)} repeat factors for {size} images; "
                                 "one per image, each > 0")

    def _stream(self) -> Iterator[Tuple[int, int]]:
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1 & 0xFFFFFFFF))
            if self.repeat_factors is None:
                order = torch.randperm(self.size, generator=g).tolist()
            else:
                r = self.repeat_factors
                counts = r.trunc() + (torch.rand(len(r), generator=g) < r - r.trunc()).float()
                items = torch.repeat_interleave(torch.arange(len(r)), counts.long())
                order = items[torch.randperm(len(items), generator=g)].tolist()
            for position in range(self.rank, len(order), self.world):
                yield order[position], sample_seed(self.seed, epoch, position)
            epoch += 1

    def _batches(self) -> Iterator[List[Tuple[int, int]]]:
        if self.buckets is None:
            batch: List[Tuple[int, int]] = []
            for item in self._stream():
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
        pending: List[List[Tuple[int, int]]] = [[], []]
        for item in self._stream():
            bucket = pending[self.buckets[item[0]]]
            bucket.append(item)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        batches = self._batches()
        for _ in range(self.start_iter):  # indices only: no image is read
            next(batches)
        yield from batches


class SeededItems(torch.utils.data.Dataset):
    """``dataset[index]`` with python's, numpy's and torch's global generators seeded by
    the item's own seed (restored afterwards): Detectron2's augmentations draw from
    numpy's, the torchvision path's flip from torch's. Indexed by ``(index, seed)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        index, seed = key
        state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            torch.manual_seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(state[0])
                np.random.set_state(state[1])


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A loader worker's ``worker_init_fn``: SLURM (and torchrun's agent, ``kill -- -PGID``)
    signals every process of a job, loader workers included; a worker leaves the stop to the
    trainer (which checkpoints and ends its workers) instead of dying and failing the run
    (:func:`~scrl_d2.data.workers.loader_worker_signals`)."""
    loader_worker_signals(worker_id)
