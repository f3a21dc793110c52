#!/usr/bin/env python
"""SCRL / BYOL pretraining and detection fine-tuning, Detectron2-style command line.

    python tools/train_net.py --config-file configs/scrl_pretrain.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/demo/scrl_demo.yaml   # built-in data, CPU ok
    python tools/train_net.py --config-file configs/coco/faster_rcnn_R_50_FPN_1x_syncbn.yaml \
        --num-gpus 8 MODEL.WEIGHTS scrl_r50.pkl                            # fine-tune + COCO AP

A config whose MODEL.META_ARCHITECTURE is "GeneralizedRCNN" fine-tunes a detector
(Detectron2's trainer and COCOEvaluator when installed, else torchvision's Faster/Mask
R-CNN); SCRL / BYOL configs pretrain.
"""
import logging
import sys

from scrl_d2.config import ConfigError, get_cfg
from scrl_d2.detection import is_detection_config, run_finetune
from scrl_d2.detection.coco_eval import print_results
from scrl_d2.engine import PretrainTrainer, default_argument_parser, default_setup, launch
from scrl_d2.utils import comm


def setup(args):
    cfg = get_cfg()
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts or [])
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args) -> None:
    cfg = setup(args)
    if is_detection_config(cfg):  # fine-tuning a detector (Detectron2's trainer when installed)
        results = run_finetune(cfg, resume=args.resume, eval_only=args.eval_only)
        if comm.is_main_process():
            print_results(results)
        return
    trainer = PretrainTrainer(cfg)
    resumed = trainer.resume_or_load(resume=True)
    if args.eval_only:
        if not resumed and not cfg.MODEL.WEIGHTS:
            raise FileNotFoundError(f"--eval-only: no checkpoint in {cfg.LOAD_DIR or cfg.OUTPUT_DIR} and no MODEL.WEIGHTS")
        if trainer.model.probe is None or not cfg.DATASETS.TEST:
            raise ValueError("--eval-only evaluates the online probe: set MODEL.PROBE.ENABLED True and DATASETS.TEST")
        top1 = trainer.evaluate_probe()
        logging.getLogger("scrl_d2").info(f"online probe top-1 on {cfg.DATASETS.TEST[0]}: {top1:.2f}%")
        return
    trainer.train()


def cli(argv=None) -> None:
    args = default_argument_parser().parse_args(argv)
    try:  # fail on config errors here, with a clear message, before any process starts
        cfg = get_cfg()
        if args.config_file:
            cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts or [])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    cli()
