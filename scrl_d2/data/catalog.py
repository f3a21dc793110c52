"""Named datasets, as Detectron2's ``DatasetCatalog`` / ``MetadataCatalog``.

A dataset is a function returning a list of ``{"file_name": str, "label": int}``
(``label`` is -1 for unlabelled images). Besides registered names, two forms need no
registration: ``"images:PATH"`` (every image below PATH, recursive, unlabelled; e.g.
COCO ``train2017`` or ``unlabeled2017``) and ``"classes:PATH"`` (one sub-folder per
class, as ImageNet's ``train/`` and ``val/``).
"""
import os
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

from ..utils.errors import InputFileNotFoundError, InputKeyError
from .index import shared_index

__all__ = [
    "DatasetCatalog", "MetadataCatalog", "IMAGE_EXTENSIONS", "get_datasets_root",
    "set_datasets_root", "apply_datasets_root", "list_images", "class_folder_dicts", "image_folder_dicts",
    "register_image_folder",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")
_ROOT: Optional[str] = None


def set_datasets_root(root: str) -> None:
    """Root of the standard layouts; empty restores the environment default."""
    global _ROOT
    _ROOT = root or None


def apply_datasets_root(cfg) -> None:
    """The one place a config's ``DATASETS.ROOT`` takes effect (empty: ``$SCRL_DATASETS``,
    ``$DETECTRON2_DATASETS`` or ``datasets``): the data entry points call it before they
    resolve a built-in name (:func:`scrl_d2.data.build.dataset_dicts_of`,
    :func:`scrl_d2.detection.run_finetune`)."""
    set_datasets_root(cfg.DATASETS.ROOT)


def get_datasets_root() -> str:
    return _ROOT or os.environ.get("SCRL_DATASETS") or os.environ.get("DETECTRON2_DATASETS") or "datasets"


class _DatasetCatalog:
    def __init__(self) -> None:
        self._funcs: Dict[str, Callable[[], List[dict]]] = {}

    def register(self, name: str, func: Callable[[], List[dict]]) -> None:
        if name in self._funcs:
            raise ValueError(f"dataset {name!r} is already registered")
        self._funcs[name] = func

    def get(self, name: str) -> List[dict]:
        if name.startswith("images:"):
            return image_folder_dicts(name[len("images:"):], name)
        if name.startswith("classes:"):
            return class_folder_dicts(name[len("classes:"):], name)
        if name not in self._funcs:
            raise InputKeyError(
                f"dataset {name!r} is not registered; registered: {sorted(self._funcs)} "
                "(or use 'images:PATH' / 'classes:PATH')"
            )
        return self._funcs[name]()

    def list(self) -> List[str]:
        return sorted(self._funcs)

    def remove(self, name: str) -> None:
        self._funcs.pop(name, None)

    def __contains__(self, name: str) -> bool:
        return name in self._funcs


class _MetadataCatalog:
    def __init__(self) -> None:
        self._meta: Dict[str, SimpleNamespace] = {}

    def get(self, name: str) -> SimpleNamespace:
        return self._meta.setdefault(name, SimpleNamespace(name=name))


DatasetCatalog = _DatasetCatalog()
MetadataCatalog = _MetadataCatalog()


def _require_dir(path: str, name: str) -> None:
    if not os.path.isdir(path):
        raise InputFileNotFoundError(
            f"dataset {name!r}: directory not found: {os.path.abspath(path)} "
            "(set DATASETS.ROOT or $SCRL_DATASETS, or pass the path explicitly)"
        )


def list_images(root: str) -> List[str]:
    """Every image file below ``root`` (recursive, following links), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    return out


def image_folder_dicts(root: str, name: Optional[str] = None) -> List[dict]:
    name = name or root
    _require_dir(root, name)

    def build() -> dict:
        return {"files": [os.path.relpath(f, root) for f in list_images(root)]}

    files = shared_index(root, "images", build)["files"]
    if not files:
        raise InputFileNotFoundError(f"dataset {name!r}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    MetadataCatalog.get(name).num_classes = 0
    return [{"file_name": os.path.join(root, f), "label": -1} for f in files]


def class_folder_dicts(root: str, name: Optional[str] = None) -> List[dict]:
    name = name or root
    _require_dir(root, name)

    def build() -> dict:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        return {"classes": classes,
                "files": [[os.path.relpath(f, root) for f in list_images(os.path.join(root, c))] for c in classes]}

    index = shared_index(root, "classes", build)  # listed once per job (and cached), not by every process
    classes = index["classes"]
    if not classes:
        raise InputFileNotFoundError(f"dataset {name!r}: no class sub-folders under {root}")
    dicts = [{"file_name": os.path.join(root, f), "label": label}
             for label, files in enumerate(index["files"]) for f in files]
    if not dicts:
        raise InputFileNotFoundError(f"dataset {name!r}: no images in the class folders under {root}")
    meta = MetadataCatalog.get(name)
    meta.classes, meta.num_classes = classes, len(classes)
    return dicts


def register_image_folder(name: str, root: str, labeled: bool = True) -> None:
    """Register a folder by name: class sub-folders when ``labeled``, else any images."""
    fn = class_folder_dicts if labeled else image_folder_dicts
    DatasetCatalog.register(name, lambda: fn(root, name))
