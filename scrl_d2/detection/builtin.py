"""The built-in detection datasets: one table of splits (as Detectron2's
``data/datasets/builtin.py``), each row a name, its format and where its files are under
the datasets root (or a generator of built-in data). Adding a split is one row; adding a
format is one module of :mod:`.formats`.

- COCO json: ``coco_2017_{train,val}``, ``keypoints_coco_2017_{train,val}``, the label-
  scarce subsets ``coco_2017_train_{1,10}pct_seed{1..5}`` (:mod:`.subsets`), the built-in
  ``scrl_demo_det_{train,val}`` (and its subsets), the study's
  ``scrl_scenes_<set>_det_{train,val}`` (:mod:`scrl_d2.data.scenes`);
- Pascal VOC: ``voc_{2007,2012}_{trainval,train,val}``, ``voc_2007_test``;
- Cityscapes (Detectron2 only): ``cityscapes_fine_instance_seg_{train,val}``;
- LVIS v1 (Detectron2 only): ``lvis_v1_{train,val}``.
"""
import os
from typing import Callable, Dict, List, Tuple

from ..data import catalog
from ..data.scenes import SCENE_SETS, ensure_scene_set
from .catalog import DetectionDataset, register_dataset
from .formats import get_format
from .subsets import SEEDS, SUBSETS, subset_indices
from .synthetic import ensure_synthetic_detection

__all__ = ["PREDEFINED_SPLITS", "register_all_builtin"]


def _root(rel: str) -> str:
    return os.path.join(catalog.get_datasets_root(), rel)


def _coco(json_rel: str, img_rel: str) -> Callable[[], Dict[str, str]]:
    return lambda: {"json_file": _root(json_rel), "image_root": _root(img_rel)}


def _generated(ensure: Callable[[], str], split: str) -> Callable[[], Dict[str, str]]:
    def paths() -> Dict[str, str]:
        root = ensure()
        return {"json_file": os.path.join(root, "annotations", f"{split}.json"),
                "image_root": os.path.join(root, split)}
    return paths


def _subset(pct: int, seed: int) -> Callable[[int], List[int]]:
    return lambda n: subset_indices(n, pct, seed)


_TRAIN2017 = ("coco/annotations/instances_train2017.json", "coco/train2017")

# name -> (format, paths() -> {key: path}, extra DetectionDataset fields)
PREDEFINED_SPLITS: Dict[str, Tuple[str, Callable[[], Dict[str, str]], Dict]] = {
    **{f"coco_2017_{s}": ("coco", _coco(f"coco/annotations/instances_{s}2017.json", f"coco/{s}2017"), {})
       for s in ("train", "val")},
    **{f"keypoints_coco_2017_{s}": ("coco", _coco(f"coco/annotations/person_keypoints_{s}2017.json",
                                                  f"coco/{s}2017"), {}) for s in ("train", "val")},
    **{f"coco_2017_train_{p}pct_seed{k}": ("coco", _coco(*_TRAIN2017), {"keep": _subset(p, k)})
       for p in SUBSETS for k in SEEDS},
    **{f"scrl_demo_det_{s}": ("coco", _generated(ensure_synthetic_detection, s), {}) for s in ("train", "val")},
    **{f"scrl_demo_det_train_{p}pct_seed{k}": ("coco", _generated(ensure_synthetic_detection, "train"),
                                               {"keep": _subset(p, k)}) for p in SUBSETS for k in SEEDS},
    **{f"scrl_scenes_{n}_{s}": ("coco", _generated(lambda n=n: ensure_scene_set(n), s), {})
       for n in SCENE_SETS for s in ("det_train", "det_val")},
    **{f"voc_{y}_{s}": ("voc", lambda y=y: {"dirname": _root(f"VOC{y}")}, {"year": y, "split": s})
       for y, splits in ((2007, ("trainval", "train", "val", "test")), (2012, ("trainval", "train", "val")))
       for s in splits},
    **{f"cityscapes_fine_instance_seg_{s}": ("cityscapes", lambda s=s: {
        "image_dir": _root(f"cityscapes/leftImg8bit/{s}"), "gt_dir": _root(f"cityscapes/gtFine/{s}")}, {})
       for s in ("train", "val")},
    **{f"lvis_v1_{s}": ("lvis", lambda s=s: {"json_file": _root(f"lvis/lvis_v1_{s}.json"),
                                             "image_root": _root("coco")}, {}) for s in ("train", "val")},
}


def register_all_builtin() -> None:
    for name, (fmt, paths, extra) in PREDEFINED_SPLITS.items():
        register_dataset(DetectionDataset(name, fmt, paths, get_format(fmt).evaluator_type, **extra))


register_all_builtin()
