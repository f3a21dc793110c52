#!/usr/bin/env python
"""SCRL / BYOL pretraining, Detectron2-style command line.

    python tools/train_net.py --config-file configs/scrl_pretrain.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/demo/scrl_demo.yaml   # built-in data, CPU ok
"""
import logging
import sys

from scrl_d2.config import ConfigError, get_cfg
from scrl_d2.engine import PretrainTrainer, default_argument_parser, default_setup, launch


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
