"""Optimizer, learning-rate and EMA-momentum schedules from a config."""
import logging
from typing import Dict, List

import torch
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
    ParamScheduler,
)
from torch import nn

from ..utils.errors import InputValueError
from .lars import LARS

__all__ = ["split_norm_and_bias", "build_optimizer", "scaled_lr", "build_lr_scheduler", "warmup_cosine",
           "build_momentum_scheduler", "StepSchedule"]

logger = logging.getLogger("scrl_d2.solver")

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def split_norm_and_bias(module: nn.Module, only=None) -> Dict[str, List[nn.Parameter]]:
    """Parameters by kind: ``"exclude"`` holds every normalisation-layer parameter and
    every bias (found by module type, not by name), ``"default"`` the rest."""
    allowed = None if only is None else {id(p) for p in only}
    groups: Dict[str, List[nn.Parameter]] = {"default": [], "exclude": []}
    seen = set()
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen or (allowed is not None and id(p) not in allowed):
                continue
            seen.add(id(p))
            kind = "exclude" if isinstance(m, _NORM_TYPES) or name == "bias" else "default"
            groups[kind].append(p)
    return groups


def scaled_lr(cfg, world_size: int) -> float:
    """Linear scaling rule: BASE_LR x global batch / 256."""
    return cfg.SOLVER.BASE_LR * cfg.SOLVER.IMS_PER_GPU * world_size / 256.0


def build_optimizer(cfg, model: nn.Module, world_size: int = 1) -> torch.optim.Optimizer:
    s = cfg.SOLVER
    lr = scaled_lr(cfg, world_size)
    trainable = model.online_parameters() if hasattr(model, "online_parameters") else None
    groups = split_norm_and_bias(model, trainable)
    exclude = s.LARS_EXCLUDE_NORM_AND_BIAS
    param_groups = [{"params": groups["default"] + ([] if exclude else groups["exclude"])}]
    if exclude and groups["exclude"]:
        param_groups.append({"params": groups["exclude"], "weight_decay": 0.0, "lars_exclude": True})
    logger.info(f"LR {s.BASE_LR} x {s.IMS_PER_GPU * world_size}/256 = {lr:g}; "
                f"{len(groups['default'])} tensors adapted, {len(groups['exclude'])} norm/bias tensors "
                f"{'excluded from LARS and weight decay' if exclude else 'treated alike'}")
    if s.OPTIMIZER == "LARS":
        return LARS(param_groups, lr=lr, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY,
                    trust_coef=s.LARS_TRUST_COEF, eps=s.LARS_EPS, nesterov=s.NESTEROV)
    if s.OPTIMIZER == "SGD":
        for g in param_groups:
            g.pop("lars_exclude", None)
        return torch.optim.SGD(param_groups, lr=lr, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY,
                               nesterov=s.NESTEROV)
    raise InputValueError(f"SOLVER.OPTIMIZER: unknown optimizer {s.OPTIMIZER!r}; use 'LARS' or 'SGD'")


class StepSchedule:
    """A fvcore ParamScheduler evaluated per training step ``i`` (0-based) of ``total``.

    Step ``i`` uses ``where = (i + 1) / total``, as the release's scheduler which steps
    before each update: the first step's LR is already non-zero, the last step's is 0.
    """

    def __init__(self, scheduler: ParamScheduler, total_steps: int, offset: int = 1):
        self.scheduler, self.total, self.offset = scheduler, total_steps, offset

    def __call__(self, step: int) -> float:
        return float(self.scheduler(min((step + self.offset) / self.total, 1.0)))


def warmup_cosine(base_lr: float, warmup_epochs: int, epochs: int, iters_per_epoch: int,
                  key: str = "SOLVER") -> StepSchedule:
    """Linear warm-up from 0 over ``warmup_epochs``, then cosine to 0 at the end."""
    if not 0 <= warmup_epochs < epochs:
        raise InputValueError(f"{key}.WARMUP_EPOCHS ({warmup_epochs}) must be in [0, {key}.EPOCHS={epochs})")
    warm = warmup_epochs / epochs
    cosine = CosineParamScheduler(base_lr, 0.0)
    if warm == 0:
        sched: ParamScheduler = cosine
    else:
        sched = CompositeParamScheduler(
            [LinearParamScheduler(0.0, base_lr), cosine], [warm, 1.0 - warm], ["rescaled", "rescaled"]
        )
    return StepSchedule(sched, iters_per_epoch * epochs)


def build_lr_scheduler(cfg, base_lr: float, iters_per_epoch: int) -> StepSchedule:
    """The pretraining LR: SOLVER.WARMUP_EPOCHS of linear warm-up, then cosine."""
    return warmup_cosine(base_lr, cfg.SOLVER.WARMUP_EPOCHS, cfg.SOLVER.EPOCHS, iters_per_epoch)


def build_momentum_scheduler(cfg, iters_per_epoch: int) -> StepSchedule:
    """EMA momentum 1 - (1 - base)(cos(pi k / K) + 1) / 2 after step k (0-based)."""
    base = cfg.MODEL.BYOL.BASE_MOMENTUM
    sched = CosineParamScheduler(base, 1.0) if base < 1 else ConstantParamScheduler(1.0)
    return StepSchedule(sched, iters_per_epoch * cfg.SOLVER.EPOCHS, offset=0)
