"""The fine-tuning data order (scrl_d2/detection/sampler.py): a run resumed at iteration k
trains on exactly the batches and augmentation draws an uninterrupted run would."""
import itertools
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from scrl_d2.detection.sampler import SeededItems, TrainingBatches

pytestmark = pytest.mark.plain

BUCKETS = [0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0]


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("buckets", [None, BUCKETS], ids=["plain", "aspect-grouped"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_resumed_stream_continues_the_uninterrupted_one(buckets, world):
    for rank in range(world):
        full = _take(TrainingBatches(11, 2, seed=5, buckets=buckets, rank=rank, world=world), 40)
        for start in (1, 7, 23):
            resumed = _take(TrainingBatches(11, 2, seed=5, start_iter=start, buckets=buckets, rank=rank,
                                            world=world), 40 - start)
            assert resumed == full[start:]


def test_each_pass_is_one_permutation_shared_by_the_processes():
    """Within a pass over the data the processes take disjoint images that cover it; every
    occurrence of an image has its own augmentation seed."""
    world, size = 2, 10
    per_rank = [[item for b in _take(TrainingBatches(size, 1, seed=3, rank=r, world=world), size) for item in b]
                for r in range(world)]
    first_pass = [i for r in range(world) for i, _ in per_rank[r][:size // world]]
    assert sorted(first_pass) == list(range(size))
    seeds = [s for r in range(world) for _, s in per_rank[r]]
    assert len(set(seeds)) == len(seeds)


def test_grouped_batches_hold_one_orientation_and_seed_changes_the_order():
    batches = _take(TrainingBatches(11, 3, seed=0, buckets=BUCKETS, rank=0, world=1), 30)
    assert all(len({BUCKETS[i] for i, _ in b}) == 1 for b in batches)
    other = _take(TrainingBatches(11, 3, seed=1, buckets=BUCKETS, rank=0, world=1), 30)
    assert batches != other


class _Draws(torch.utils.data.Dataset):
    """What an augmentation would draw: numpy's, python's and torch's global generators."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        import random

        return i, float(np.random.rand()), random.random(), float(torch.rand(()))


def test_seeded_items_draw_from_the_items_seed_and_leave_the_callers_generators_alone():
    ds = SeededItems(_Draws())
    torch.manual_seed(0)
    np.random.seed(0)
    before = (float(torch.rand(())), float(np.random.rand()))
    torch.manual_seed(0)
    np.random.seed(0)
    a = ds[(2, 12345)]
    b = ds[(2, 12345)]
    c = ds[(2, 54321)]
    assert a == b and a[1:] != c[1:]
    assert (float(torch.rand(())), float(np.random.rand())) == before  # the caller's streams are untouched


class _Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        import time

        time.sleep(0.3)
        return i


def test_loader_workers_survive_the_stop_signals_sent_to_every_process():
    """SLURM and torchrun's agent signal every process of a job, loader workers too: a
    fine-tuning loader's worker must not die of SIGUSR1 / SIGUSR2 / SIGTERM from them (the
    trainer stops after its step), and still ends when its loader is done."""
    import os

    from scrl_d2.detection.sampler import ignore_stop_signals

    loader = torch.utils.data.DataLoader(_Slow(), batch_size=1, num_workers=1, worker_init_fn=ignore_stop_signals)
    it = iter(loader)
    got = [int(next(it))]
    worker = it._workers[0]
    for s in (signal.SIGUSR1, signal.SIGUSR2):
        os.kill(worker.pid, s)
    # SIGTERM from another process than its parent (the parent's own SIGTERM still ends it)
    r = subprocess.run([sys.executable, "-c", f"import os, signal; os.kill({worker.pid}, signal.SIGTERM)"])
    assert r.returncode == 0
    got += [int(b) for b in it]
    assert got == list(range(6)) and worker.exitcode in (0, None)
