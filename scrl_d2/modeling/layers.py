"""Normalisation layers by Detectron2's names, and a conv that carries its norm."""
from collections import namedtuple
from typing import Optional

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

__all__ = ["get_norm", "get_norm1d", "flat_norm", "Conv2d", "ShapeSpec"]

ShapeSpec = namedtuple("ShapeSpec", ["channels", "stride"])


def get_norm(norm: str, channels: int) -> Optional[nn.Module]:
    """"BN", "SyncBN", "FrozenBN", "GN" or "" (no norm) for 2-D feature maps."""
    if not norm:
        return None
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "GN":
        return nn.GroupNorm(32, channels)
    raise ValueError(f"MODEL.RESNETS.NORM: unknown norm {norm!r}; use 'BN', 'SyncBN', 'FrozenBN', 'GN' or ''")


def get_norm1d(norm: str, channels: int) -> nn.Module:
    """"BN" or "SyncBN" for the MLP heads (``[N, C]`` inputs), from the active backend:
    with Detectron2, its ``get_norm`` (so "SyncBN" means the same as in its models)."""
    if norm not in ("BN", "SyncBN"):
        raise ValueError(f"MODEL.BYOL.HEAD_NORM: unknown norm {norm!r}; use 'BN' or 'SyncBN'")
    from ..backend import use_detectron2

    if use_detectron2():
        from detectron2.layers import get_norm as d2_get_norm

        return flat_norm(d2_get_norm(norm, channels))
    return nn.BatchNorm1d(channels) if norm == "BN" else nn.SyncBatchNorm(channels)


class _FlatInput:
    """Lets a 2-D normalisation layer take ``[N, C]`` as ``[N, C, 1, 1]`` (same maths as
    its 1-D twin, same parameter names, so checkpoints match across backends)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return super().forward(x[:, :, None, None]).flatten(1)
        return super().forward(x)


_FLAT_CLASSES: dict = {}


def flat_norm(norm: nn.Module) -> nn.Module:
    cls = type(norm)
    if cls not in _FLAT_CLASSES:
        flat = type(f"Flat{cls.__name__}", (_FlatInput, cls), {"__module__": __name__})
        globals()[flat.__name__] = flat  # picklable by name
        _FLAT_CLASSES[cls] = flat
    norm.__class__ = _FLAT_CLASSES[cls]
    return norm


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` followed by an optional ``norm`` and ``activation``; the attribute
    names give Detectron2's parameter names (``conv1.weight``, ``conv1.norm.weight``)."""

    def __init__(self, *args, norm: Optional[nn.Module] = None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x
