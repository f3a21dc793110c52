"""COCO-format detection datasets by name, for both fine-tuning paths.

``coco_2017_{train,val}`` (``coco/train2017`` + ``coco/annotations/instances_*.json``
under the datasets root, Detectron2's convention), ``scrl_demo_det_{train,val}`` (the
built-in synthetic set), and any json + image folder via :func:`register_coco_json`.
Registered with Detectron2's catalogs too when Detectron2 is installed.
"""
import os
from typing import Callable, Dict, Tuple

from ..backend import detectron2_available
from ..data import catalog
from .synthetic import ensure_synthetic_detection

__all__ = ["DETECTION_DATASETS", "register_coco_json", "get_coco_json"]

# name -> function returning (json path, image root)
DETECTION_DATASETS: Dict[str, Callable[[], Tuple[str, str]]] = {}


def _under_root(json_rel: str, img_rel: str) -> Callable[[], Tuple[str, str]]:
    def fn():
        root = catalog.get_datasets_root()
        return os.path.join(root, json_rel), os.path.join(root, img_rel)
    return fn


def _synthetic(split: str) -> Callable[[], Tuple[str, str]]:
    def fn():
        root = ensure_synthetic_detection()
        return os.path.join(root, "annotations", f"{split}.json"), os.path.join(root, split)
    return fn


def register_coco_json(name: str, json_file, image_root=None) -> None:
    """Register a COCO-format dataset. ``json_file`` may be a path (with ``image_root``)
    or a function returning ``(json path, image root)``, resolved when first used."""
    fn = json_file if callable(json_file) else (lambda: (json_file, image_root))
    DETECTION_DATASETS[name] = fn
    if detectron2_available():
        from detectron2.data import DatasetCatalog, MetadataCatalog
        from detectron2.data.datasets import load_coco_json

        if name not in DatasetCatalog.list():
            def load(fn=fn, name=name):
                j, r = get_coco_json(name)
                MetadataCatalog.get(name).set(json_file=j, image_root=r, evaluator_type="coco")
                return load_coco_json(j, r, name)
            DatasetCatalog.register(name, load)
        meta = MetadataCatalog.get(name)
        if not hasattr(meta, "evaluator_type"):
            meta.set(evaluator_type="coco")


def get_coco_json(name: str) -> Tuple[str, str]:
    """``(json path, image root)`` of a registered name; errors name the missing path."""
    if name not in DETECTION_DATASETS:
        raise KeyError(f"detection dataset {name!r} is not registered; registered: {sorted(DETECTION_DATASETS)}")
    json_file, image_root = DETECTION_DATASETS[name]()
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"detection dataset {name!r}: annotation file not found: {os.path.abspath(json_file)} "
                                "(set DATASETS.ROOT, $SCRL_DATASETS or $DETECTRON2_DATASETS)")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"detection dataset {name!r}: image folder not found: {os.path.abspath(image_root)}")
    if detectron2_available():
        _point_detectron2_at(name, json_file, image_root)
    return json_file, image_root


def _point_detectron2_at(name: str, json_file: str, image_root: str) -> None:
    """Make Detectron2's catalogs read ``name`` from these paths. Detectron2 registers
    ``coco_2017_*`` itself, from ``$DETECTRON2_DATASETS`` at import, and refuses to change
    a metadata path: re-register the name (keeping its other metadata) when ours differ."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    meta = MetadataCatalog.get(name)
    if getattr(meta, "json_file", json_file) == json_file and getattr(meta, "image_root", image_root) == image_root:
        meta.set(json_file=json_file, image_root=image_root)
        return
    # Class lists come from the json again (load_coco_json sets them); the rest is kept.
    kept = {k: v for k, v in meta.as_dict().items()
            if k not in ("name", "json_file", "image_root") and not k.startswith(("thing_", "stuff_"))}
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, **kept)


def _register_builtin() -> None:
    for split in ("train", "val"):
        register_coco_json(f"coco_2017_{split}", _under_root(f"coco/annotations/instances_{split}2017.json",
                                                           f"coco/{split}2017"))
        register_coco_json(f"scrl_demo_det_{split}", _synthetic(split))


_register_builtin()
