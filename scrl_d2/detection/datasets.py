"""Detection datasets by name, for both fine-tuning paths, in Detectron2's layout under the
datasets root (``DATASETS.ROOT``, else ``$SCRL_DATASETS`` / ``$DETECTRON2_DATASETS``) and
with Detectron2's builtin names and meaning:

- COCO json: ``coco_2017_{train,val}``, ``keypoints_coco_2017_{train,val}``, the label-
  scarce subsets ``coco_2017_train_{1,10}pct_seed{1..5}`` (:mod:`.subsets`), the built-in
  ``scrl_demo_det_{train,val}``, the study's ``scrl_scenes_<set>_det_{train,val}``
  (:mod:`scrl_d2.data.scenes`), and any json + image folder (:func:`register_coco_json`);
- Pascal VOC: ``voc_{2007,2012}_{trainval,train,val}``, ``voc_2007_test``;
- Cityscapes (Detectron2 only): ``cityscapes_fine_instance_seg_{train,val}``;
- LVIS v1 (Detectron2 only): ``lvis_v1_{train,val}``.

With Detectron2 installed, its catalogs serve every name, pointed at our root (Detectron2
registers its builtins once, from ``$DETECTRON2_DATASETS`` at import).
"""
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from ..backend import detectron2_available
from ..data import catalog
from ..utils.errors import InputFileNotFoundError, InputKeyError
from .synthetic import ensure_synthetic_detection

__all__ = ["DETECTION_DATASETS", "DetectionDataset", "register_coco_json", "get_coco_json", "get_dataset",
           "check_dataset_files"]


@dataclass
class DetectionDataset:
    """Where a named dataset lives and how it is read and evaluated.

    ``kind``: ``coco`` / ``voc`` / ``cityscapes`` / ``lvis`` (the on-disk format);
    ``paths()``: the files, resolved under the datasets root when called;
    ``evaluator``: Detectron2's ``evaluator_type`` (``coco``, ``pascal_voc``,
    ``cityscapes_instance``, ``lvis``); ``keep``: sorted-image-id indices to keep (subsets).
    """

    name: str
    kind: str
    paths: Callable[[], Dict[str, str]]
    evaluator: str
    year: int = 0
    split: str = ""
    keep: Optional[Callable[[int], list]] = field(default=None, repr=False)


DETECTION_DATASETS: Dict[str, DetectionDataset] = {}


def _root(rel: str) -> str:
    return os.path.join(catalog.get_datasets_root(), rel)


def register_coco_json(name: str, json_file, image_root=None, evaluator: str = "coco", keep=None) -> None:
    """Register a COCO-format dataset. ``json_file`` may be a path (with ``image_root``)
    or a function returning ``(json path, image root)``, resolved when first used."""
    fn = json_file if callable(json_file) else (lambda: (json_file, image_root))

    def paths(fn=fn):
        j, r = fn()
        return {"json_file": j, "image_root": r}
    DETECTION_DATASETS[name] = DetectionDataset(name, "coco", paths, evaluator, keep=keep)
    if detectron2_available():
        from detectron2.data import DatasetCatalog, MetadataCatalog

        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, lambda name=name: _load_detectron2(name))
        meta = MetadataCatalog.get(name)
        if not hasattr(meta, "evaluator_type"):
            meta.set(evaluator_type=evaluator)


def get_dataset(name: str) -> DetectionDataset:
    if name not in DETECTION_DATASETS:
        raise InputKeyError(f"detection dataset {name!r} is not registered; registered: {sorted(DETECTION_DATASETS)}")
    return DETECTION_DATASETS[name]


def check_dataset_files(name: str) -> Dict[str, str]:
    """The dataset's files; a missing one raises FileNotFoundError naming it. With
    Detectron2 installed, its catalogs are pointed at these paths."""
    ds = get_dataset(name)
    paths = ds.paths()
    for key, path in paths.items():
        is_file = key.endswith("_file")
        if not (os.path.isfile(path) if is_file else os.path.isdir(path)):
            what = "annotation file" if is_file else "folder"
            raise InputFileNotFoundError(f"detection dataset {name!r}: {what} not found: {os.path.abspath(path)} "
                                         "(set DATASETS.ROOT, $SCRL_DATASETS or $DETECTRON2_DATASETS)")
    if detectron2_available():
        if ds.kind in ("cityscapes", "lvis"):
            from .d2_compat import alias_cityscapesscripts, numpy_compat

            numpy_compat()
            if ds.kind == "cityscapes":
                alias_cityscapesscripts()
        _point_detectron2_at(ds, paths)
    return paths


def get_coco_json(name: str) -> Tuple[str, str]:
    """``(json path, image root)`` of a COCO-json dataset (any kind: the paths checked)."""
    paths = check_dataset_files(name)
    return paths.get("json_file", ""), paths.get("image_root", paths.get("dirname", ""))


# ---------------------------------------------------------------------------- Detectron2
def _load_detectron2(name: str):
    """Dataset dicts of a COCO-json name by Detectron2's ``load_coco_json`` (its class
    lists and metadata), kept to the subset's images where ``keep`` is set."""
    from detectron2.data.datasets import load_coco_json

    ds = get_dataset(name)
    paths = check_dataset_files(name)
    dicts = load_coco_json(paths["json_file"], paths["image_root"], name)
    if ds.keep is not None:
        ids = sorted(d["image_id"] for d in dicts)
        kept = {ids[i] for i in ds.keep(len(ids))}
        dicts = [d for d in dicts if d["image_id"] in kept]
    return dicts


