"""scrl_d2: SCRL and BYOL self-supervised pretraining for object detection.

When Detectron2 is installed, importing this package registers ``SCRL`` and ``BYOL`` in
``detectron2.modeling.META_ARCH_REGISTRY`` and MoCo's ``Res5ROIHeadsExtraNorm`` in its
``ROI_HEADS_REGISTRY`` (see :func:`register_detectron2`), so
``detectron2.modeling.build_model(cfg)`` builds them from our YAML files.
"""
from .backend import backend_name, detectron2_available, use_detectron2

__version__ = "0.1.0"
__all__ = ["register_detectron2", "backend_name", "detectron2_available", "use_detectron2"]


def register_detectron2() -> bool:
    """Register SCRL and BYOL in Detectron2's META_ARCH_REGISTRY (idempotent).
    Returns False (and does nothing) when Detectron2 is not installed."""
    if not detectron2_available():
        return False
    from detectron2.modeling import META_ARCH_REGISTRY as D2_META_ARCH_REGISTRY

    from .modeling.meta_arch import BYOL, SCRL

    for cls in (BYOL, SCRL):
        if cls.__name__ not in D2_META_ARCH_REGISTRY:
            D2_META_ARCH_REGISTRY.register(cls)
    from .detection import d2_heads  # noqa: F401  (Res5ROIHeadsExtraNorm for the MoCo C4 protocols)

    return True


register_detectron2()
