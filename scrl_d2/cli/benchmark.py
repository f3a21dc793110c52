"""Throughput figures for SCRL and BYOL pretraining (figures, not pass/fail).

    python tools/benchmark.py train --config-file configs/scrl_pretrain.yaml     # the real loop, JPEGs from disk
    python tools/benchmark.py model --config-file configs/scrl_pretrain.yaml     # batches already on the device
    python tools/benchmark.py data  --config-file configs/scrl_pretrain.yaml --workers 1 4 8 16
    python tools/benchmark.py data  --per-core --official-scrl ~/src/scrl          # per core, side by side
    python tools/benchmark.py boxes --official-scrl ~/src/scrl                   # box pairs per 256 images
    python tools/benchmark.py parity --config-file configs/scrl_pretrain.yaml    # speed options: same loss?

``train`` runs PretrainTrainer's own step (loader, transfer, forward, backward, LARS,
EMA) on a folder of JPEGs (``--data``; by default a generated folder of 500x375 JPEGs,
the size of an average ImageNet photograph). ``model`` feeds tensors already on the
device. ``data`` times the loader alone (decode, two views, box pairs; with
INPUT.AUGMENT_DEVICE split or device, also the device's part); with ``--per-core`` it times one
worker's whole CPU path on one core (images/s per core) over ``--per-core-images`` files,
and with ``--official-scrl`` also the release's loading and two views from its checkout on
the same files, in alternating rounds, and prints the ratios (``vs_official``; ``vs_official_pil``
against the release's views without its ToTensor + Normalize, which ours leave to the device). ``boxes`` times the box-pair
generator per 256 images on one core, and the official generator when given its
checkout. ``parity`` runs a few steps with each speed option and with the plain path
(fp32, NCHW, eager) from the same weights and batches and compares the losses, and checks
structurally that every box pair is pooled from its image and rectangle at that option's
dtype (``pooling_exact``; see scrl_d2.modeling.audit).
Figures are medians over steady-state steps after warm-up; an image is one pair of
views. Config overrides go last (KEY VALUE ...), e.g. SOLVER.AMP.DTYPE float16
MODEL.CHANNELS_LAST False MODEL.COMPILE.ENABLED True. ``--json FILE`` writes the
headline row (mode, device, torch, settings, img_per_s, step_ms_median, peak_mem_gib,
box_ms_per_256, as they apply; data --per-core: the default path's row, with
img_per_s_per_core, vs_official and vs_official_pil) with every row under ``rows``.
"""
import argparse
import json
import os
import sys
import tempfile
from typing import List

import torch
from tabulate import tabulate

from scrl_d2.benchmark import (
    PARITY_VARIANTS,
    bench_boxes,
    bench_data,
    bench_index,
    bench_model,
    bench_parity,
    bench_per_core,
    bench_train,
    default_parity_variants,
    machine,
)
from scrl_d2.config import get_cfg
from scrl_d2.data.demo import write_synthetic_jpegs
from scrl_d2.engine.defaults import EXIT_BAD_INPUT, ArgumentParser
from scrl_d2.utils.errors import is_bad_input

MODES = ["train", "model", "data", "boxes", "parity", "index"]


