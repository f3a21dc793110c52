#!/usr/bin/env python
"""Throughput figures for SCRL and BYOL (figures, not pass/fail).

    python tools/benchmark.py boxes                      # box-pair generation, ms per image / per 256
    python tools/benchmark.py data  --config-file configs/demo/scrl_demo.yaml --workers 0 2
    python tools/benchmark.py model --config-file configs/scrl_pretrain.yaml --batch 256
    python tools/benchmark.py all   --config-file configs/demo/scrl_demo.yaml

``model`` times full training steps (forward, backward, LARS, EMA) on batches already on
the device; ``data`` times the real loader (decode, two views, box pairs). Medians over
steady-state steps after warm-up; peak GPU memory where a GPU is present.
"""
import argparse
import contextlib
import json
import platform
import statistics
import time

import numpy as np
import torch
from tabulate import tabulate

from scrl_d2.config import get_cfg
from scrl_d2.data import build_pretrain_loader
from scrl_d2.data.boxes import BoxPairGenerator
from scrl_d2.engine.trainer import amp_dtype
from scrl_d2.modeling import build_model
from scrl_d2.solver import build_optimizer


def machine() -> str:
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} / {cpu}"
    return f"CPU only ({cpu})"


def bench_boxes(cfg, iters: int):
    gen = BoxPairGenerator.from_config(cfg)
    rng = np.random.default_rng(0)
    S = cfg.INPUT.CROP_SIZE
    r = np.random.default_rng(1)

    def geoms(n):
        hw = r.uniform(0.45, 1.0, (n, 2)) * 375
        return np.concatenate([r.uniform(0, 1, (n, 2)) * (375 - hw), hw, r.integers(0, 2, (n, 1))], 1)

    rows = []
    for batch in (1, 256):
        g1, g2 = geoms(batch), geoms(batch)
        gen(g1, g2, rng)
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            gen(g1, g2, rng)
            times.append(time.perf_counter() - t)
        ms = statistics.median(times) * 1e3
        rows.append({"mode": "boxes", "images per call": batch, "ms per call": ms, "ms per image": ms / batch,
                     "box_ms_per_256": ms * 256 / batch, "input": S})
    return rows


def bench_data(cfg, workers, iters: int):
    rows = []
    for w in workers:
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = w
        cfg.DATALOADER.PERSISTENT_WORKERS = False
        loader, sampler, _ = build_pretrain_loader(cfg, 0)
        it, n = iter(loader), 0
        next(it)  # warm-up: workers started
        t = time.perf_counter()
        for _ in range(iters):
            try:
                b = next(it)
            except StopIteration:
                sampler.set_epoch(sampler.epoch + 1)
                it = iter(loader)
                b = next(it)
            n += b["view1"].shape[0]
        rows.append({"mode": "data", "arch": cfg.MODEL.META_ARCHITECTURE, "workers": w,
                     "img_per_s": n / (time.perf_counter() - t)})
    return rows


def bench_model(cfg, batch: int, iters: int, warmup: int):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg).to(device)  # no classes given: no probe (it costs ~nothing anyway)
    if cfg.MODEL.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg, model)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    S = cfg.INPUT.CROP_SIZE
    gen = BoxPairGenerator.from_config(cfg)
    g = np.array([[0, 0, 300, 300, 0]] * batch, float)
    b1, b2, valid = gen(g, g + np.array([40, 30, -40, -30, 1.0]), np.random.default_rng(0))
    data = {"view1": torch.randint(0, 255, (batch, 3, S, S), dtype=torch.uint8),
            "view2": torch.randint(0, 255, (batch, 3, S, S), dtype=torch.uint8),
            "boxes1": torch.from_numpy(b1), "boxes2": torch.from_numpy(b2), "box_valid": torch.from_numpy(valid),
            "label": torch.zeros(batch, dtype=torch.long)}
    data = {k: v.to(device) for k, v in data.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            out = model(data)
        loss = sum(v for k, v in out.items() if k.startswith("loss"))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        model.update_target(0.99)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    row = {"mode": "model", "arch": cfg.MODEL.META_ARCHITECTURE, "depth": cfg.MODEL.RESNETS.DEPTH, "batch": batch,
           "input": S, "amp": str(dtype), "step_ms_median": step * 1e3, "img_per_s": batch / step}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return [row]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["boxes", "data", "model", "all"])
    p.add_argument("--config-file", default="configs/demo/scrl_demo.yaml")
    p.add_argument("--archs", nargs="+", default=["SCRL", "BYOL"])
    p.add_argument("--batch", type=int, default=0, help="model mode batch (default: SOLVER.IMS_PER_GPU)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default="", help="also write the rows to this file")
    p.add_argument("opts", nargs="*", help="config overrides, KEY VALUE")
    args = p.parse_intermixed_args()
    rows = []
    for arch in args.archs:
        cfg = get_cfg()
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts + ["MODEL.META_ARCHITECTURE", arch])
        if args.mode in ("boxes", "all") and arch == "SCRL":
            rows += bench_boxes(cfg, max(args.iters, 20))
        if args.mode in ("data", "all"):
            rows += bench_data(cfg, args.workers, args.iters)
        if args.mode in ("model", "all"):
            rows += bench_model(cfg, args.batch or cfg.SOLVER.IMS_PER_GPU, args.iters, args.warmup)
    env = {"device": machine(), "torch": torch.__version__, "config": args.config_file}
    print(f"machine: {env['device']}; torch {env['torch']}; config {args.config_file}")
    for mode in dict.fromkeys(r["mode"] for r in rows):
        print(tabulate([{k: v for k, v in r.items() if k != "mode"} for r in rows if r["mode"] == mode],
                       headers="keys", floatfmt=".2f", tablefmt="github"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
