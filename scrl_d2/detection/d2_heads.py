"""Detectron2 heads that transfer protocols of the field name in their configs."""
from detectron2.layers import get_norm
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import Res5ROIHeads

__all__ = ["Res5ROIHeadsExtraNorm"]


if "Res5ROIHeadsExtraNorm" not in ROI_HEADS_REGISTRY:  # another package (MoCo's train_net) may have it

    @ROI_HEADS_REGISTRY.register()
    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        """MoCo's C4 protocol: the res5 box head with one more norm layer
        (``MODEL.RESNETS.NORM``) after res5. The pretrained res5 ends in a residual sum
        with no norm; the extra norm re-centres its output for the fresh predictor."""

        @classmethod
        def _build_res5_block(cls, cfg):
            res5, channels = super()._build_res5_block(cfg)
            res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, channels))
            return res5, channels
else:
    Res5ROIHeadsExtraNorm = ROI_HEADS_REGISTRY.get("Res5ROIHeadsExtraNorm")
