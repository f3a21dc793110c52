"""Projector / predictor MLPs and the RoI pooler (the two places SCRL touches)."""
from typing import Tuple

import torch
from torch import nn
from torchvision.ops import roi_align

from .layers import get_norm1d

__all__ = ["MLPHead", "BoxPooler"]


class MLPHead(nn.Module):
    """Linear -> norm -> ReLU -> Linear(no bias), as BYOL. Attribute ``net`` keeps the
    official release's key names (``projector.net.0.weight``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, norm: str = "BN"):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            get_norm1d(norm, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BoxPooler(nn.Module):
    """RoIAlign of boxes given in input-image pixels from a feature map of ``stride``:
    Detectron2's ``ROIAlign`` with that backend, else torchvision's ``roi_align``.

    Always pools in float32, as the release did: a half-precision RoI cannot hold the
    batch index of a 256-image view (bf16 integers are exact only up to 256, fp16 up to
    2048) nor a box coordinate (bf16 rounds 128..256 to whole pixels). Detectron2's
    ``ROIAlign`` casts the RoIs to the feature dtype, so the features go in as float32."""

    def __init__(self, output_size: int = 1, stride: int = 32, sampling_ratio: int = 0, aligned: bool = False):
        super().__init__()
        self.output_size: Tuple[int, int] = (output_size, output_size)
        self.spatial_scale = 1.0 / stride
        self.sampling_ratio = sampling_ratio if sampling_ratio > 0 else -1  # torchvision: <=0 adaptive
        self.aligned = aligned

        from ..backend import use_detectron2

        self.d2_roi_align = None
        if use_detectron2():
            from detectron2.layers import ROIAlign

            self.d2_roi_align = ROIAlign(self.output_size, self.spatial_scale, max(sampling_ratio, 0), aligned)

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """``rois``: ``[N, 5]`` (batch index, x1, y1, x2, y2) -> ``[N, C * r * r]`` in the
        features' dtype (what autocast's RoIAlign returns)."""
        if rois.dtype != torch.float32:
            raise TypeError(f"BoxPooler: RoIs must be float32 to keep image indices and coordinates exact, "
                            f"got {rois.dtype}")
        x = features.float()
        if self.d2_roi_align is not None:
            out = self.d2_roi_align(x, rois)
        else:
            out = roi_align(x, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)
        return out.flatten(1).to(features.dtype)