def _point_detectron2_at(ds: DetectionDataset, paths: Dict[str, str]) -> None:
    """Make Detectron2's catalogs read ``ds`` from ``paths``. Detectron2 refuses to change
    a metadata path: re-register the name (keeping its other metadata) when ours differ."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    meta = MetadataCatalog.get(ds.name)
    current = {k: getattr(meta, k, v) for k, v in paths.items()}
    if current == paths and ds.name in DatasetCatalog.list():
        meta.set(**paths)
        return
    # Class lists of COCO-json sets come from the json again (load_coco_json sets them).
    drop = ("name",) + tuple(paths) + (("thing_",) if ds.kind == "coco" else ())
    kept = {k: v for k, v in meta.as_dict().items() if not k.startswith(drop)}
    if ds.name in DatasetCatalog.list():
        DatasetCatalog.remove(ds.name)
    MetadataCatalog.remove(ds.name)
    if ds.kind == "coco":
        DatasetCatalog.register(ds.name, lambda name=ds.name: _load_detectron2(name))
    elif ds.kind == "voc":
        from detectron2.data.datasets.pascal_voc import load_voc_instances

        from .voc import VOC_CLASSES

        classes = kept.pop("thing_classes", list(VOC_CLASSES))
        DatasetCatalog.register(ds.name, lambda d=paths["dirname"], s=ds.split, c=classes: load_voc_instances(d, s, c))
        kept["thing_classes"] = classes
    elif ds.kind == "cityscapes":
        from detectron2.data.datasets.cityscapes import load_cityscapes_instances

        from .d2_compat import alias_cityscapesscripts

        alias_cityscapesscripts()
        DatasetCatalog.register(ds.name, lambda x=paths["image_dir"], y=paths["gt_dir"]:
                                load_cityscapes_instances(x, y, from_json=True, to_polygons=True))
    elif ds.kind == "lvis":
        from detectron2.data.datasets.lvis import load_lvis_json

        # load_lvis_json joins image_root and the coco_url's folder as strings
        root = os.path.join(paths["image_root"], "")
        DatasetCatalog.register(ds.name, lambda j=paths["json_file"], r=root, n=ds.name: load_lvis_json(j, r, n))
    MetadataCatalog.get(ds.name).set(**paths, evaluator_type=ds.evaluator,
                                     **{k: v for k, v in kept.items() if k != "evaluator_type"})


# ---------------------------------------------------------------------------- builtins
def _synthetic(split: str) -> Callable[[], Tuple[str, str]]:
    def fn():
        root = ensure_synthetic_detection()
        return os.path.join(root, "annotations", f"{split}.json"), os.path.join(root, split)
    return fn


def _scenes(name: str, split: str) -> Callable[[], Tuple[str, str]]:
    def fn():
        from ..data.scenes import ensure_scene_set

        root = ensure_scene_set(name)
        return os.path.join(root, "annotations", f"{split}.json"), os.path.join(root, split)
    return fn


def _coco(json_rel: str, img_rel: str) -> Callable[[], Tuple[str, str]]:
    return lambda: (_root(json_rel), _root(img_rel))


def _register(ds: DetectionDataset) -> None:
    DETECTION_DATASETS[ds.name] = ds
    if detectron2_available() and ds.kind != "coco":
        from detectron2.data import DatasetCatalog

        if ds.name not in DatasetCatalog.list():  # not one of Detectron2's builtins
            _point_detectron2_at(ds, ds.paths())


def _register_builtin() -> None:
    from ..data.scenes import SCENE_SETS
    from .subsets import SEEDS, SUBSETS, subset_indices

    for name in SCENE_SETS:
        for split in ("det_train", "det_val"):
            register_coco_json(f"scrl_scenes_{name}_{split}", _scenes(name, split))

    for split in ("train", "val"):
        register_coco_json(f"coco_2017_{split}", _coco(f"coco/annotations/instances_{split}2017.json",
                                                       f"coco/{split}2017"))
        register_coco_json(f"keypoints_coco_2017_{split}",
                           _coco(f"coco/annotations/person_keypoints_{split}2017.json", f"coco/{split}2017"))
        register_coco_json(f"scrl_demo_det_{split}", _synthetic(split))
        _register(DetectionDataset(f"cityscapes_fine_instance_seg_{split}", "cityscapes",
                                   lambda s=split: {"image_dir": _root(f"cityscapes/leftImg8bit/{s}"),
                                                    "gt_dir": _root(f"cityscapes/gtFine/{s}")},
                                   "cityscapes_instance"))
        _register(DetectionDataset(f"lvis_v1_{split}", "lvis",
                                   lambda s=split: {"json_file": _root(f"lvis/lvis_v1_{s}.json"),
                                                    "image_root": _root("coco")}, "lvis"))
    for pct in SUBSETS:
        for seed in SEEDS:
            register_coco_json(f"coco_2017_train_{pct}pct_seed{seed}",
                               _coco("coco/annotations/instances_train2017.json", "coco/train2017"),
                               keep=lambda n, p=pct, s=seed: subset_indices(n, p, s))
            register_coco_json(f"scrl_demo_det_train_{pct}pct_seed{seed}", _synthetic("train"),
                               keep=lambda n, p=pct, s=seed: subset_indices(n, p, s))
    for year, splits in ((2007, ("trainval", "train", "val", "test")), (2012, ("trainval", "train", "val"))):
        for split in splits:
            _register(DetectionDataset(f"voc_{year}_{split}", "voc", lambda y=year: {"dirname": _root(f"VOC{y}")},
                                       "pascal_voc", year=year, split=split))


_register_builtin()
