"""SCRL / BYOL pretraining and detection fine-tuning, Detectron2-style command line.

    python -m scrl_d2.cli.train_net --config-file configs/scrl_pretrain.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/demo/scrl_demo.yaml   # the same, as a script
    python tools/train_net.py --config-file configs/coco/faster_rcnn_R_50_FPN_1x_syncbn.yaml \
        --num-gpus 8 MODEL.WEIGHTS scrl_r50.pkl                            # fine-tune + COCO AP

A config whose MODEL.META_ARCHITECTURE is "GeneralizedRCNN" fine-tunes a detector
(Detectron2's trainer and COCOEvaluator when installed, else torchvision's Faster/Mask
R-CNN); SCRL / BYOL configs pretrain.
"""
import logging
import os
import sys
from datetime import timedelta

from torch.multiprocessing import ProcessExitedException

from scrl_d2.config import check_config, config_from_args
from scrl_d2.detection import check_finetune_config, is_detection_config, run_finetune
from scrl_d2.detection.coco_eval import print_results
from scrl_d2.engine import PretrainTrainer, default_argument_parser, default_setup, launch, run_main
from scrl_d2.engine.defaults import EXIT_BAD_INPUT, EXIT_FAILED, check_resume_arguments, resolve_resume
from scrl_d2.evaluation import Encoder, LinearEvaluator
from scrl_d2.utils import comm
from scrl_d2.utils.errors import BadInput, InputValueError


def setup(args):
    cfg = config_from_args(args.config_file, args.opts)  # Detectron2's defaults for detection configs
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args) -> None:
    cfg = setup(args)
    if is_detection_config(cfg):  # fine-tuning a detector (Detectron2's trainer when installed)
        # rerunning the command (or a requeue) resumes the run in OUTPUT_DIR, as pretraining does
        resume = resolve_resume(cfg, args) if not args.eval_only else args.resume
        results = run_finetune(cfg, resume=resume, eval_only=args.eval_only)
        if comm.is_main_process():
            print_results(results)
        return
    if args.eval_only:  # the release's "linear evaluation only", from any checkpoint
        evaluate_checkpoint(cfg)
        return
    trainer = PretrainTrainer(cfg)
    trainer.resume_or_load(resume=True)
    trainer.train()
    if cfg.LINEAR_EVAL.ENABLED:  # the release runs the linear evaluation after pretraining
        if not cfg.DATASETS.TEST or not _labelled(cfg):
            logging.getLogger("scrl_d2").info("linear evaluation skipped: it needs labelled DATASETS.TRAIN and TEST")
            return
        m = trainer.model
        encoder = Encoder(m.backbone, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, m.in_feature, m.channels_last)
        linear_evaluation(cfg, encoder, trainer.device, trainer.dtype)


def linear_evaluation(cfg, encoder, device, dtype) -> None:
    """The linear evaluation of ``encoder``; with TEST.RANDOM_BASELINE, the same of a
    randomly initialised encoder (OUTPUT_DIR/linear_eval_random_init), printed after it."""
    from scrl_d2.evaluation import random_encoder

    ev = LinearEvaluator(cfg, encoder, device, dtype)
    ev.resume()
    res = ev.run()
    if cfg.TEST.RANDOM_BASELINE:
        base = LinearEvaluator(cfg, random_encoder(cfg).to(device), device, dtype,
                               output_dir=os.path.join(cfg.OUTPUT_DIR, "linear_eval_random_init"),
                               label="random init")
        base.resume()
        rnd = base.run()
        logging.getLogger("scrl_d2").info(
            f"linear evaluation top-1 (last): {res['top1_last']:.2f}%, random-init baseline "
            f"{rnd['top1_last']:.2f}%")


def _labelled(cfg) -> bool:
    from scrl_d2.data import dataset_dicts_of

    return dataset_dicts_of(cfg)[1] > 0


def evaluate_checkpoint(cfg) -> None:
    """--eval-only: linear evaluation (LINEAR_EVAL.ENABLED) and k-NN (KNN.PERIOD > 0) of
    MODEL.WEIGHTS or the newest checkpoint of LOAD_DIR / OUTPUT_DIR, in any layout."""
    from scrl_d2.engine.defaults import resolve_device
    from scrl_d2.engine.trainer import amp_dtype
    from scrl_d2.evaluation import encoder_from_checkpoint, find_checkpoint, run_knn

    log = logging.getLogger("scrl_d2")
    if not cfg.LINEAR_EVAL.ENABLED and cfg.KNN.PERIOD <= 0:
        raise InputValueError("--eval-only: nothing to run; enable LINEAR_EVAL.ENABLED and/or set KNN.PERIOD > 0")
    device = resolve_device(cfg)
    encoder = encoder_from_checkpoint(cfg, find_checkpoint(cfg)).to(device)
    if cfg.KNN.PERIOD > 0:
        res = run_knn(cfg, encoder, device, amp_dtype(cfg, device))
        beside = ""
        if cfg.TEST.RANDOM_BASELINE:
            from scrl_d2.evaluation import random_encoder

            rnd = run_knn(cfg, random_encoder(cfg).to(device), device, amp_dtype(cfg, device))
            beside = f" (random init: {rnd['knn/top1']:.2f}%)"
        log.info(f"k-NN (k={cfg.KNN.K}, T={cfg.KNN.TEMPERATURE}) top-1 on {cfg.DATASETS.TEST[0]}: "
                 f"{res['knn/top1']:.2f}%{beside}")
    if cfg.LINEAR_EVAL.ENABLED:
        linear_evaluation(cfg, encoder, device, amp_dtype(cfg, device))


def cli(argv=None) -> None:
    """Bad input ends with one line on stderr and exit status 2, a diverged run with 3
    (see scrl_d2.engine.run_main); SCRL_D2_DEBUG=1 prints tracebacks too."""
    args = default_argument_parser().parse_args(argv)
    try:  # fail on config errors here, with a clear message, before any process starts
        check_resume_arguments(args)
        cfg = config_from_args(args.config_file, args.opts)
        check_config(cfg)
        check_finetune_config(cfg)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    try:
        launch(run_main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(main, args), timeout=timedelta(seconds=args.dist_timeout))
    except ProcessExitedException as e:  # a process ended with its own message and status
        sys.exit(e.exit_code if e.exit_code and e.exit_code > 0 else EXIT_FAILED)


if __name__ == "__main__":
    cli()
