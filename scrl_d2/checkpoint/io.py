"""Checkpoint files that are never half-written, and the run's checkpointer.

Every file goes to a temporary name in the same directory, is flushed to disk and then
renamed over the target (``os.replace`` is atomic on POSIX), so an interrupted save
leaves the previous checkpoint intact. ``checkpoint_last.pth`` is a symlink to the
newest ``checkpoint_{epoch}.pth`` (a copy where links are not allowed), as in the
official release; ``last_checkpoint`` names it for fvcore/Detectron2 tooling.

Files are read without running code: ``.pth`` with ``torch.load(weights_only=True)``
(tensors, numbers, strings and containers only), Detectron2's ``.pkl`` with an unpickler
that rebuilds numpy arrays and nothing else. A file that needs more (an object whose
unpickling calls a function) is refused with one line, unless the user asked for the
unsafe load (``--unsafe-load`` / ``SCRL_D2_UNSAFE_LOAD=1``), which warns.
"""
import logging
import os
import pickle
import re
import shutil
import warnings
import zipfile
from typing import Any, Dict, List, Optional, Sequence

import torch
from fvcore.common.checkpoint import Checkpointer as _FvCheckpointer

from ..utils.errors import InputFileNotFoundError, InputValueError
from ..utils.fs import atomic_write, remove_stale_temporaries

__all__ = ["atomic_torch_save", "load_checkpoint_file", "load_pickle_file", "load_weights_file",
           "Checkpointer", "SafeLoading", "list_epoch_checkpoints", "has_run_checkpoint",
           "UnsafeCheckpointError", "UNSAFE_LOAD_ENV", "unsafe_load_allowed",
           "prune_epoch_checkpoints"]

logger = logging.getLogger("scrl_d2.checkpoint")


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors and arrays in ``obj``: about what ``torch.save`` writes."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return getattr(obj, "nbytes", 0) if hasattr(obj, "dtype") else 0


def atomic_torch_save(obj: Any, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), size_hint=_nbytes(obj))


def prune_epoch_checkpoints(directory: str, keep_last: int, keep: Sequence[str] = ()) -> List[str]:
    """Delete all but the newest ``keep_last`` ``checkpoint_{epoch}[_iter{n}].pth`` files of
    ``directory`` (0: keep all), never one named in ``keep`` nor the one ``checkpoint_last``
    points to. Returns the deleted paths."""
    if keep_last <= 0:
        return []
    found = list_epoch_checkpoints(directory)
    last = os.path.realpath(os.path.join(directory, "checkpoint_last.pth"))
    keep = {os.path.realpath(k) for k in keep} | {last}
    gone = [f for f in found[:-keep_last] if os.path.realpath(f) not in keep]
    for f in gone:
        os.remove(f)
    return gone


UNSAFE_LOAD_ENV = "SCRL_D2_UNSAFE_LOAD"


class UnsafeCheckpointError(InputValueError):
    """A file whose unpickling would call functions (it could run code); refused unless
    the unsafe load is allowed."""


