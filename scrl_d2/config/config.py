"""Config object, ``get_cfg`` and the ``@configurable`` pattern of Detectron2."""
import functools
import inspect
from typing import Any, Callable, Dict, Optional

import yaml
from fvcore.common.config import CfgNode as _FvCfgNode

from ..utils.errors import ConfigError
from .defaults import AUGMENT_DEVICES

__all__ = ["CfgNode", "ConfigError", "get_cfg", "config_from_args", "add_scrl_config", "configurable", "check_config"]


class CfgNode(_FvCfgNode):
    """fvcore's CfgNode (``_BASE_`` inheritance, strict keys) with two additions:

    * an int given where the default is a float is accepted (``SOLVER.BASE_LR 1``);
    * every unknown key or wrongly typed value raises :class:`ConfigError` naming the
      key and the file it came from, instead of yacs' bare ``KeyError``.
    """

    @classmethod
    def load_file(cls, cfg_filename: str, allow_unsafe: bool = False) -> dict:
        """The file with its ``_BASE_`` chain merged; a missing or malformed file raises
        :class:`ConfigError` naming it."""
        try:
            return cls.load_yaml_with_base(cfg_filename, allow_unsafe=allow_unsafe) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {cfg_filename}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {cfg_filename} is not valid YAML: {e}") from e

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = False) -> None:
        loaded = type(self)(self.load_file(cfg_filename, allow_unsafe))
        _coerce_ints(self, loaded, prefix="")
        try:
            self.merge_from_other_cfg(loaded)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"{_msg(e)} (in {cfg_filename})") from e

    def merge_from_list(self, cfg_list: list) -> None:
        if len(cfg_list) % 2 != 0:
            raise ConfigError(
                f"command-line overrides must be KEY VALUE pairs, got an odd list: {cfg_list}"
            )
        fixed = []
        for key, value in zip(cfg_list[0::2], cfg_list[1::2]):
            default = self._get_or_none(key)
            if isinstance(default, float) and isinstance(value, str):
                try:
                    value = repr(float(value))
                except ValueError:
                    pass
            fixed += [key, value]
        try:
            super().merge_from_list(fixed)
        except (KeyError, ValueError, AssertionError) as e:
            raise ConfigError(f"{_msg(e)} (on the command line)") from e

    def _get_or_none(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            if not isinstance(node, _FvCfgNode) or part not in node:
                return None
            node = node[part]
        return node


def _msg(e: BaseException) -> str:
    return str(e.args[0]) if e.args else str(e)


def _coerce_ints(default: _FvCfgNode, loaded: _FvCfgNode, prefix: str) -> None:
    for k, v in loaded.items():
        if k not in default:
            continue  # reported by name during the merge
        d = default[k]
        if isinstance(v, _FvCfgNode) and isinstance(d, _FvCfgNode):
            _coerce_ints(d, v, prefix + k + ".")
        elif isinstance(d, float) and isinstance(v, int) and not isinstance(v, bool):
            loaded[k] = float(v)
        elif isinstance(d, (tuple, list)) and isinstance(v, (tuple, list)):
            if d and all(isinstance(x, float) for x in d):
                loaded[k] = type(v)(float(x) if isinstance(x, int) else x for x in v)


def get_cfg(detection: bool = False) -> CfgNode:
    """A fresh copy of the defaults.

    Pretraining (default): ``scrl_d2/config/defaults.py``; with the Detectron2 backend,
    Detectron2's own defaults come underneath (its builders read keys we do not define)
    and ours take precedence wherever both define a key. ``detection=True``: Detectron2's
    defaults for every detection key (its ``get_cfg()``, or the same values kept in
    ``detection_defaults.py`` without it), and ours only for keys Detectron2 lacks, so a
    detection config means exactly what it means in Detectron2.
    """
    from ..backend import use_detectron2
    from .defaults import _C
    from .detection_defaults import detection_defaults

    ours = CfgNode(_C.clone())
    d2 = use_detectron2()
    if d2:
        from detectron2.config import get_cfg as d2_get_cfg

        base = CfgNode(d2_get_cfg())
    else:
        base = CfgNode(detection_defaults())
    if detection:
        _add_missing(base, ours)
        return base
    if d2:
        _overlay(base, ours)
        return base
    _add_missing(ours, base)
    return ours


# Meta-architectures whose configs take scrl_d2's (pretraining) defaults; any other
# (GeneralizedRCNN, RetinaNet ...) is a Detectron2 config and takes Detectron2's.
PRETRAINING_ARCHITECTURES = ("SCRL", "BYOL")


def config_from_args(config_file: str, opts: Optional[list] = None) -> CfgNode:
    """The config of a command line: the defaults its META_ARCHITECTURE calls for (see
    :func:`get_cfg`), then the file, then the KEY VALUE overrides."""
    arch = CfgNode.load_file(config_file).get("MODEL", {}).get("META_ARCHITECTURE") if config_file else None
    opts = list(opts or [])
    for key, value in zip(opts[0::2], opts[1::2]):
        if key == "MODEL.META_ARCHITECTURE":
            arch = value
    cfg = get_cfg(detection=arch is not None and arch not in PRETRAINING_ARCHITECTURES)
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    return cfg


# Values a run cannot use, caught before any process starts: (key, valid?, what is expected).
_RULES = [
    ("SOLVER.IMS_PER_GPU", lambda v: v >= 1, "an integer >= 1 (images per process)"),
    ("TEST.IMS_PER_GPU", lambda v: v >= 1, "an integer >= 1"),
    ("LINEAR_EVAL.IMS_PER_GPU", lambda v: v >= 1, "an integer >= 1"),
    ("SOLVER.EPOCHS", lambda v: v >= 1, "an integer >= 1"),
    ("SOLVER.WARMUP_EPOCHS", lambda v: v >= 0, "an integer >= 0"),
    ("SOLVER.MAX_ITER", lambda v: v >= 0, "an integer >= 0 (0: the whole schedule)"),
    ("SOLVER.BASE_LR", lambda v: 0 < v < float("inf"), "a finite number > 0"),
    ("SOLVER.SNAPSHOT_INTERVAL", lambda v: v >= 1, "an integer >= 1 (epochs)"),
    ("SOLVER.SNAPSHOT_MAX_TO_KEEP", lambda v: v >= 0, "an integer >= 0 (0: keep all)"),
    ("SOLVER.CHECKPOINT_PERIOD", lambda v: v >= 0, "an integer >= 0 (iterations; 0: epoch checkpoints only)"),
    ("SOLVER.CHECKPOINT_MAX_TO_KEEP", lambda v: v >= 0, "an integer >= 0 (0: keep all)"),
    ("DATALOADER.NUM_WORKERS", lambda v: v >= 0, "an integer >= 0"),
    ("INPUT.CROP_SIZE", lambda v: v >= 1, "an integer >= 1 (pixels)"),
    ("MODEL.SCRL.NUM_BOXES", lambda v: v >= 1, "an integer >= 1"),
    ("MODEL.SCRL.MIN_SIZE", lambda v: v >= 1, "an integer >= 1 (pixels)"),
    ("MODEL.SCRL.MAX_TRIES", lambda v: v >= 1, "an integer >= 1"),
    ("MODEL.SCRL.IOU_THRESHOLD", lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ("LINEAR_EVAL.EPOCHS", lambda v: v >= 1, "an integer >= 1"),
    ("KNN.K", lambda v: v >= 1, "an integer >= 1"),
    ("LOG_PERIOD", lambda v: v >= 1, "an integer >= 1 (iterations)"),
    ("INPUT.AUGMENT_DEVICE", lambda v: v in AUGMENT_DEVICES, "one of " + ", ".join(map(repr, AUGMENT_DEVICES))),
]


def check_config(cfg: _FvCfgNode) -> None:
    """Raise :class:`ConfigError` naming the first key whose value cannot work."""
    for key, ok, expected in _RULES:
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, _FvCfgNode) else None
        if node is not None and not ok(node):
            raise ConfigError(f"{key}: {node!r} is not valid; expected {expected}")


def _overlay(dst: _FvCfgNode, src: _FvCfgNode) -> None:
    for k, v in src.items():
        if isinstance(v, _FvCfgNode) and isinstance(dst.get(k), _FvCfgNode):
            _overlay(dst[k], v)
        else:
            dst[k] = v.clone() if isinstance(v, _FvCfgNode) else v


def add_scrl_config(cfg: _FvCfgNode) -> None:
    """Add every scrl_d2 key that ``cfg`` lacks (e.g. Detectron2's own ``get_cfg()``).

    Keys ``cfg`` already has keep their values, so Detectron2's defaults for shared keys
    (``MODEL.RESNETS.*``) stay Detectron2's; our YAML files then set them explicitly.
    """
    _add_missing(cfg, get_cfg())


def _add_missing(dst: _FvCfgNode, src: _FvCfgNode) -> None:
    was_frozen = dst.is_frozen()
    dst.defrost()
    for k, v in src.items():
        if k not in dst:  # a subtree takes the target's class (Detectron2's CfgNode there)
            dst[k] = type(dst)(v.clone()) if isinstance(v, _FvCfgNode) else v
        elif isinstance(v, _FvCfgNode) and isinstance(dst[k], _FvCfgNode):
            _add_missing(dst[k], v)
    if was_frozen:
        dst.freeze()


def configurable(init_func: Optional[Callable] = None, *, from_config: Optional[Callable] = None):
    """Let a class or function be built either from a config or from explicit arguments.

    Same contract as Detectron2's ``@configurable``: ``Cls(cfg, **overrides)`` calls
    ``Cls.from_config(cfg, ...)`` and passes its dict to ``__init__``; ``Cls(a=..)``
    calls ``__init__`` directly.
    """
    if init_func is not None and inspect.isfunction(init_func) and init_func.__name__ == "__init__":

        @functools.wraps(init_func)
        def wrapped(self, *args, **kwargs):
            if _called_with_cfg(*args, **kwargs):
                explicit = _get_args_from_config(type(self).from_config, *args, **kwargs)
                init_func(self, **explicit)
            else:
                init_func(self, *args, **kwargs)

        return wrapped

    assert from_config is not None, "@configurable on a function needs from_config="

    def decorator(func):
        @functools.wraps(func)
        def wrapped(*args, **kwargs):
            if _called_with_cfg(*args, **kwargs):
                return func(**_get_args_from_config(from_config, *args, **kwargs))
            return func(*args, **kwargs)

        wrapped.from_config = from_config
        return wrapped

    return decorator


def _called_with_cfg(*args, **kwargs) -> bool:
    if args and isinstance(args[0], _FvCfgNode):
        return True
    return isinstance(kwargs.get("cfg"), _FvCfgNode)


def _get_args_from_config(from_config: Callable, *args, **kwargs) -> Dict[str, Any]:
    params = inspect.signature(from_config).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        ret = from_config(*args, **kwargs)
    else:
        accepted = set(params)
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in accepted}
        ret = from_config(*args, **kwargs)
        ret.update(extra)
    return ret
