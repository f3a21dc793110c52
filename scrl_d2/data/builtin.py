"""The built-in pretraining and classification datasets, by name (as Detectron2's
``data/datasets/builtin.py``): one row per split of :data:`PREDEFINED_SPLITS`, under the
datasets root (``DATASETS.ROOT``, else ``$SCRL_DATASETS`` / ``$DETECTRON2_DATASETS``) or
generated on first use. The detection splits are in :mod:`scrl_d2.detection.builtin`.
"""
import os
from typing import Callable, Dict, Tuple

from .catalog import DatasetCatalog, class_folder_dicts, get_datasets_root, image_folder_dicts
from .demo import ensure_demo_images
from .scenes import SCENE_SETS, ensure_scene_set

__all__ = ["PREDEFINED_SPLITS", "register_all_builtin"]


def _under_root(rel: str) -> Callable[[], str]:
    return lambda: os.path.join(get_datasets_root(), rel)


def _demo(split: str) -> Callable[[], str]:
    return lambda: os.path.join(ensure_demo_images(), split)


def _scenes(name: str, split: str) -> Callable[[], str]:
    return lambda: os.path.join(ensure_scene_set(name), split)


# name -> (layout, folder): "classes" = one sub-folder per class (labelled), "images" =
# every image below the folder (unlabelled, label -1).
PREDEFINED_SPLITS: Dict[str, Tuple[str, Callable[[], str]]] = {
    "imagenet_train": ("classes", _under_root("imagenet/train")),
    "imagenet_val": ("classes", _under_root("imagenet/val")),
    "coco_2017_train_images": ("images", _under_root("coco/train2017")),
    "coco_2017_unlabeled_images": ("images", _under_root("coco/unlabeled2017")),
    "scrl_demo_train": ("classes", _demo("train")),
    "scrl_demo_val": ("classes", _demo("val")),
    **{f"scrl_scenes_{n}_pretrain": ("images", _scenes(n, "pretrain")) for n in SCENE_SETS},
    **{f"scrl_scenes_{n}_{s}": ("classes", _scenes(n, s)) for n in SCENE_SETS for s in ("cls_train", "cls_val")},
}


def register_all_builtin() -> None:
    for name, (layout, folder) in PREDEFINED_SPLITS.items():
        read = class_folder_dicts if layout == "classes" else image_folder_dicts
        DatasetCatalog.register(name, lambda read=read, folder=folder, name=name: read(folder(), name))


register_all_builtin()
