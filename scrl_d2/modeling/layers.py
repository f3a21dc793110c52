"""Normalisation layers by Detectron2's names, and a conv that carries its norm."""
from collections import namedtuple
from typing import Optional

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

__all__ = ["get_norm", "get_norm1d", "Conv2d", "ShapeSpec"]

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
    """"BN" or "SyncBN" for the MLP heads (``[N, C]`` inputs)."""
    if norm == "BN":
        return nn.BatchNorm1d(channels)
    if norm == "SyncBN":
        return nn.SyncBatchNorm(channels)
    raise ValueError(f"MODEL.BYOL.HEAD_NORM: unknown norm {norm!r}; use 'BN' or 'SyncBN'")


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
