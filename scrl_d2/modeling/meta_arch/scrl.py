"""SCRL: BYOL's objective on RoI-pooled features of spatially matched box pairs."""
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ...config import configurable
from ..heads import BoxPooler
from .build import META_ARCH_REGISTRY
from .byol import BYOL

__all__ = ["SCRL"]


@META_ARCH_REGISTRY.register()
class SCRL(BYOL):
    """Each valid box pair of the batch is a unit: the online box feature of one view
    regresses the target projection of the same original-image region in the other."""

    @configurable
    def __init__(self, *, pooler: nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.pooler = pooler

    @classmethod
    def from_config(cls, cfg, num_classes: int = 0) -> dict:
        ret = super().from_config(cfg, num_classes)
        stride = ret["backbone"].output_shape()[ret["in_feature"]].stride
        s = cfg.MODEL.SCRL
        ret["pooler"] = BoxPooler(s.POOLER_RESOLUTION, stride, s.POOLER_SAMPLING_RATIO, s.POOLER_ALIGNED)
        return ret

    @staticmethod
    def pooled_dim(cfg, channels: int) -> int:
        return channels * cfg.MODEL.SCRL.POOLER_RESOLUTION ** 2

    def pool(self, features: torch.Tensor, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor], int]:
        # RoIs in float32 whatever the autocast dtype: the image index (up to 2B - 1)
        # and the coordinates must stay exact (see BoxPooler).
        boxes1, boxes2 = batch["boxes1"].float(), batch["boxes2"].float()
        valid = batch["box_valid"]
        B, K = valid.shape
        img = torch.arange(B, device=boxes1.device, dtype=torch.float32).view(B, 1, 1).expand(B, K, 1)
        rois1 = torch.cat([img, boxes1], dim=2).view(-1, 5)
        rois2 = torch.cat([img + B, boxes2], dim=2).view(-1, 5)
        # The loader computes the valid pairs' indices on the host (PretrainCollate), so
        # their number is known without reading a device tensor back.
        idx = batch.get("pair_index")
        if idx is None:
            idx = valid.reshape(-1).nonzero().squeeze(1)
        num = idx.numel()
        if num >= 2:
            idx = idx.to(rois1.device, non_blocking=True)
            rois, weight = torch.cat([rois1[idx], rois2[idx]]), None
        else:
            # Too few pairs for the heads' batch norm: run every box with zero weight, so
            # the step contributes no gradient yet all processes keep the same graph.
            rois, weight, num = torch.cat([rois1, rois2]), torch.zeros(B * K, device=features.device), 0
        return self.pooler(features, rois), weight, num
