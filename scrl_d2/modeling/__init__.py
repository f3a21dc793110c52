from .backbone import BACKBONE_REGISTRY, ResNet, build_backbone, build_resnet_backbone
from .heads import BoxPooler, MLPHead
from .layers import Conv2d, ShapeSpec, get_norm
from .meta_arch import BYOL, META_ARCH_REGISTRY, SCRL, build_model, regression_loss, symmetric_loss

__all__ = [
    "BACKBONE_REGISTRY", "ResNet", "build_backbone", "build_resnet_backbone",
    "BoxPooler", "MLPHead", "Conv2d", "ShapeSpec", "get_norm", "BYOL", "META_ARCH_REGISTRY", "SCRL",
    "build_model", "regression_loss", "symmetric_loss",
]