def unsafe_load_allowed() -> bool:
    """Whether the user asked to load files that need full unpickling: ``--unsafe-load``
    (which sets it, so spawned workers and subprocesses see it too) or
    ``SCRL_D2_UNSAFE_LOAD=1``."""
    return os.environ.get(UNSAFE_LOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _refuse_or_warn(path: str, names: Sequence[str]) -> None:
    """One line refusing ``path`` (whose unpickling calls ``names``), or, with the unsafe
    load allowed, a warning that it is loaded anyway."""
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    older = (" (numpy arrays: e.g. the random state in checkpoints of earlier scrl_d2 versions)"
             if names and all(n.split(".")[0] == "numpy" for n in names) else "")
    if not unsafe_load_allowed():
        raise UnsafeCheckpointError(
            f"{path} is not loaded: unpickling it would call {shown}{older}, and a file that holds more than "
            f"tensors and plain values can run any code when it is loaded. If you trust where it came from, rerun "
            f"with --unsafe-load (or {UNSAFE_LOAD_ENV}=1)")
    logger.warning(f"{path}: loaded with full unpickling ({UNSAFE_LOAD_ENV}=1 / --unsafe-load), which calls {shown}; "
                   "this runs whatever code the file holds: only do it for files from a source you trust")


def _unsafe_globals(path: str, error: BaseException) -> List[str]:
    """The functions and classes a ``.pth`` file's unpickling would call that
    ``weights_only`` refuses ([] when the file is unreadable for another reason)."""
    if zipfile.is_zipfile(path):
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:
            pass
    m = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    return [m.group(1)] if m else []


def _reason(error: BaseException) -> str:
    """The gist of a load error in one line (torch's weights_only errors are paragraphs)."""
    text = str(error)
    m = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
    if m:
        text = m.group(1)
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Load a ``torch.save`` file on the CPU without running code (``weights_only``); a
    clear error for a missing or unreadable file or one that needs the unsafe load."""
    if not os.path.isfile(path):
        raise InputFileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        names = _unsafe_globals(path, e)
        if not names:
            raise InputValueError(f"{path} is not a readable PyTorch checkpoint: {_reason(e)}") from e
        _refuse_or_warn(path, names)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise InputValueError(f"{path} is not a readable PyTorch checkpoint: {_reason(e)}") from e


# What Detectron2's .pkl files (its model zoo, tools/convert.py's output, Caffe2 / MSRA
# weights, pickled by Python 2 or 3 with numpy 1 or 2) need to rebuild name -> ndarray
# dicts; none of them calls anything but numpy's array constructors.
_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                   ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                   ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
                   ("_codecs", "encode")}


class _Refused(pickle.UnpicklingError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _WeightsUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, numbers, strings and numpy arrays; refuses any other global."""

    def find_class(self, module: str, name: str):
        if (module, name) in _PICKLE_GLOBALS or (module == "numpy.dtypes" and name.endswith("DType")):
            with warnings.catch_warnings():  # numpy 2 names numpy.core deprecated; files still use it
                warnings.simplefilter("ignore", DeprecationWarning)
                return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def load_pickle_file(path: str) -> Any:
    """A Detectron2 ``.pkl`` (a Python pickle) read by an unpickler that only rebuilds
    numpy arrays, so loading it runs no code; anything else needs the unsafe load."""
    if not os.path.isfile(path):
        raise InputFileNotFoundError(f"weights file not found: {path}")
    try:
        with open(path, "rb") as f:
            return _WeightsUnpickler(f, encoding="latin1").load()
    except _Refused as e:
        _refuse_or_warn(path, [e.name])
    except Exception as e:
        raise InputValueError(f"{path} is not a readable Detectron2 .pkl file: {_reason(e)}") from e
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as e:
        raise InputValueError(f"{path} is not a readable Detectron2 .pkl file: {_reason(e)}") from e


def load_weights_file(path: str) -> Dict[str, Any]:
    """A weights file as Detectron2's ``DetectionCheckpointer._load_file`` returns it
    (``{"model": ..., ...}``; Caffe2 / MSRA ``.pkl`` blobs with ``matching_heuristics``),
    read safely (:func:`load_checkpoint_file`, :func:`load_pickle_file`)."""
    if not path.endswith(".pkl"):
        loaded = load_checkpoint_file(path)
        return loaded if isinstance(loaded, dict) and "model" in loaded else {"model": loaded}
    data = load_pickle_file(path)
    if not isinstance(data, dict):
        raise InputValueError(f"{path}: a Detectron2 .pkl holds a dict, this one a {type(data).__name__}")
    if "model" in data and "__author__" in data:  # Detectron2's model zoo format
        return data
    if "blobs" in data:  # Caffe2 detection models; ImageNet ones are the blobs themselves
        data = data["blobs"]
    data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
    return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}


class SafeLoading:
    """Mix into fvcore's ``Checkpointer`` or Detectron2's ``DetectionCheckpointer``
    (``class C(SafeLoading, DetectionCheckpointer)``) so that it reads files as
    :func:`load_weights_file` does: no code runs unless the unsafe load is allowed."""

    def _load_file(self, f: str) -> Dict[str, Any]:
        if f.endswith(".pkl"):
            return load_weights_file(f)
        if hasattr(super(), "_torch_load"):  # Detectron2's: keeps its URL-query handling
            return super()._load_file(f)
        return load_weights_file(f)

    def _torch_load(self, f: str) -> Any:
        return load_checkpoint_file(f)


_EPOCH_RE = re.compile(r"^checkpoint_(\d+)(?:_iter(\d+))?\.pth$")
# every checkpoint a run of this project resumes from: pretraining's epoch and mid-epoch
# files, the iteration checkpoints (SOLVER.CHECKPOINT_PERIOD) and fine-tuning's
# Detectron2 names, on both fine-tuning paths
_RUN_CHECKPOINT_RE = re.compile(r"^(?:checkpoint_\d+(?:_iter\d+)?|model_\d{7,}|model_final)\.pth$")


