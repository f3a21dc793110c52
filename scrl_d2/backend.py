"""Which library builds the components: Detectron2 when installed, else torchvision.

The method code never imports Detectron2; it asks this module. ``SCRL_D2_BACKEND``
(``auto`` | ``detectron2`` | ``torchvision``) forces a choice, e.g. to compare the two
in one environment; ``auto`` (default) uses Detectron2 whenever it imports.
"""
import functools
import importlib.util
import os
import warnings

from .utils.errors import ConfigError

__all__ = ["detectron2_available", "use_detectron2", "backend_name"]


@functools.lru_cache()
def detectron2_available() -> bool:
    if importlib.util.find_spec("detectron2") is None:
        return False
    try:
        with warnings.catch_warnings():  # its import-time torch.jit.script deprecation notices
            warnings.simplefilter("ignore", FutureWarning)
            import detectron2.layers  # noqa: F401  (its C++ ops must load)
            import detectron2.modeling  # noqa: F401
    except Exception:  # an installed but broken build: use the torchvision path
        return False
    return True


def use_detectron2(quiet: bool = False) -> bool:
    """``quiet``: for choices made while modules import, a bad SCRL_D2_BACKEND means the
    torchvision path there; the command line then reports it (one line, exit 2)."""
    if quiet:
        try:
            return use_detectron2()
        except ConfigError:
            return False
    choice = os.environ.get("SCRL_D2_BACKEND", "auto").lower()
    if choice == "torchvision":
        return False
    if choice == "detectron2":
        if not detectron2_available():
            raise ConfigError("SCRL_D2_BACKEND=detectron2 but Detectron2 is not installed (or does not import); "
                              "install it (see docs/detectron2.md) or unset SCRL_D2_BACKEND")
        return True
    if choice != "auto":
        raise ConfigError(f"SCRL_D2_BACKEND: {choice!r} is not 'auto', 'detectron2' or 'torchvision'")
    return detectron2_available()


def backend_name() -> str:
    return "detectron2" if use_detectron2() else "torchvision"
