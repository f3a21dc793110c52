"""Normalisation layers by Detectron2's names, and a conv that carries its norm."""
from collections import namedtuple
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from ..utils.errors import InputValueError

__all__ = ["get_norm", "get_norm1d", "flat_norm", "Conv2d", "ShapeSpec", "SyncBatchNorm", "cpu_capable_sync_bn"]

ShapeSpec = namedtuple("ShapeSpec", ["channels", "stride"])


def get_norm(norm: str, channels: int) -> Optional[nn.Module]:
    """"BN", "SyncBN", "FrozenBN", "GN" or "" (no norm) for 2-D feature maps."""
    if not norm:
        return None
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "SyncBN":
        return SyncBatchNorm(channels)
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "GN":
        return nn.GroupNorm(32, channels)
    raise InputValueError(f"MODEL.RESNETS.NORM: unknown norm {norm!r}; use 'BN', 'SyncBN', 'FrozenBN', 'GN' or ''")


def get_norm1d(norm: str, channels: int) -> nn.Module:
    """"BN" or "SyncBN" for the MLP heads (``[N, C]`` inputs), from the active backend:
    with Detectron2, its ``get_norm`` (so "SyncBN" means the same as in its models)."""
    if norm not in ("BN", "SyncBN"):
        raise InputValueError(f"MODEL.BYOL.HEAD_NORM: unknown norm {norm!r}; use 'BN' or 'SyncBN'")
    from ..backend import use_detectron2

    if use_detectron2():
        from detectron2.layers import get_norm as d2_get_norm

        return flat_norm(cpu_capable_sync_bn(d2_get_norm(norm, channels)))
    return nn.BatchNorm1d(channels) if norm == "BN" else SyncBatchNorm(channels)


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose gradient is the sum of the processes' gradients (the
    statistics of each process feed every process's loss)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SyncBatchNorm(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` (what Detectron2's "SyncBN" builds and what the release
    converts every BatchNorm to), which also synchronises CPU processes.

    torch's kernels only run on GPUs; on CPU tensors with several processes (gloo) this
    computes the same global statistics with differentiable all-reduces, so a
    multi-process CPU run trains the method the GPU run trains (and tests can check
    it). GPU inputs, eval mode and single processes take torch's own path. Same
    parameters and buffers as BatchNorm, so checkpoints do not change."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and input.device.type == "cpu" and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        group = self.process_group or dist.group.WORLD
        if dist.get_world_size(group) == 1:
            return super().forward(input)
        self._check_input_dim(input)
        x = input.float()
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.full((1,), x.numel() / max(x.shape[1], 1), dtype=torch.float32)
        total = _AllReduceSum.apply(torch.cat([x.sum(dims), count]), group)
        n = total[-1].detach()
        if float(n) < 2:
            raise ValueError(f"SyncBatchNorm: {int(n)} value(s) per channel over all processes; need at least 2")
        mean = total[:-1] / n
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply(centred.pow(2).sum(dims), group) / n  # biased, for normalising
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * (n / (n - 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def cpu_capable_sync_bn(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.SyncBatchNorm`` in ``module`` (e.g. from Detectron2's
    builders) into ``SyncBatchNorm`` in place: same parameters, same GPU path."""
    for m in module.modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = SyncBatchNorm
    return module


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
