"""One optimisation step, shared by pretraining and fine-tuning: the mixed-precision
dtype, the loss scaler and the order forward -> backward -> optimizer (-> EMA)."""
import contextlib
import logging
from typing import Callable, Dict, Optional

import torch

from ..utils.errors import InputValueError

__all__ = ["amp_dtype", "build_grad_scaler", "build_forward", "optimization_step"]

logger = logging.getLogger("scrl_d2.engine")


def amp_dtype(cfg, device: torch.device) -> Optional[torch.dtype]:
    """None when mixed precision is off; bf16 where supported, else fp16 (GPU)."""
    if not cfg.SOLVER.AMP.ENABLED:
        return None
    choice = cfg.SOLVER.AMP.DTYPE
    if choice not in ("auto", "bfloat16", "float16"):
        raise InputValueError(f"SOLVER.AMP.DTYPE: {choice!r} is not 'auto', 'bfloat16' or 'float16'")
    if choice == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16
    return getattr(torch, choice)


def build_grad_scaler(dtype: Optional[torch.dtype], device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling only where it is needed: fp16 on a GPU."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")


def build_forward(cfg, module: torch.nn.Module):
    """``module``, or its ``torch.compile`` when MODEL.COMPILE.ENABLED."""
    c = cfg.MODEL.COMPILE
    if not c.ENABLED:
        return module
    logger.info(f"torch.compile: mode {c.MODE}, backend {c.BACKEND}")
    return torch.compile(module, mode=c.MODE, backend=c.BACKEND)


def optimization_step(forward, model, optimizer, scaler: torch.amp.GradScaler, batch: Dict[str, torch.Tensor],
                      dtype: Optional[torch.dtype], device: torch.device, momentum: Optional[float] = None,
                      after_backward: Optional[Callable[[], None]] = None) -> Dict[str, torch.Tensor]:
    """One step in the release's order: forward (autocast) -> backward -> optimizer step
    -> (pretraining, ``momentum`` given) EMA update of the target with this step's
    momentum. The loss is the sum of the outputs named ``loss*`` (Detectron2's and
    torchvision's convention). Returns the forward's outputs. ``after_backward`` runs
    between backward and the optimizer step (Detectron2's hook point)."""
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with autocast:
        out = forward(batch)
    total = sum(v for k, v in out.items() if k.startswith("loss"))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if after_backward is not None:
        after_backward()
    scaler.step(optimizer)
    scaler.update()
    if momentum is not None:
        model.update_target(momentum)
    return out
