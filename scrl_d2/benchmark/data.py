"""The data path alone: the loader (``data``), the box-pair generator (``boxes``) and the
dataset index's start-up (``index``)."""
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable, List

import numpy as np
import torch

from ..data import build_pretrain_loader
from ..data.boxes import BoxPairGenerator
from ..data.augment import TwoViewAugmentation
from ..data.build import augment_on_device, uses_boxes
from ..data.datasets import PretrainCollate, PretrainDataset
from ..data.gpu_augment import BatchedAugmentation
from ..utils.errors import InputValueError
from .common import bench_device, release_geometries, settings, sync

__all__ = ["bench_boxes", "bench_data", "bench_index", "bench_per_core", "one_core"]


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
    """The loader alone (decode, two views, box pairs; with INPUT.AUGMENT_DEVICE split or
    device, also the device's part) at each worker count: one row each."""
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


@contextlib.contextmanager
def one_core():
    """This process on one CPU core with one torch thread (restored after): a per-core
    figure, whatever the machine."""
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    threads = torch.get_num_threads()
    if cores:
        os.sched_setaffinity(0, {min(cores)})
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if cores:
            os.sched_setaffinity(0, cores)


# The release's last two steps of a view, which ours leave to the device (uint8 views,
# normalised on the GPU): timed with and without them.
_TENSOR_STEPS = ("ToTensor", "Normalize")


def official_two_views(cfg, official: str, tensor_steps: bool = True) -> Callable[[str], object]:
    """The release's loading of one training image (torchvision's ImageFolder loader) and
    its two views (``augment.getters`` of the checkout ``official``, imported, as its
    ``MultiViewDataInjector`` applies them), for the recipe of ``cfg``; without
    ``tensor_steps`` its ToTensor and Normalize are left out (the views stay PIL images)."""
    from torchvision.datasets.folder import pil_loader

    sys.path.insert(0, os.path.expanduser(official))
    from augment.getters import get_simclr_transforms_for_view_1, get_simclr_transforms_for_view_2

    kw = dict(input_size=cfg.INPUT.CROP_SIZE, crop_scale=tuple(cfg.INPUT.CROP_SCALE),
              with_trans_info=uses_boxes(cfg))
    t1, t2 = get_simclr_transforms_for_view_1(**kw), get_simclr_transforms_for_view_2(**kw)
    if not tensor_steps:
        for t in (t1, t2):
            if tuple(type(s).__name__ for s in t.transforms[-len(_TENSOR_STEPS):]) != _TENSOR_STEPS:
                raise InputValueError(f"--official-scrl {official}: its views do not end in "
                                      f"{' + '.join(_TENSOR_STEPS)} (another version of the release?)")
            t.transforms = t.transforms[:-len(_TENSOR_STEPS)]

    def load(path: str):
        img = pil_loader(path)
        return t1(img), t2(img)
    return load


def bench_per_core(cfg, dicts: List[dict], rounds: int, official: str = "") -> List[dict]:
    """Images/s on one core of a worker's whole CPU data path, in alternating rounds on the
    same files (the median round of each):

    - ``scrl_d2 cpu``: read, decode, two views, and the batch's box pairs in the collate;
    - ``scrl_d2 split``: the same with the colour operations left to the device
      (INPUT.AUGMENT_DEVICE split): its CPU side;
    - with ``official`` (a checkout of kakaobrain/scrl): the release's read, decode and two
      views (its ToTensor and Normalize included; its box pairs, drawn later in the main
      process, and its collate not counted: in its favour); and the same without its
      ToTensor and Normalize (``vs_official_pil``: as if its workers, as ours, handed
      un-normalised views on)."""
    boxes = BoxPairGenerator.from_config(cfg) if uses_boxes(cfg) else None
    collate = PretrainCollate(boxes)
    batch = cfg.SOLVER.IMS_PER_GPU

    def ours(split: bool):
        dataset = PretrainDataset(dicts, TwoViewAugmentation.from_config(cfg), boxes,
                                  require_overlap=cfg.MODEL.SCRL.REQUIRE_OVERLAP,
                                  max_crop_tries=cfg.MODEL.SCRL.MAX_CROP_TRIES, jpeg_draft=cfg.INPUT.JPEG_DRAFT,
                                  exif_transpose=cfg.INPUT.EXIF_TRANSPOSE, photometric_on_device=split)

        def run(r: int) -> None:
            samples = []
            for i in range(len(dicts)):
                samples.append(dataset[(i, r * len(dicts) + i)])
                if len(samples) == batch or i == len(dicts) - 1:
                    collate(samples)
                    samples = []
        return run

    runs = {"scrl_d2 cpu": ours(False), "scrl_d2 split (CPU side)": ours(True)}
    if official:
        load = official_two_views(cfg, official)
        load_pil = official_two_views(cfg, official, tensor_steps=False)
        runs[f"official ({official})"] = lambda r: [load(d["file_name"]) for d in dicts]
        runs["official, PIL views (no ToTensor + Normalize)"] = lambda r: [load_pil(d["file_name"]) for d in dicts]
    times = {k: [] for k in runs}
    with one_core():
        for r in range(rounds + 1):  # round 0 warms the file cache and the code paths
            for name, run in runs.items():
                t = time.perf_counter()
                run(r)
                if r:
                    times[name].append(time.perf_counter() - t)
    rows = []
    st = {k: v for k, v in settings(cfg).items() if k not in ("workers", "augment_device")}  # one worker's work
    for name, ts in times.items():
        per_image = statistics.median(ts) / len(dicts)
        rows.append({"mode": "data", "settings": {**st, "generator": name, "cores": 1, "images": len(dicts),
                                                  "rounds": rounds},
                     "img_per_s_per_core": 1.0 / per_image, "ms_per_image": per_image * 1e3})
    if official:
        for row in rows[:2]:
            row["vs_official"] = row["img_per_s_per_core"] / rows[2]["img_per_s_per_core"]
            row["vs_official_pil"] = row["img_per_s_per_core"] / rows[3]["img_per_s_per_core"]
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
