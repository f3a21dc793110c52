"""Miniature datasets in each downstream benchmark's own on-disk format, under Detectron2's
layout and builtin names, so every transfer protocol runs on a CPU exactly as it runs on
the real data (only ``DATASETS.ROOT`` changes), and the overrides that shrink a protocol's
run to a miniature one.

What each format writes is its module's ``write_miniature`` (:mod:`scrl_d2.detection.formats`):
``coco/`` (instances and person keypoints), ``VOC2007/`` and ``VOC2012/``, ``cityscapes/``,
``lvis/`` over the ``coco/`` images. The scenes are the built-in synthetic shapes
(:func:`scrl_d2.data.render.render_shapes_scene`: non-overlapping, so each polygon is its
object's exact visible mask); each format maps the four shapes to four of its classes.
"""
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from ..data.render import render_shapes_scene
from ..detection.formats import FORMATS as _FORMATS
from ..utils.errors import InputValueError
from ..utils.fs import generate_once
from .protocols import Protocol

__all__ = ["FORMATS", "make_miniature", "MINIATURE", "miniature_overrides", "miniature_formats"]

FORMATS = tuple(_FORMATS)  # every format writes its miniature
_VERSION = "2"
SPLITS = {"train": (24, 21), "val": (12, 22)}  # images, seed


def _scenes(split: str) -> List[Tuple[Image.Image, Dict, List[Dict]]]:
    count, seed = SPLITS[split]
    rng = np.random.default_rng(seed)
    out, n_anns = [], 0
    for i in range(count):
        img, info, anns = render_shapes_scene(rng, i + 1, n_anns + 1)
        n_anns += len(anns)
        out.append((img, info, anns))
    return out


def make_miniature(root: str, formats: Sequence[str] = FORMATS) -> str:
    """Write the miniature datasets of ``formats`` under ``root`` (once; atomically per
    format: a finished folder or none). Returns ``root``, to use as ``DATASETS.ROOT``."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise InputValueError(f"miniature dataset formats {unknown} unknown; available: {list(FORMATS)}")
    order: List[str] = []
    for f in formats:
        order += [d for d in _FORMATS[f].miniature_needs if d not in order] + ([f] if f not in order else [])
    os.makedirs(root, exist_ok=True)
    for fmt in order:
        def fill(tmp: str, fmt=fmt) -> None:
            _FORMATS[fmt].write_miniature(tmp, {s: _scenes(s) for s in SPLITS})

        staged = generate_once(os.path.join(root, f".miniature-{fmt}"), _VERSION, fill)
        for entry in os.listdir(staged):  # move each top-level folder into place once
            if entry.startswith(".complete"):
                continue
            dst = os.path.join(root, entry)
            if not os.path.exists(dst):
                os.symlink(os.path.join(f".miniature-{fmt}", entry), dst)
    return root


# A miniature run of any protocol: ResNet-18, small images, a few iterations, on the
# generated datasets of make_miniature (DATASETS.ROOT is added by the caller).
MINIATURE: Tuple[str, ...] = (
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "600", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "300",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "300", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
    # a few iterations give low scores: keep them, so AP measures ranking, not the threshold
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.001", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.001",
    "INPUT.MIN_SIZE_TRAIN", "(160, 192)", "INPUT.MAX_SIZE_TRAIN", "320",
    "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "320",
    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "40", "SOLVER.STEPS", "(30,)", "SOLVER.WARMUP_ITERS", "10",
    "SOLVER.CHECKPOINT_PERIOD", "20", "TEST.PRECISE_BN.NUM_ITER", "5", "DATALOADER.NUM_WORKERS", "1",
    "LOG_PERIOD", "10",
)


def miniature_overrides(protocol: Protocol, root: str, trial: int = 1) -> List[str]:
    """MINIATURE, then the protocol's own miniature overrides, then DATASETS.ROOT."""
    extra = [v.replace("{trial}", str(trial)) for v in protocol.miniature]
    return list(MINIATURE) + extra + ["DATASETS.ROOT", root]


def miniature_formats(protocol: Protocol) -> Tuple[str, ...]:
    """Which miniature datasets a protocol's miniature run reads."""
    from ..config import config_from_args
    from ..detection.catalog import get_dataset

    cfg = config_from_args(protocol.config_path)
    kinds = {get_dataset(n).kind for n in tuple(cfg.DATASETS.TRAIN) + tuple(cfg.DATASETS.TEST)}
    return tuple(sorted(kinds))

