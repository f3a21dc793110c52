from .build import META_ARCH_REGISTRY, build_model
from .byol import BYOL, regression_loss, symmetric_loss
from .scrl import SCRL

__all__ = ["META_ARCH_REGISTRY", "build_model", "BYOL", "SCRL", "regression_loss", "symmetric_loss"]
