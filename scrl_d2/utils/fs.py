"""Files that are never half-written: one write (:func:`atomic_write`), one generated
folder (:func:`generate_once`), one JSON text that strict parsers accept
(:func:`finite_json`). Every module that writes a result, a checkpoint or generated data
goes through these, so an interrupted run never leaves a torn file behind.
"""
import fcntl
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any, Callable, List

__all__ = ["WriteError", "atomic_write", "remove_stale_temporaries", "generate_once", "finite_json", "nan_to_none",
           "checkout_root"]

_TMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # atomic_write's temporary names


class WriteError(OSError):
    """A file written atomically (a checkpoint, a result) that could not be written: full disk,
    quota, permissions. Names the file, the free space and the size needed; the previous
    file of that name is intact."""


def _umask() -> int:
    """The process's umask now, read without changing it where Linux reports it (setting
    and restoring it would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode() -> int:
    """What ``open()`` would give a new file now (the umask may change during a run)."""
    return 0o666 & ~_umask()


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 28 else f"{n / 2 ** 20:.1f} MiB"


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb", size_hint: int = 0) -> None:
    """Call ``write(f)`` on a temporary file, fsync it, then rename it to ``path`` (with
    the mode the umask gives new files). A failed write raises :class:`WriteError`
    naming the file, the free space and ``size_hint``; the temporary file is removed."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600: teammates must read checkpoints
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, WriteError):
            free = shutil.disk_usage(directory).free
            need = f", about {_gib(size_hint)} needed" if size_hint else ""
            raise WriteError(f"cannot write {path}: {e} ({_gib(free)} free in {directory}{need}); "
                             "the previous file of that name, if any, is intact") from e
        raise


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


def generate_once(root: str, version: str, fill: Callable[[str], None]) -> str:
    """Run ``fill(tmp_dir)`` once and move the result to ``root`` atomically: readers see
    a finished folder or none. Concurrent processes (two jobs, two test workers) take turns
    on a lock file beside ``root``: the second finds the first's folder finished and uses it,
    so a finished folder is never replaced under a reader."""
    marker = os.path.join(root, f".complete-v{version}")
    if os.path.exists(marker):
        return root
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    with open(os.path.join(parent, f".{os.path.basename(root)}.lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            locked = True
        except OSError:  # a file system without flock (Lustre -o noflock): race, tolerating a lost rename
            locked = False
        if os.path.exists(marker):  # another process finished it while this one waited
            return root
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}-", dir=parent)
        try:
            fill(tmp)
            open(os.path.join(tmp, f".complete-v{version}"), "w").close()
            if os.path.exists(marker):  # unlocked: another process finished first; keep its folder
                return root
            if os.path.exists(root):  # an unfinished or older version's folder
                shutil.rmtree(root, ignore_errors=True)
            try:
                os.rename(tmp, root)
            except OSError:
                if locked or not os.path.exists(marker):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def nan_to_none(v: Any) -> Any:
    """``v`` with every non-finite float (an undefined metric, e.g. APl with no large
    objects) replaced by ``None``, through dicts, lists and tuples."""
    if isinstance(v, dict):
        return {k: nan_to_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [nan_to_none(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def finite_json(v: Any, indent: int = 1) -> str:
    """JSON text that strict parsers accept: NaN and infinities are written as ``null``."""
    return json.dumps(nan_to_none(v), indent=indent, allow_nan=False)


def checkout_root() -> str:
    """The checkout whose ``configs/`` and ``tools/`` the demos and the transfer suite use:
    the folder above the package (``pip install -e .``, the documented install), else the
    current folder when it is a checkout (a non-editable install run from the checkout, as
    ``python tools/...`` is). A checkout holds ``configs/scrl_pretrain.yaml``: any other
    ``configs/`` folder (another package's in site-packages) is not one."""
    def is_checkout(d: str) -> bool:
        return os.path.isfile(os.path.join(d, "configs", "scrl_pretrain.yaml"))

    above = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if is_checkout(above) or not is_checkout(os.curdir):
        return above
    return os.path.abspath(os.curdir)
