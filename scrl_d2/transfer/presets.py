"""Presets of the transfer suite: a named, fixed choice of checkpoints, protocols, trials
and overrides (``tools/transfer.py --preset NAME``). A new preset is one row of
:data:`PRESETS`.
"""
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

from ..utils.errors import InputKeyError
from .suite import RANDOM_INIT, ROOT, TRAIN_NET, call_forwarding_signals

__all__ = ["Preset", "PRESETS", "get_preset", "pretrain_demo"]


@dataclass(frozen=True)
class Preset:
    description: str
    protocols: Tuple[str, ...]  # run unless --protocols is given
    max_trials: int  # the protocol's trial count, at most this
    opts: Tuple[str, ...]  # config overrides of every run (before the command line's)
    weights: Callable[[str], Dict[str, str]]  # output folder -> {name: checkpoint}, unless --weights
    miniature: bool = True  # on the generated miniature datasets (under OUTPUT/datasets unless --miniature)
    default_output: str = ""


def pretrain_demo(out: str) -> Dict[str, str]:
    """Random init, and BYOL and SCRL pretrained on the built-in demo images (24 iterations
    each, resumable: a stop signal reaches the trainer, which checkpoints)."""
    ckpts = {"random": RANDOM_INIT}
    for arch in ("byol", "scrl"):
        d = os.path.join(out, "pretrain", arch)
        last = os.path.join(d, "checkpoint_last.pth")
        if not os.path.exists(last):
            cmd = [sys.executable, *TRAIN_NET, "--config-file", os.path.join(ROOT, "configs", "demo",
                                                                             f"{arch}_demo.yaml"),
                   "OUTPUT_DIR", d, "SOLVER.MAX_ITER", "24", "MODEL.PROBE.ENABLED", "False",
                   "LINEAR_EVAL.ENABLED", "False", "KNN.PERIOD", "0", "TEST.EVAL_PERIOD", "0"]
            print(f"pretraining {arch.upper()} on the demo images: {shlex.join(cmd)}", flush=True)
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "log.txt"), "a") as log:
                if call_forwarding_signals(cmd, log, f"the {arch.upper()} demo pretraining", cwd=ROOT) != 0:
                    raise RuntimeError(f"demo pretraining failed; see {os.path.join(d, 'log.txt')}")
        ckpts[f"{arch}_demo"] = os.path.realpath(last)
    return ckpts


PRESETS: Dict[str, Preset] = {
    # random init vs BYOL and SCRL pretrained on the built-in demo images, through a COCO and
    # a VOC protocol at miniature scale on generated data (CPU, a few minutes)
    "demo": Preset("random vs BYOL vs SCRL demo checkpoints on CPU",
                   protocols=("coco_faster_rcnn_R50_FPN_1x", "voc0712_faster_rcnn_R50_FPN"), max_trials=2,
                   opts=("SOLVER.MAX_ITER", "20", "SOLVER.STEPS", "(16,)", "SOLVER.CHECKPOINT_PERIOD", "20",
                         "SOLVER.IMS_PER_BATCH", "2", "MODEL.DEVICE", "cpu"),
                   weights=pretrain_demo, default_output=os.path.join("output", "transfer_demo")),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise InputKeyError(f"--preset {name!r}: available: {', '.join(PRESETS)}")
    return PRESETS[name]

