"""The dataset index (the list of image files) built once per job and cached.

Listing ImageNet's 1.28 M files from each of 32 processes on a network file system is
slow and loads the server. Here the main process lists the folder, or reads the cached
index of an earlier run (``OUTPUT_DIR/dataset_index/``, so a requeued or restarted job
reuses it), and every other process receives it. The cache is valid while the folder's
signature holds: the modification times of the root and of its sub-folders (a file
added to or removed from a class folder changes that folder's time).
"""
import hashlib
import json
import logging
import os
import time
from typing import Callable, List, Optional

from ..utils import comm

__all__ = ["set_index_cache_dir", "shared_index", "folder_signature"]

logger = logging.getLogger("scrl_d2.data")
_CACHE_DIR: Optional[str] = None
_FORMAT = 1


def set_index_cache_dir(path: Optional[str]) -> None:
    """Where indexes are cached (None or "": no cache, list every time)."""
    global _CACHE_DIR
    _CACHE_DIR = path or None


def folder_signature(root: str) -> List:
    """Modification times (ns) of ``root`` and of its direct sub-folders: one stat each."""
    sig = [os.stat(root).st_mtime_ns]
    with os.scandir(root) as it:
        subs = sorted((e.name, e.stat(follow_symlinks=True).st_mtime_ns) for e in it
                      if e.is_dir(follow_symlinks=True))
    return sig + [list(s) for s in subs]


def _cache_path(key: str) -> str:
    return os.path.join(_CACHE_DIR, "dataset_index", hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")


def _load(path: str, key: str, signature: List) -> Optional[dict]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if data.get("format") != _FORMAT or data.get("key") != key or data.get("signature") != signature:
        return None
    return data["index"]


def _save(path: str, key: str, signature: List, index: dict) -> None:
    from ..utils.fs import WriteError, atomic_write

    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda f: json.dump({"format": _FORMAT, "key": key, "signature": signature,
                                                "index": index}, f), mode="w")
    except (OSError, WriteError) as e:
        logger.warning(f"cannot cache the dataset index at {path}: {e}")


def shared_index(root: str, kind: str, build: Callable[[], dict]) -> dict:
    """``build()`` (a JSON-able index of ``root``) run by the main process only, or
    read from its cache; every process returns the same index."""
    if comm.get_world_size() > 1 and not comm.is_main_process():
        index = comm.broadcast_object(None)
    else:
        index = _index_here(root, kind, build)
        if comm.get_world_size() > 1:
            comm.broadcast_object(index)
    if isinstance(index, BaseException):  # the main process failed: fail the same way everywhere
        raise index
    return index


def _index_here(root: str, kind: str, build: Callable[[], dict]):
    try:
        key = f"{kind}:{os.path.abspath(root)}"
        path = _cache_path(key) if _CACHE_DIR else ""
        signature = folder_signature(root) if path else None
        if path:
            cached = _load(path, key, signature)
            if cached is not None:
                logger.info(f"dataset index of {root} read from {path}")
                return cached
        t0 = time.perf_counter()
        index = build()
        logger.info(f"indexed {root} in {time.perf_counter() - t0:.1f}s"
                    f"{'; cached at ' + path if path else ''}")
        if path:
            _save(path, key, signature, index)
        return index
    except Exception as e:  # sent to the other processes, which raise it too
        if comm.get_world_size() > 1:
            return e
        raise
