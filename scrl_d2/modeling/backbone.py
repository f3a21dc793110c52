"""The encoder: a ResNet with Detectron2's module names, built by name from config.

Parameter names are Detectron2's (``stem.conv1.weight``, ``res2.0.conv1.norm.weight``,
``res2.0.shortcut.weight`` ...), so a checkpoint moves between this backbone and
Detectron2's ``build_resnet_backbone`` untouched, and ``tools/convert.py`` has one
target layout. With ``STRIDE_IN_1X1: False`` the network is exactly torchvision's
ResNet v1.5 (``scrl_d2.checkpoint.layouts`` maps its state dict).
"""
from typing import Dict, List

import torch
import torch.nn.functional as F
from fvcore.common.registry import Registry
from torch import nn

from ..utils.errors import InputKeyError, InputValueError
from .layers import Conv2d, ShapeSpec, cpu_capable_sync_bn, get_norm

__all__ = ["BACKBONE_REGISTRY", "build_backbone", "ResNet", "build_resnet_backbone"]

BACKBONE_REGISTRY = Registry("BACKBONE")
BACKBONE_REGISTRY.__doc__ = "Encoders: fn(cfg) -> nn.Module returning {name: feature} with output_shape()."


def _msra_init(conv: nn.Conv2d) -> None:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class BasicStem(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, norm: str):
        super().__init__()
        self.conv1 = Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False,
                            norm=get_norm(norm, out_channels))
        _msra_init(self.conv1)
        self.out_channels, self.stride = out_channels, 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu_(self.conv1(x)), kernel_size=3, stride=2, padding=1)


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, norm: str = "BN", **_):
        super().__init__()
        self.shortcut = (
            Conv2d(in_channels, out_channels, 1, stride=stride, bias=False, norm=get_norm(norm, out_channels))
            if in_channels != out_channels else None
        )
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False,
                            norm=get_norm(norm, out_channels))
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, bias=False, norm=get_norm(norm, out_channels))
        for m in (self.shortcut, self.conv1, self.conv2):
            if m is not None:
                _msra_init(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu_(self.conv1(x)))
        return F.relu_(out + (self.shortcut(x) if self.shortcut is not None else x))


class BottleneckBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, *, bottleneck_channels: int, stride: int = 1,
                 num_groups: int = 1, norm: str = "BN", stride_in_1x1: bool = False, dilation: int = 1):
        super().__init__()
        self.shortcut = (
            Conv2d(in_channels, out_channels, 1, stride=stride, bias=False, norm=get_norm(norm, out_channels))
            if in_channels != out_channels else None
        )
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2d(in_channels, bottleneck_channels, 1, stride=s1, bias=False,
                            norm=get_norm(norm, bottleneck_channels))
        self.conv2 = Conv2d(bottleneck_channels, bottleneck_channels, 3, stride=s3, padding=dilation,
                            bias=False, groups=num_groups, dilation=dilation,
                            norm=get_norm(norm, bottleneck_channels))
        self.conv3 = Conv2d(bottleneck_channels, out_channels, 1, bias=False, norm=get_norm(norm, out_channels))
        for m in (self.shortcut, self.conv1, self.conv2, self.conv3):
            if m is not None:
                _msra_init(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(F.relu_(self.conv2(F.relu_(self.conv1(x)))))
        return F.relu_(out + (self.shortcut(x) if self.shortcut is not None else x))


_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


class ResNet(nn.Module):
    """Stem + res2..res5; ``forward`` returns the features named in ``out_features``."""

    def __init__(self, depth: int = 50, norm: str = "BN", out_features=("res5",), num_groups: int = 1,
                 width_per_group: int = 64, stem_out_channels: int = 64, res2_out_channels: int = 256,
                 stride_in_1x1: bool = False, res5_dilation: int = 1, freeze_at: int = 0):
        super().__init__()
        if depth not in _BLOCKS:
            raise InputValueError(f"MODEL.RESNETS.DEPTH: {depth} is not one of {sorted(_BLOCKS)}")
        if depth in (18, 34) and res2_out_channels != 64:
            raise InputValueError(f"MODEL.RESNETS.RES2_OUT_CHANNELS must be 64 for depth {depth}, "
                                  f"got {res2_out_channels}")
        self.stem = BasicStem(3, stem_out_channels, norm)
        self._out_features = list(out_features)
        self._shapes = {"stem": ShapeSpec(stem_out_channels, 4)}
        in_ch, out_ch, bottleneck = stem_out_channels, res2_out_channels, num_groups * width_per_group
        self.stage_names: List[str] = []
        for i, n in enumerate(_BLOCKS[depth]):
            name = f"res{i + 2}"
            dilation = res5_dilation if i == 3 else 1
            first_stride = 1 if i == 0 or dilation > 1 else 2
            blocks = []
            for b in range(n):
                kw = dict(stride=first_stride if b == 0 else 1, norm=norm)
                if depth >= 50:
                    block = BottleneckBlock(in_ch, out_ch, bottleneck_channels=bottleneck, num_groups=num_groups,
                                            stride_in_1x1=stride_in_1x1, dilation=dilation, **kw)
                else:
                    block = BasicBlock(in_ch, out_ch, **kw)
                blocks.append(block)
                in_ch = out_ch
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            prev = self._shapes["stem"].stride if i == 0 else self._shapes[f"res{i + 1}"].stride
            self._shapes[name] = ShapeSpec(out_ch, prev * first_stride)
            out_ch *= 2
            bottleneck *= 2
        unknown = set(self._out_features) - set(self._shapes)
        if unknown:
            raise InputValueError(f"MODEL.RESNETS.OUT_FEATURES: unknown {sorted(unknown)}; have {list(self._shapes)}")
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """Detectron2's FREEZE_AT: 1 freezes the stem, 2 also res2, and so on."""
        for i, m in enumerate([self.stem] + [getattr(self, n) for n in self.stage_names], start=1):
            if i <= freeze_at:
                for p in m.parameters():
                    p.requires_grad_(False)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {k: self._shapes[k] for k in self._out_features}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        outputs = {}
        x = self.stem(x)
        if "stem" in self._out_features:
            outputs["stem"] = x
        last = max(self._out_features, key=lambda k: self._shapes[k].stride if k != "stem" else 0)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
            if name == last:
                break
        return outputs


@BACKBONE_REGISTRY.register()
def build_resnet_backbone(cfg) -> ResNet:
    r = cfg.MODEL.RESNETS
    return ResNet(depth=r.DEPTH, norm=r.NORM, out_features=r.OUT_FEATURES, num_groups=r.NUM_GROUPS,
                  width_per_group=r.WIDTH_PER_GROUP, stem_out_channels=r.STEM_OUT_CHANNELS,
                  res2_out_channels=r.RES2_OUT_CHANNELS, stride_in_1x1=r.STRIDE_IN_1X1,
                  res5_dilation=r.RES5_DILATION, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


def build_backbone(cfg) -> nn.Module:
    """The encoder named by MODEL.BACKBONE.NAME: from Detectron2's BACKBONE_REGISTRY
    with the Detectron2 backend, else from ours. Both return ``{"res5": ...}`` and
    share parameter names."""
    from ..backend import use_detectron2

    if use_detectron2():
        from detectron2.modeling import build_backbone as d2_build_backbone

        return cpu_capable_sync_bn(d2_build_backbone(cfg))
    name = cfg.MODEL.BACKBONE.NAME
    try:
        fn = BACKBONE_REGISTRY.get(name)
    except KeyError as e:
        raise InputKeyError(f"MODEL.BACKBONE.NAME: no backbone {name!r}; registered: "
                            f"{sorted(k for k, _ in BACKBONE_REGISTRY)}") from e
    return fn(cfg)