def argument_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=MODES)
    p.add_argument("--config-file", default="configs/scrl_pretrain.yaml")
    p.add_argument("--archs", nargs="+", default=None, help="meta-architectures (default: the config's)")
    p.add_argument("--batch", type=int, default=0, help="images per step (default: SOLVER.IMS_PER_GPU)")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="data mode: loader worker counts (default: 1, 2, 4 ... up to the cores)")
    p.add_argument("--data", default="", help="a folder of images for train/data (default: generated JPEGs)")
    p.add_argument("--num-images", type=int, default=None,
                   help="size of the generated JPEG folder (default: 4096; data --per-core: --per-core-images, "
                        "the same first files)")
    p.add_argument("--cache-dir", default="", help="where the generated JPEG folder is kept (default: the system "
                                                   "temporary folder, $TMPDIR)")
    p.add_argument("--iters", type=int, default=20, help="measured steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--with-model", action="store_true",
                   help="train mode: also run model mode at the same settings and report the fraction")
    p.add_argument("--official-scrl", default="", help="boxes and data --per-core: a checkout of kakaobrain/scrl "
                                                       "to compare with (imported, side by side)")
    p.add_argument("--per-core", action="store_true", help="data mode: one core's images/s of the whole CPU path "
                                                           "(with --official-scrl: the release's too, and the ratio)")
    p.add_argument("--per-core-images", type=int, default=256, help="data --per-core: files per round")
    p.add_argument("--rounds", type=int, default=5, help="data --per-core: measured rounds (median)")
    p.add_argument("--variants", nargs="+", choices=sorted(PARITY_VARIANTS), default=None,
                   help="parity mode: options to compare with the plain path (default: all; "
                        "without a GPU all but fp16 and compile)")
    p.add_argument("--index-files", type=int, default=128000, help="index mode: files in the generated tree")
    p.add_argument("--index-procs", type=int, default=8, help="index mode: processes listing at once (before)")
    p.add_argument("--json", default="", help="write the headline row and all rows to this file")
    p.add_argument("opts", nargs="*", help="config overrides, KEY VALUE")
    return p


def flat(row: dict) -> dict:
    """A row as one table line: the settings worth a column, then the figures."""
    s = row.get("settings", {})
    keep = {k: v for k, v in s.items() if k in ("arch", "depth", "batch", "input", "amp", "channels_last",
                                                  "compile", "workers", "cores", "augment_device", "generator")}
    return {**keep, **{k: v for k, v in row.items() if k not in ("mode", "settings")}}


def table(mode: str, rows: List[dict]) -> str:
    if mode == "parity":
        return tabulate([{"variant": r["settings"]["variant"], "losses": " ".join(f"{v:.5f}" for v in r["losses"]),
                          "max_rel_diff": f"{r['max_rel_diff']:.2e}", "same_loss": r.get("same_loss", ""),
                          "rois": r["pooling"]["rois"], "wrong_image": r["pooling"]["wrong_image"],
                          "wrong_rect": r["pooling"]["wrong_rectangle"],
                          "units_wrong": r["pooling"]["units_wrong_image"], "pooling_exact": r["pooling"]["ok"]}
                         for r in rows], headers="keys", tablefmt="github")
    return tabulate([flat(r) for r in rows], headers="keys", floatfmt=".2f", tablefmt="github")


def summary(mode: str, rows: List[dict], env: dict, config_file: str, opts: List[str]) -> dict:
    """What ``--json`` writes: the headline row (parity: the verdicts) with every row under ``rows``."""
    if mode == "parity":
        headline = {"settings": {"variants": [r["settings"]["variant"] for r in rows[1:]]},
                    "same_loss": all(r.get("same_loss", True) for r in rows),
                    "pooling_exact": all(r["pooling"]["ok"] for r in rows),
                    "max_rel_diff": max(r["max_rel_diff"] for r in rows)}
    else:
        # boxes and data --per-core: the first row (ours; per core: the default path)
        per_row = mode == "boxes" or "img_per_s_per_core" in rows[0]
        headline = rows[0] if per_row else max(rows, key=lambda r: r.get("img_per_s", 0.0))
    return {"mode": mode, **env, **{k: v for k, v in headline.items() if k != "mode"},
            "config": config_file, "opts": opts, "rows": [{**env, **r} for r in rows]}


