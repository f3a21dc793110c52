#!/usr/bin/env python
"""Throughput figures for SCRL and BYOL pretraining (figures, not pass/fail).

    python tools/benchmark.py train --config-file configs/scrl_pretrain.yaml     # the real loop, JPEGs from disk
    python tools/benchmark.py model --config-file configs/scrl_pretrain.yaml     # batches already on the device
    python tools/benchmark.py data  --config-file configs/scrl_pretrain.yaml --workers 1 4 8 16
    python tools/benchmark.py boxes --official-scrl ~/src/scrl                   # box pairs per 256 images
    python tools/benchmark.py parity --config-file configs/scrl_pretrain.yaml    # speed options: same loss?

``train`` runs PretrainTrainer's own step (loader, transfer, forward, backward, LARS,
EMA) on a folder of JPEGs (``--data``; by default a generated folder of 500x375 JPEGs,
the size of an average ImageNet photograph). ``model`` feeds tensors already on the
device. ``data`` times the loader alone (decode, two views, box pairs; with
INPUT.AUGMENT_DEVICE device, also the device rendering). ``boxes`` times the box-pair
generator per 256 images on one core, and the official generator when given its
checkout. ``parity`` runs a few steps with each speed option and with the plain path
(fp32, NCHW, eager) from the same weights and batches and compares the losses, and checks
structurally that every box pair is pooled from its image and rectangle at that option's
dtype (``pooling_exact``; see scrl_d2.modeling.audit).
Figures are medians over steady-state steps after warm-up; an image is one pair of
views. Config overrides go last (KEY VALUE ...), e.g. SOLVER.AMP.DTYPE float16
MODEL.CHANNELS_LAST False MODEL.COMPILE.ENABLED True. ``--json FILE`` writes the
headline row (mode, device, torch, settings, img_per_s, step_ms_median, peak_mem_gib,
box_ms_per_256, as they apply) with every row under ``rows``.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import List

import numpy as np
import torch
from tabulate import tabulate

from scrl_d2.config import get_cfg
from scrl_d2.data import build_pretrain_loader
from scrl_d2.data.augment import random_resized_crop_params
from scrl_d2.data.boxes import BoxPairGenerator
from scrl_d2.data.build import augment_on_device
from scrl_d2.data.demo import write_synthetic_jpegs
from scrl_d2.data.gpu_augment import BatchedAugmentation
from scrl_d2.engine.trainer import (
    PretrainTrainer,
    amp_dtype,
    build_forward,
    build_grad_scaler,
    optimization_step,
)
from scrl_d2.modeling import build_model
from scrl_d2.modeling.audit import audit_pooling
from scrl_d2.solver import build_optimizer


def machine() -> str:
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} / {cpu}"
    return f"CPU only ({cpu}, {torch.get_num_threads()} torch threads)"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def settings(cfg, **extra) -> dict:
    return {"arch": cfg.MODEL.META_ARCHITECTURE, "depth": cfg.MODEL.RESNETS.DEPTH, "batch": cfg.SOLVER.IMS_PER_GPU,
            "input": cfg.INPUT.CROP_SIZE, "amp": str(amp_dtype(cfg, torch.device(_device()))).replace("torch.", ""),
            "channels_last": cfg.MODEL.CHANNELS_LAST, "compile": cfg.MODEL.COMPILE.ENABLED,
            "workers": cfg.DATALOADER.NUM_WORKERS, "augment_device": cfg.INPUT.AUGMENT_DEVICE, **extra}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def release_geometries(n: int, cfg, seed: int = 0, size=(500, 375)):
    """View pairs as the data path draws them: RandomResizedCrop of a 500x375 image."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(2 * n):
        t, left, h, w = random_resized_crop_params(size[0], size[1], cfg.INPUT.CROP_SCALE, cfg.INPUT.CROP_RATIO, g)
        rows.append([t, left, h, w, float(torch.rand((), generator=g) < 0.5)])
    a = np.array(rows, dtype=np.float64)
    return a[:n], a[n:]


# ----------------------------------------------------------------------------- boxes
def bench_boxes(cfg, iters: int, official: str):
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


# ----------------------------------------------------------------------------- data
def bench_data(cfg, workers, iters: int, warmup: int):
    rows = []
    device = torch.device(_device())
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


