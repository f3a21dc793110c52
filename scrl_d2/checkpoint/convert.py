"""Pretrained checkpoint -> backbone weights for detection fine-tuning.

Writes Detectron2's format (``.pkl``: ``{"model": {name: ndarray}, "__author__",
"matching_heuristics": True}``, names like ``stem.conv1.weight``, which
``DetectionCheckpointer`` matches to ``backbone.bottom_up.*`` with ``MODEL.WEIGHTS``) or a
torchvision ResNet state dict (``.pth``, for ``torchvision.models.detection`` backbones).
The encoder is validated by loading it, strictly, into a ResNet of the inferred depth;
nothing is written unless that succeeds.
"""
import os
import pickle
from typing import Dict, Optional

import torch

from ..utils.errors import InputValueError
from ..utils.fs import atomic_write
from .io import load_checkpoint_file
from .layouts import LayoutError, d2_to_torchvision, extract_encoder, infer_resnet

__all__ = ["convert_checkpoint", "output_format"]


def output_format(path: str, fmt: Optional[str] = None) -> str:
    if fmt:
        if fmt not in ("detectron2", "torchvision"):
            raise InputValueError(f"--format must be 'detectron2' or 'torchvision', got {fmt!r}")
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext == ".pkl":
        return "detectron2"
    if ext in (".pth", ".pt"):
        return "torchvision"
    raise InputValueError(f"cannot tell the output format from {path!r}: use a .pkl (Detectron2) or .pth "
                          "(torchvision) name, or --format")


def convert_checkpoint(src: str, dst: str, encoder: str = "online", fmt: Optional[str] = None) -> Dict:
    """Convert ``src`` to ``dst``; returns a summary (layout, depth, counts, dropped)."""
    fmt = output_format(dst, fmt)
    try:
        ckpt = load_checkpoint_file(src)
    except ValueError as e:
        raise LayoutError(str(e)) from e
    layout, enc, dropped = extract_encoder(ckpt, encoder)
    arch = infer_resnet(enc)
    from ..modeling.backbone import ResNet

    ResNet(**arch).load_state_dict(enc, strict=True)  # every tensor present, every shape right
    if fmt == "detectron2":
        weights = {k: v.detach().cpu().numpy() for k, v in enc.items()}
        data = {"model": weights, "__author__": "scrl_d2", "matching_heuristics": True}
        atomic_write(dst, lambda f: pickle.dump(data, f))
    else:
        weights = {d2_to_torchvision(k): v.detach().cpu().clone() for k, v in enc.items()}
        atomic_write(dst, lambda f: torch.save(weights, f))
    return {"input": src, "output": dst, "layout": layout, "encoder": encoder, "format": fmt,
            "resnet_depth": arch["depth"], "tensors": len(weights), "dropped": dropped}
