"""Evaluating representations: offline linear evaluation, k-NN, and loading an encoder
from any checkpoint layout."""
import logging
import os
from typing import Dict, Optional

import torch

from ..checkpoint import Checkpointer, LayoutError, extract_encoder, infer_resnet, load_checkpoint_file
from ..data import build_eval_loader, dataset_dicts_of
from ..modeling import build_backbone
from ..utils import comm
from ..utils.errors import InputFileNotFoundError, InputValueError
from .knn import extract_features, knn_classify, knn_top1
from .linear_eval import Encoder, LinearEvaluator

__all__ = ["Encoder", "LinearEvaluator", "knn_classify", "knn_top1", "extract_features", "encoder_from_checkpoint",
           "find_checkpoint", "run_knn", "random_encoder"]

logger = logging.getLogger("scrl_d2.evaluation")


def find_checkpoint(cfg) -> str:
    """MODEL.WEIGHTS, else the newest checkpoint of LOAD_DIR, else of OUTPUT_DIR."""
    if cfg.MODEL.WEIGHTS:
        if not os.path.exists(cfg.MODEL.WEIGHTS):
            raise InputFileNotFoundError(f"MODEL.WEIGHTS: file not found: {cfg.MODEL.WEIGHTS}")
        return cfg.MODEL.WEIGHTS
    for d in (cfg.LOAD_DIR, cfg.OUTPUT_DIR):
        if d:
            path = Checkpointer(torch.nn.Module(), d, save_to_disk=False).get_checkpoint_file()
            if path:
                return path
    raise InputFileNotFoundError(f"no checkpoint to evaluate: set MODEL.WEIGHTS (a file) or LOAD_DIR (a run "
                                 f"directory); {cfg.LOAD_DIR or cfg.OUTPUT_DIR or '(no directory)'} holds none")


def encoder_from_checkpoint(cfg, path: str) -> Encoder:
    """The (online or target, LINEAR_EVAL.ENCODER) encoder of any layout tools/convert.py reads."""
    try:
        layout, enc, _ = extract_encoder(load_checkpoint_file(path), cfg.LINEAR_EVAL.ENCODER)
    except (LayoutError, ValueError) as e:
        raise InputValueError(f"{path}: {e}") from e
    arch = infer_resnet(enc)
    if arch["depth"] != cfg.MODEL.RESNETS.DEPTH:
        raise InputValueError(f"{path} holds a ResNet-{arch['depth']}, the config builds MODEL.RESNETS.DEPTH "
                              f"{cfg.MODEL.RESNETS.DEPTH}; set it to {arch['depth']}")
    backbone = build_backbone(cfg)
    backbone.load_state_dict(enc, strict=True)
    logger.info(f"evaluating the {cfg.LINEAR_EVAL.ENCODER} encoder of {path} ({layout} layout, "
                f"ResNet-{arch['depth']})")
    return Encoder(backbone, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, cfg.MODEL.RESNETS.OUT_FEATURES[-1],
                   cfg.MODEL.CHANNELS_LAST)


def random_encoder(cfg, seed: Optional[int] = None) -> Encoder:
    """The no-pretraining baseline: a freshly initialised encoder of the config's
    architecture, the same for a given seed (``SEED``, else 0) whatever RNG state precedes."""
    seed = seed if seed is not None else (cfg.SEED if cfg.SEED >= 0 else 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_backbone(cfg)
    return Encoder(backbone, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, cfg.MODEL.RESNETS.OUT_FEATURES[-1],
                   cfg.MODEL.CHANNELS_LAST)


@torch.no_grad()
def run_knn(cfg, encoder: Encoder, device: torch.device, dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Weighted k-NN top-1 of DATASETS.TEST[0] against DATASETS.TRAIN[0] (centre crops)."""
    _, num_classes = dataset_dicts_of(cfg, cfg.DATASETS.TRAIN[:1])
    was = encoder.training
    encoder.eval()
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)
    with ctx:
        train = extract_features(encoder, build_eval_loader(cfg, cfg.DATASETS.TRAIN[0]), device)
        test = extract_features(encoder, build_eval_loader(cfg, cfg.DATASETS.TEST[0]), device)
    encoder.train(was)
    gather = lambda d: [torch.cat(x) for x in zip(*[(p["features"], p["labels"]) for p in comm.all_gather(d)])]  # noqa
    (trf, trl), (tef, tel) = gather(train), gather(test)
    top1 = knn_top1((trf.to(device), trl.to(device)), (tef.to(device), tel.to(device)), num_classes,
                    cfg.KNN.K, cfg.KNN.TEMPERATURE)
    return {"knn/top1": top1, "knn/k": cfg.KNN.K, "knn/temperature": cfg.KNN.TEMPERATURE}
