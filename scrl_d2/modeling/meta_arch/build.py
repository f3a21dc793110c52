from fvcore.common.registry import Registry
from torch import nn

from ...utils.errors import InputKeyError

__all__ = ["META_ARCH_REGISTRY", "build_model"]

META_ARCH_REGISTRY = Registry("META_ARCH")
META_ARCH_REGISTRY.__doc__ = "Pretraining meta-architectures (BYOL, SCRL): cls(cfg) -> nn.Module."


def build_model(cfg, num_classes: int = 0) -> nn.Module:
    """The meta-architecture named by ``MODEL.META_ARCHITECTURE`` (on the CPU).

    ``num_classes``: classes of the training data, for the optional online probe."""
    name = cfg.MODEL.META_ARCHITECTURE
    try:
        cls = META_ARCH_REGISTRY.get(name)
    except KeyError as e:
        raise InputKeyError(f"MODEL.META_ARCHITECTURE: no meta-architecture {name!r}; registered: "
                            f"{sorted(k for k, _ in META_ARCH_REGISTRY)}") from e
    return cls(cfg, num_classes=num_classes)
