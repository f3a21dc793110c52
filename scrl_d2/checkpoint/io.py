"""Checkpoint files that are never half-written, and the run's checkpointer.

Every file goes to a temporary name in the same directory, is flushed to disk and then
renamed over the target (``os.replace`` is atomic on POSIX), so an interrupted save
leaves the previous checkpoint intact. ``checkpoint_last.pth`` is a symlink to the
newest ``checkpoint_{epoch}.pth`` (a copy where links are not allowed), as in the
official release; ``last_checkpoint`` names it for fvcore/Detectron2 tooling.
"""
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Optional

import torch
from fvcore.common.checkpoint import Checkpointer as _FvCheckpointer

__all__ = ["atomic_write", "atomic_torch_save", "load_checkpoint_file", "Checkpointer", "list_epoch_checkpoints"]

logger = logging.getLogger("scrl_d2.checkpoint")


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(f)`` on a temporary file, fsync it, then rename it to ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj: Any, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """Load a checkpoint on the CPU; a clear error for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {e}") from e


_EPOCH_RE = re.compile(r"^checkpoint_(\d+)(?:_iter(\d+))?\.pth$")


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

    if use_detectron2():
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
        if f.endswith(".pkl"):  # Detectron2 / model-zoo format
            return super()._load_file(f)
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
                raise ValueError("checkpoint does not match the model: " + "; ".join(problems)
                                 + " (a different MODEL.* config?)")
        return incompatible

    def load_model_only(self, path: str) -> Optional[Any]:
        return self.load(path, checkpointables=[])
