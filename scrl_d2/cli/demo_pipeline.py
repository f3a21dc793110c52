"""The whole path on built-in data, for a newcomer: pretrain SCRL -> convert the
encoder -> fine-tune Faster R-CNN -> COCO AP table (also in OUTPUT_DIR/results.json).

    python tools/demo_pipeline.py --output-dir output/pipeline

Runs on a CPU in a few minutes (a GPU is used when present). Extra KEY VALUE pairs at the
end override the fine-tuning config, e.g. ``SOLVER.MAX_ITER 100``.
"""
import argparse
import os
from argparse import Namespace

from scrl_d2.checkpoint.convert import convert_checkpoint
from scrl_d2.config import config_from_args
from scrl_d2.detection import run_finetune
from scrl_d2.detection.coco_eval import print_results
from scrl_d2.engine import PretrainTrainer, default_setup
from scrl_d2.utils.fs import atomic_write, checkout_root, finite_json

ROOT = checkout_root()  # configs/


def _cfg(config_file: str, opts):
    cfg = config_from_args(config_file, opts)
    cfg.freeze()
    default_setup(cfg, Namespace(config_file=config_file, resume=False))
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--arch", choices=["SCRL", "BYOL"], default="SCRL")
    p.add_argument("--pretrain-iters", type=int, default=24)
    p.add_argument("--mask", action="store_true", help="Mask R-CNN instead of Faster R-CNN (box and mask AP)")
    p.add_argument("opts", nargs="*", help="fine-tuning config overrides, KEY VALUE")
    args = p.parse_intermixed_args()
    out = os.path.abspath(args.output_dir)

    demo = "scrl_demo.yaml" if args.arch == "SCRL" else "byol_demo.yaml"
    pre = _cfg(os.path.join(ROOT, "configs", "demo", demo),
               ["OUTPUT_DIR", os.path.join(out, "pretrain"), "SOLVER.MAX_ITER", str(args.pretrain_iters),
                "MODEL.PROBE.ENABLED", "False"])
    trainer = PretrainTrainer(pre)
    trainer.resume_or_load()
    trainer.train()

    weights = os.path.join(out, "pretrained_backbone.pkl")
    s = convert_checkpoint(trainer.checkpointer.get_checkpoint_file(), weights)
    print(f"converted {s['tensors']} tensors of the {s['encoder']} ResNet-{s['resnet_depth']} encoder -> {weights}",
          flush=True)

    det = "mask_rcnn_demo.yaml" if args.mask else "faster_rcnn_demo.yaml"
    fin = _cfg(os.path.join(ROOT, "configs", "demo", det),
               ["OUTPUT_DIR", os.path.join(out, "finetune"), "MODEL.WEIGHTS", weights] + list(args.opts))
    results = run_finetune(fin)
    atomic_write(os.path.join(out, "results.json"), lambda f: f.write(finite_json(results)), mode="w")
    print(f"\n{args.arch} pretraining ({args.pretrain_iters} iterations) -> {'Mask' if args.mask else 'Faster'} "
          f"R-CNN ({fin.SOLVER.MAX_ITER} iterations) on the synthetic detection data, COCO AP:")
    print_results(results)
    print(f"written to {os.path.join(out, 'results.json')}")


if __name__ == "__main__":
    main()
