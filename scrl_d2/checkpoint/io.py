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
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from fvcore.common.checkpoint import Checkpointer as _FvCheckpointer

__all__ = ["atomic_write", "atomic_torch_save", "load_checkpoint_file", "Checkpointer", "list_epoch_checkpoints",
           "CheckpointWriteError", "remove_stale_temporaries", "prune_epoch_checkpoints"]

logger = logging.getLogger("scrl_d2.checkpoint")
_TMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # atomic_write's temporary names


class CheckpointWriteError(OSError):
    """A checkpoint (or any file written atomically) that could not be written: full disk,
    quota, permissions. Names the file, the free space and the size needed; the previous
    file of that name is intact."""


def _umask_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _umask_mode()  # what open() would give a new file here


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors and arrays in ``obj``: about what ``torch.save`` writes."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return getattr(obj, "nbytes", 0) if hasattr(obj, "dtype") else 0


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 28 else f"{n / 2 ** 20:.1f} MiB"


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb", size_hint: int = 0) -> None:
    """Call ``write(f)`` on a temporary file, fsync it, then rename it to ``path`` (with
    the mode the umask gives new files). A failed write raises :class:`CheckpointWriteError`
    naming the file, the free space and ``size_hint``; the temporary file is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600: teammates must read checkpoints
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, CheckpointWriteError):
            free = shutil.disk_usage(directory).free
            need = f", about {_gib(size_hint)} needed" if size_hint else ""
            raise CheckpointWriteError(f"cannot write {path}: {e} ({_gib(free)} free in {directory}{need}); "
                                       "the previous file of that name, if any, is intact") from e
        raise


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


def remove_stale_temporaries(directory: str) -> List[str]:
    """Delete the temporary files of writes that a kill interrupted; returns their names."""
    if not os.path.isdir(directory):
        return []
    stale = [f for f in os.listdir(directory) if _TMP_RE.match(f)]
    for f in stale:
        try:
            os.remove(os.path.join(directory, f))
        except OSError:
            pass
    return stale


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