# Options and the runs that read them: given where nothing reads them, they would be
# silently ignored (compared with their defaults).
_APPLIES = {
    "official_scrl": (lambda a: a.mode in ("boxes", "data"), "boxes and data mode"),
    "per_core": (lambda a: a.mode == "data", "data mode"),
    "workers": (lambda a: a.mode == "data" and not a.per_core, "data mode without --per-core"),
    "rounds": (lambda a: a.per_core, "data --per-core"),
    "per_core_images": (lambda a: a.per_core, "data --per-core"),
    "with_model": (lambda a: a.mode == "train", "train mode"),
    "variants": (lambda a: a.mode == "parity", "parity mode"),
    "data": (lambda a: a.mode in ("train", "data"), "train and data mode"),
    "num_images": (lambda a: a.mode in ("train", "data") and not a.data, "train and data mode without --data"),
    "cache_dir": (lambda a: a.mode in ("train", "data", "index") and not a.data, "train, data and index mode "
                                                                                  "without --data"),
    "warmup": (lambda a: a.mode in ("train", "model", "data") and not a.per_core, "train, model and data mode "
                                                                                  "without --per-core"),
    "iters": (lambda a: a.mode != "index" and not a.per_core, "every mode but index and data --per-core"),
    "index_files": (lambda a: a.mode == "index", "index mode"),
    "index_procs": (lambda a: a.mode == "index", "index mode"),
    "archs": (lambda a: a.mode != "index", "every mode but index"),
}


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One line and exit status 2 for arguments the run cannot use (argparse's ``error``)."""
    for dest, (applies, where) in _APPLIES.items():
        if getattr(args, dest) != p.get_default(dest) and not applies(args):
            p.error(f"--{dest.replace('_', '-')} applies to {where} only")
    if args.num_images is None:
        args.num_images = args.per_core_images if args.per_core else 4096
    for dest in ("iters", "per_core_images", "rounds", "index_files", "index_procs", "num_images"):
        if getattr(args, dest) < 1:
            p.error(f"argument --{dest.replace('_', '-')}: {getattr(args, dest)}: expected 1 or more")
    for dest in ("batch", "warmup"):  # --batch 0: the config's SOLVER.IMS_PER_GPU
        if getattr(args, dest) < 0:
            p.error(f"argument --{dest}: {getattr(args, dest)}: expected 0 or more")
    if args.per_core and not args.data and args.num_images < args.per_core_images:
        p.error(f"--num-images {args.num_images}: fewer than --per-core-images {args.per_core_images} (the files "
                "each round reads)")
    if any(w < 0 for w in args.workers or ()):
        p.error(f"argument --workers: {' '.join(map(str, args.workers))}: expected worker counts of 0 "
                "(the main process) or more")
    needs = {"boxes": "models/box_generator.py", "data": "augment/getters.py"}.get(args.mode)
    if args.official_scrl and needs and not os.path.isfile(os.path.join(os.path.expanduser(args.official_scrl),
                                                                        needs)):
        p.error(f"--official-scrl {args.official_scrl}: no {needs} there (expected a checkout of kakaobrain/scrl)")
    if args.mode == "data" and args.official_scrl and not args.per_core:
        p.error("--official-scrl with data mode compares one core of each: add --per-core")
    if not os.path.isfile(args.config_file):
        p.error(f"--config-file {args.config_file}: no such file")
    if args.data and not os.path.isdir(args.data):
        p.error(f"--data {args.data}: no such folder (expected a folder of images)")


def main(argv=None) -> int:
    p = argument_parser()
    args = p.parse_intermixed_args(argv)
    check_arguments(p, args)
    try:
        return run(args)
    except Exception as e:
        if not is_bad_input(e):  # a bug or an unexpected library error: its traceback
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


def run(args: argparse.Namespace) -> int:
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
        if args.mode == "data" and args.per_core:
            from scrl_d2.data import DatasetCatalog

            dicts = DatasetCatalog.get(f"images:{folder}")[:args.per_core_images]
            rows += bench_per_core(cfg, dicts, args.rounds, args.official_scrl)
        elif args.mode == "data":
            workers = args.workers or sorted({1, 2, 4, 8, 12, 16} & set(range(1, (os.cpu_count() or 1) + 1)))
            rows += bench_data(cfg, workers, args.iters, args.warmup)
        elif args.mode == "model":
            rows += bench_model(cfg, args.iters, args.warmup)
        elif args.mode == "parity":
            rows += bench_parity(cfg, max(2, min(args.iters, 5)), args.variants or default_parity_variants())
        else:
            rows += bench_train(cfg, args.iters, args.warmup, with_model=args.with_model)
    env = {"device": machine(), "torch": torch.__version__}
    print(f"{args.mode}: {env['device']}; torch {env['torch']}; config {args.config_file} {' '.join(args.opts)}")
    print(table(args.mode, rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary(args.mode, rows, env, args.config_file, args.opts), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