def has_run_checkpoint(directory: str) -> bool:
    """Whether ``directory`` holds a checkpoint a run of this project wrote (so a rerun
    there resumes it): ``checkpoint_{epoch}[_iter{n}].pth``, ``model_{iter:07d}.pth``,
    ``model_final.pth``, a file its ``last_checkpoint`` names, or a linear evaluation's
    checkpoint in its ``linear_eval/``."""
    if not directory or not os.path.isdir(directory):
        return False
    if any(_RUN_CHECKPOINT_RE.match(f) for f in os.listdir(directory)):
        return True
    tag = os.path.join(directory, "last_checkpoint")
    if os.path.isfile(tag):
        try:
            with open(tag) as f:
                name = f.read().strip()
        except OSError:
            name = ""
        if name and os.path.isfile(os.path.join(directory, name)):
            return True
    return bool(list_epoch_checkpoints(os.path.join(directory, "linear_eval")))


def list_epoch_checkpoints(directory: str) -> List[str]:
    """``checkpoint_{epoch}[_iter{n}].pth`` files of ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for f in os.listdir(directory):
        m = _EPOCH_RE.match(f)
        if m:
            found.append((int(m.group(1)), int(m.group(2) or 0), f))
    return [os.path.join(directory, f) for _, _, f in sorted(found)]


def _base_checkpointer():
    from ..backend import use_detectron2

    if use_detectron2(quiet=True):  # at import: a bad SCRL_D2_BACKEND is the command line's to report
        from detectron2.checkpoint import DetectionCheckpointer

        return DetectionCheckpointer
    return _FvCheckpointer


class Checkpointer(_base_checkpointer()):
    """fvcore's Checkpointer (Detectron2's ``DetectionCheckpointer`` with that backend)
    with atomic saves, the release's file names, strict loading for resume, and a
    fallback to the newest complete file."""

    def __init__(self, model, save_dir: str = "", *, save_to_disk: bool = True, strict: bool = True,
                 **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.strict = strict
        self.logger = logger
        if save_dir and save_to_disk:
            stale = remove_stale_temporaries(save_dir)
            if stale:
                logger.info(f"removed {len(stale)} temporary file(s) of interrupted writes in {save_dir}")

    def save(self, name: str, tag_last: bool = True, **kwargs: Any) -> str:
        """Write ``name.pth``; ``tag_last=False`` leaves ``checkpoint_last`` alone (best-so-far files)."""
        if not self.save_dir or not self.save_to_disk:
            return ""
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        atomic_torch_save(data, path)
        if tag_last:
            self.tag_last_checkpoint(basename)
        self.logger.info(f"saved checkpoint {path}")
        return path

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write(os.path.join(self.save_dir, "last_checkpoint"),
                     lambda f: f.write(last_filename_basename), mode="w")
        link = os.path.join(self.save_dir, "checkpoint_last.pth")
        tmp = link + ".tmp-link"
        try:
            if os.path.lexists(tmp):
                os.remove(tmp)
            os.symlink(last_filename_basename, tmp)
            os.replace(tmp, link)
        except OSError:  # no symlinks here: an atomic copy instead
            if os.path.lexists(tmp):
                os.remove(tmp)
            src = os.path.join(self.save_dir, last_filename_basename)
            atomic_write(link, lambda f: shutil.copyfileobj(open(src, "rb"), f))

    def get_checkpoint_file(self) -> str:
        tagged = super().get_checkpoint_file()
        if tagged and os.path.isfile(tagged):
            return tagged
        found = list_epoch_checkpoints(self.save_dir)
        return found[-1] if found else ""

    def has_checkpoint(self) -> bool:
        return bool(self.save_dir) and bool(self.get_checkpoint_file())

    def _load_file(self, f: str) -> Dict[str, Any]:
        if f.endswith(".pkl"):  # Detectron2 / model-zoo format, read without running code
            return load_weights_file(f)
        return load_checkpoint_file(f)

    def _load_model(self, checkpoint: Any):
        incompatible = super()._load_model(checkpoint)
        if self.strict and incompatible is not None:
            problems = []
            if incompatible.missing_keys:
                problems.append(f"missing keys {incompatible.missing_keys[:8]}")
            if incompatible.unexpected_keys:
                problems.append(f"unexpected keys {incompatible.unexpected_keys[:8]}")
            if incompatible.incorrect_shapes:
                problems.append(f"wrong shapes {incompatible.incorrect_shapes[:8]}")
            if problems:
                raise InputValueError("checkpoint does not match the model: " + "; ".join(problems)
                                      + " (a different MODEL.* config?)")
        return incompatible

    def load_model_only(self, path: str) -> Optional[Any]:
        return self.load(path, checkpointables=[])