# ----------------------------------------------------------------------------- model
def synthetic_batch(cfg, device: torch.device, seed: int = 0) -> dict:
    """A batch as the loader delivers it (uint8 views, box pairs, pair indices), on the device."""
    batch = cfg.SOLVER.IMS_PER_GPU
    S = cfg.INPUT.CROP_SIZE
    g = torch.Generator().manual_seed(seed)
    g1, g2 = release_geometries(batch, cfg, seed)
    b1, b2, valid = BoxPairGenerator.from_config(cfg)(g1, g2, np.random.default_rng(seed))
    data = {"view1": torch.randint(0, 255, (batch, 3, S, S), dtype=torch.uint8, generator=g),
            "view2": torch.randint(0, 255, (batch, 3, S, S), dtype=torch.uint8, generator=g),
            "boxes1": torch.from_numpy(b1), "boxes2": torch.from_numpy(b2), "box_valid": torch.from_numpy(valid),
            "label": torch.zeros(batch, dtype=torch.long),
            "pair_index": torch.from_numpy(np.flatnonzero(valid.reshape(-1)))}
    return {k: v.to(device) for k, v in data.items()}


def run_steps(cfg, batches, warmup: int = 0, state=None):
    """The trainer's optimisation step (forward, backward, LARS, EMA) on ready batches,
    synchronised per step: per-step seconds after ``warmup``, losses and the peak
    memory. ``state``: start from these weights."""
    device = torch.device(_device())
    torch.manual_seed(0)
    model = build_model(cfg).to(device)  # no classes given: no probe (it costs ~nothing anyway)
    if state is not None:
        model.load_state_dict(state)
    if cfg.MODEL.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    forward = build_forward(cfg, model)
    opt = build_optimizer(cfg, model)
    dtype = amp_dtype(cfg, device)
    scaler = build_grad_scaler(dtype, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i, data in enumerate(batches):
        sync()
        t = time.perf_counter()
        out = optimization_step(forward, model, opt, scaler, data, dtype, device, momentum=0.99)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
        losses.append(float(sum(v for k, v in out.items() if k.startswith("loss"))))
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    return times, losses, peak


def bench_model(cfg, iters: int, warmup: int):
    data = synthetic_batch(cfg, torch.device(_device()))
    times, _, peak = run_steps(cfg, [data] * (warmup + iters), warmup)
    step = statistics.median(times)
    row = {"mode": "model", "settings": settings(cfg), "img_per_s": cfg.SOLVER.IMS_PER_GPU / step,
           "step_ms_median": step * 1e3}
    if peak is not None:
        row["peak_mem_gib"] = peak
    return [row]


# ----------------------------------------------------------------------------- parity
PARITY_VARIANTS = {
    "channels_last": (["MODEL.CHANNELS_LAST", "True"], 1e-3),
    "bf16": (["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "bfloat16"], 5e-2),
    "fp16": (["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "float16"], 5e-2),
    "bf16+channels_last": (["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "bfloat16",
                            "MODEL.CHANNELS_LAST", "True"], 5e-2),
    "bf16+channels_last+compile": (["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "bfloat16",
                                    "MODEL.CHANNELS_LAST", "True", "MODEL.COMPILE.ENABLED", "True"], 5e-2),
}


def pooling_check(cfg, batch: dict, state: dict) -> dict:
    """The structural check of scrl_d2.modeling.audit at ``cfg``'s dtype and memory format
    (eager): every RoI reaches the kernel with its intended image and rectangle, and every
    pooled unit comes from its image. A loss tolerance cannot see a misread box."""
    device = torch.device(_device())
    model = build_model(cfg).to(device)
    model.load_state_dict(state)
    if cfg.MODEL.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    return audit_pooling(model, batch, amp_dtype(cfg, device), device).as_dict()


def bench_parity(cfg, steps: int, variants):
    """Each speed option against the plain path (fp32, NCHW, eager) from the same weights
    on the same batches: the per-step losses must agree within the option's tolerance,
    and every box must be pooled from its image and rectangle (``pooling_check``)."""
    device = torch.device(_device())
    plain = cfg.clone()
    plain.merge_from_list(["SOLVER.AMP.ENABLED", "False", "MODEL.CHANNELS_LAST", "False",
                           "MODEL.COMPILE.ENABLED", "False"])
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in build_model(plain).state_dict().items()}
    batches = [synthetic_batch(cfg, device, seed=s) for s in range(steps)]
    _, ref, _ = run_steps(plain, batches, state=state)
    rows = [{"mode": "parity", "settings": {"variant": "plain", **settings(plain)}, "losses": ref, "max_rel_diff": 0.0,
             "pooling": pooling_check(plain, batches[0], state)}]
    for name in variants:
        opts, tol = PARITY_VARIANTS[name]
        c = plain.clone()
        c.merge_from_list(opts)
        _, got, _ = run_steps(c, batches, state=state)
        diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got, ref))
        rows.append({"mode": "parity", "settings": {"variant": name, **settings(c)}, "losses": got,
                     "max_rel_diff": diff, "tolerance": tol, "same_loss": diff <= tol,
                     "pooling": pooling_check(c, batches[0], state)})
    return rows


# ----------------------------------------------------------------------------- train
def bench_train(cfg, iters: int, warmup: int, window: int = 5, with_model: bool = False):
    """The trainer's real step on real files. Synchronises only every ``window`` steps
    (so the loader and the GPU overlap as in training) and reports per-step medians."""
    c = cfg.clone()
    c.defrost()
    c.OUTPUT_DIR = tempfile.mkdtemp(prefix="scrl_bench_")
    c.DATASETS.TEST = ()
    c.TEST.EVAL_PERIOD = 0
    c.KNN.PERIOD = 0
    c.LOG_PERIOD = 10 ** 9  # no logging syncs inside the measured steps
    c.MODEL.PROBE.ENABLED = False
    c.SEED = max(c.SEED, 0)
    trainer = PretrainTrainer(c)
    device = trainer.device
    it, epoch = iter(trainer.loader), 0

    def step():
        nonlocal it, epoch
        try:
            batch = next(it)
        except StopIteration:
            epoch += 1
            trainer.sampler.set_epoch(epoch)
            it = iter(trainer.loader)
            batch = next(it)
        trainer.run_step(batch, 0.0)
        trainer.iter += 1
        trainer.pop_window()

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    per_step = []
    t_all = time.perf_counter()
    for _ in range(max(1, iters // window)):
        t = time.perf_counter()
        for _ in range(window):
            step()
        sync()
        per_step.append((time.perf_counter() - t) / window)
    total = time.perf_counter() - t_all
    n_steps = len(per_step) * window
    row = {"mode": "train", "settings": settings(c, data=c.DATASETS.TRAIN[0]),
           "img_per_s": n_steps * c.SOLVER.IMS_PER_GPU / total, "step_ms_median": statistics.median(per_step) * 1e3}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    if with_model:  # the same settings fed from device tensors: how much the data path costs
        del trainer, it
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model_row = bench_model(c, iters, warmup)[0]
        row["model_img_per_s"] = model_row["img_per_s"]
        row["fraction_of_model"] = row["img_per_s"] / model_row["img_per_s"]
    return [row]


# ----------------------------------------------------------------------------- main
def flat(row: dict) -> dict:
    s = row.get("settings", {})
    keep = {k: v for k, v in s.items() if k in ("arch", "depth", "batch", "input", "amp", "channels_last",
                                                  "compile", "workers", "augment_device", "generator")}
    return {**keep, **{k: v for k, v in row.items() if k not in ("mode", "settings")}}


def _list_classes(root: str) -> float:
    """Seconds one process takes to list ``root`` (imports excluded)."""
    from scrl_d2.data.catalog import class_folder_dicts
    from scrl_d2.data.index import set_index_cache_dir

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

    from scrl_d2.data.catalog import class_folder_dicts
    from scrl_d2.data.index import set_index_cache_dir

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["train", "model", "data", "boxes", "parity", "index"])
    p.add_argument("--config-file", default="configs/scrl_pretrain.yaml")
    p.add_argument("--archs", nargs="+", default=None, help="meta-architectures (default: the config's)")
    p.add_argument("--batch", type=int, default=0, help="images per step (default: SOLVER.IMS_PER_GPU)")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="data mode: loader worker counts (default: 1, 2, 4 ... up to the cores)")
    p.add_argument("--data", default="", help="a folder of images for train/data (default: generated JPEGs)")
    p.add_argument("--num-images", type=int, default=4096, help="size of the generated JPEG folder")
    p.add_argument("--cache-dir", default="", help="where the generated JPEG folder is kept (default: the system "
                                                   "temporary folder, $TMPDIR)")
    p.add_argument("--iters", type=int, default=20, help="measured steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--with-model", action="store_true",
                   help="train mode: also run model mode at the same settings and report the fraction")
    p.add_argument("--official-scrl", default="", help="boxes mode: a checkout of kakaobrain/scrl to compare with")
    p.add_argument("--variants", nargs="+", choices=sorted(PARITY_VARIANTS), default=None,
                   help="parity mode: options to compare with the plain path (default: all; "
                        "without a GPU all but fp16 and compile)")
    p.add_argument("--index-files", type=int, default=128000, help="index mode: files in the generated tree")
    p.add_argument("--index-procs", type=int, default=8, help="index mode: processes listing at once (before)")
    p.add_argument("--json", default="", help="write the headline row and all rows to this file")
    p.add_argument("opts", nargs="*", help="config overrides, KEY VALUE")
    args = p.parse_intermixed_args()
    if args.official_scrl and not os.path.isfile(os.path.join(os.path.expanduser(args.official_scrl),
                                                               "models", "box_generator.py")):
        p.error(f"--official-scrl {args.official_scrl}: no models/box_generator.py there "
                "(expected a checkout of kakaobrain/scrl)")

    base = get_cfg()
    base.merge_from_file(args.config_file)
    base.merge_from_list(args.opts)
    archs = args.archs or [base.MODEL.META_ARCHITECTURE]
    if args.mode in ("train", "data"):
        folder = args.data
        if not folder:
            folder = os.path.join(args.cache_dir or tempfile.gettempdir(), f"scrl_bench_jpegs_{args.num_images}")
            print(f"JPEG folder: {folder} ({args.num_images} generated 500x375 JPEGs, written once and reused; "
                  "--cache-dir moves it, --data uses your own images)", flush=True)
            write_synthetic_jpegs(folder, args.num_images)
        base.merge_from_list(["DATASETS.TRAIN", f"('images:{folder}',)"])
    if args.batch:
        base.merge_from_list(["SOLVER.IMS_PER_GPU", str(args.batch)])
    if not torch.cuda.is_available():
        base.merge_from_list(["MODEL.DEVICE", "cpu"])
    rows = []
    if args.mode == "index":
        folder = os.path.join(args.cache_dir or tempfile.gettempdir(), f"scrl_bench_tree_{args.index_files}")
        print(f"class-folder tree: {folder} ({args.index_files} empty files, written once and reused)", flush=True)
        rows = bench_index(folder, args.index_files, args.index_procs)
        archs = []
    for arch in archs:
        cfg = base.clone()
        cfg.merge_from_list(["MODEL.META_ARCHITECTURE", arch])
        if args.mode == "boxes":
            rows += bench_boxes(cfg, max(args.iters, 20), args.official_scrl)
            break
        if args.mode == "data":
            workers = args.workers or sorted({1, 2, 4, 8, 12, 16} & set(range(1, (os.cpu_count() or 1) + 1)))
            rows += bench_data(cfg, workers, args.iters, args.warmup)
        elif args.mode == "model":
            rows += bench_model(cfg, args.iters, args.warmup)
        elif args.mode == "parity":
            variants = args.variants or [v for v in PARITY_VARIANTS
                                         if torch.cuda.is_available() or v in ("channels_last", "bf16",
                                                                                "bf16+channels_last")]
            rows += bench_parity(cfg, max(2, min(args.iters, 5)), variants)
        else:
            rows += bench_train(cfg, args.iters, args.warmup, with_model=args.with_model)
    env = {"device": machine(), "torch": torch.__version__}
    print(f"{args.mode}: {env['device']}; torch {env['torch']}; config {args.config_file} {' '.join(args.opts)}")
    if args.mode == "parity":
        print(tabulate([{"variant": r["settings"]["variant"], "losses": " ".join(f"{v:.5f}" for v in r["losses"]),
                         "max_rel_diff": f"{r['max_rel_diff']:.2e}", "same_loss": r.get("same_loss", ""),
                         "rois": r["pooling"]["rois"], "wrong_image": r["pooling"]["wrong_image"],
                         "wrong_rect": r["pooling"]["wrong_rectangle"],
                         "units_wrong": r["pooling"]["units_wrong_image"], "pooling_exact": r["pooling"]["ok"]}
                        for r in rows], headers="keys", tablefmt="github"))
    else:
        print(tabulate([flat(r) for r in rows], headers="keys", floatfmt=".2f", tablefmt="github"))
    if args.json:
        if args.mode == "parity":
            headline = {"settings": {"variants": [r["settings"]["variant"] for r in rows[1:]]},
                        "same_loss": all(r.get("same_loss", True) for r in rows),
                        "pooling_exact": all(r["pooling"]["ok"] for r in rows),
                        "max_rel_diff": max(r["max_rel_diff"] for r in rows)}
        else:
            headline = max(rows, key=lambda r: r.get("img_per_s", 0.0)) if args.mode != "boxes" else rows[0]
        out = {"mode": args.mode, **env, **{k: v for k, v in headline.items() if k != "mode"},
               "config": args.config_file, "opts": args.opts, "rows": [{**env, **r} for r in rows]}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
