"""The data path alone: the loader (``data``), the box-pair generator (``boxes``) and the
dataset index's start-up (``index``)."""
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import List

import numpy as np
import torch

from ..data import build_pretrain_loader
from ..data.boxes import BoxPairGenerator
from ..data.build import augment_on_device
from ..data.gpu_augment import BatchedAugmentation
from .common import bench_device, release_geometries, settings, sync

__all__ = ["bench_boxes", "bench_data", "bench_index"]


def bench_boxes(cfg, iters: int, official: str = "") -> List[dict]:
    """The box-pair generator per 256 images on one core; with ``official`` (a checkout of
    kakaobrain/scrl) also the release's generator on the same view pairs."""
    g1, g2 = release_geometries(256, cfg)
    gen = BoxPairGenerator.from_config(cfg)
    rng = np.random.default_rng(0)

    def median_ms(fn, n):
        fn()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    ours = median_ms(lambda: gen(g1, g2, rng), iters)
    one = median_ms(lambda: gen(g1[:1], g2[:1], rng), iters)
    row = {"mode": "boxes", "settings": {"generator": "scrl_d2 (batched, in the loader's collate)",
                                          "images": 256, "input": cfg.INPUT.CROP_SIZE,
                                          "num_boxes": cfg.MODEL.SCRL.NUM_BOXES},
           "box_ms_per_256": ours, "ms_per_image_alone": one}
    rows = [row]
    if official:
        sys.path.insert(0, os.path.expanduser(official))
        from models.box_generator import SCRLBoxGenerator  # the official release's module

        s = cfg.MODEL.SCRL
        off = SCRLBoxGenerator(cfg.INPUT.CROP_SIZE, s.MIN_SIZE, s.NUM_BOXES, s.BOX_JITTER, s.BOX_JITTER_RATIO,
                               s.IOU_THRESHOLD, s.GRID_BASED)
        transf = [torch.from_numpy(g1).float(), torch.from_numpy(g2).float()]
        ms = median_ms(lambda: off.generate(transf), max(3, iters // 10))
        rows.append({"mode": "boxes", "settings": {"generator": f"official ({official})", "images": 256},
                     "box_ms_per_256": ms})
        row["speedup_vs_official"] = ms / ours
    return rows


def bench_data(cfg, workers, iters: int, warmup: int) -> List[dict]:
    """The loader alone (decode, two views, box pairs; with INPUT.AUGMENT_DEVICE device,
    also the device rendering) at each worker count: one row each."""
    rows = []
    device = bench_device()
    for w in workers:
        c = cfg.clone()
        c.defrost()
        c.DATALOADER.NUM_WORKERS = w
        c.SEED = max(c.SEED, 0)
        loader, sampler, _ = build_pretrain_loader(c, 0)
        render = BatchedAugmentation.from_config(c, device) if augment_on_device(c) else None
        it, epoch, times = iter(loader), 0, []
        for i in range(warmup + iters):
            t = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                epoch += 1
                sampler.set_epoch(epoch)
                it = iter(loader)
                b = next(it)
            if render is not None:
                render(b)
                sync()
            if i >= warmup:
                times.append(time.perf_counter() - t)
        del it, loader
        step = statistics.median(times)
        rows.append({"mode": "data", "settings": settings(c), "img_per_s": c.SOLVER.IMS_PER_GPU / step,
                     "step_ms_median": step * 1e3})
    return rows


def _list_classes(root: str) -> float:
    """Seconds one process takes to list ``root`` (imports excluded)."""
    from ..data.catalog import class_folder_dicts
    from ..data.index import set_index_cache_dir

    set_index_cache_dir(None)
    t = time.perf_counter()
    class_folder_dicts(root)
    return time.perf_counter() - t


def bench_index(folder: str, num_files: int, procs: int) -> List[dict]:
    """Dataset-index start-up: one process listing a class-folder tree of ``num_files``
    (empty) files; ``procs`` processes each listing it at once, the slowest one's time
    (before: every process of a job listed); listing and writing the cache, and reading
    it (after: the main process lists or reads the cache, the others receive it)."""
    import multiprocessing as mp

    from ..data.catalog import class_folder_dicts
    from ..data.index import set_index_cache_dir

    per_class = 128
    classes = max(1, num_files // per_class)
    if not os.path.isdir(os.path.join(folder, f"c{classes - 1:04d}")):
        for c in range(classes):
            d = os.path.join(folder, f"c{c:04d}")
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                open(os.path.join(d, f"img_{c:04d}_{i:05d}.JPEG"), "w").close()
    n = classes * per_class
    one = _list_classes(folder)
    with mp.get_context("spawn").Pool(procs) as pool:
        pool.map(_list_classes, [folder] * procs)  # imports and a warm directory cache
        every = max(pool.map(_list_classes, [folder] * procs, chunksize=1))  # all at once: the slowest
    cache = tempfile.mkdtemp(prefix="scrl_index_")
    set_index_cache_dir(cache)
    t = time.perf_counter()
    class_folder_dicts(folder)  # lists and writes the cache
    write = time.perf_counter() - t
    t = time.perf_counter()
    assert len(class_folder_dicts(folder)) == n  # reads it
    read = time.perf_counter() - t
    set_index_cache_dir(None)
    shutil.rmtree(cache)
    return [{"mode": "index", "files": n, "classes": classes, "one_process_lists_s": one,
             f"{procs}_processes_list_s": every, "list_and_cache_s": write, "cached_read_s": read}]
