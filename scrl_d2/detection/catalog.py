"""Detection datasets by name, for both fine-tuning paths, in Detectron2's layout under the
datasets root (``DATASETS.ROOT``, else ``$SCRL_DATASETS`` / ``$DETECTRON2_DATASETS``) and
with Detectron2's builtin names and meaning. The built-in names are the rows of
:mod:`.builtin`; how each on-disk format is read and evaluated is in :mod:`.formats`.

With Detectron2 installed, its catalogs serve every name, pointed at our root (Detectron2
registers its builtins once, from ``$DETECTRON2_DATASETS`` at import).
"""
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from ..backend import detectron2_available
from ..utils.errors import InputFileNotFoundError, InputKeyError
from .formats import get_format

__all__ = ["DETECTION_DATASETS", "DetectionDataset", "register_coco_json", "register_dataset", "get_coco_json",
           "get_dataset", "check_dataset_files"]


@dataclass
class DetectionDataset:
    """Where a named dataset lives and how it is read and evaluated.

    ``kind``: the on-disk format (a name of :data:`.formats.FORMATS`: ``coco`` / ``voc`` /
    ``cityscapes`` / ``lvis``); ``paths()``: the files, resolved under the datasets root
    when called; ``evaluator``: Detectron2's ``evaluator_type`` (``coco``, ``pascal_voc``,
    ``cityscapes_instance``, ``lvis``); ``keep``: sorted-image-id indices to keep (subsets).
    """

    name: str
    kind: str
    paths: Callable[[], Dict[str, str]]
    evaluator: str
    year: int = 0
    split: str = ""
    keep: Optional[Callable[[int], list]] = field(default=None, repr=False)

    @property
    def format(self):
        return get_format(self.kind)


DETECTION_DATASETS: Dict[str, DetectionDataset] = {}


def register_dataset(ds: DetectionDataset) -> None:
    """Register ``ds`` in our catalog and, with Detectron2 installed, in its catalogs (unless
    it is one of Detectron2's builtins, which are pointed at our root when first checked)."""
    DETECTION_DATASETS[ds.name] = ds
    if detectron2_available():
        from detectron2.data import DatasetCatalog, MetadataCatalog

        if ds.name not in DatasetCatalog.list():
            if ds.kind == "coco":  # paths resolved when first read
                DatasetCatalog.register(ds.name, ds.format.detectron2_loader(ds, {}, {}, _resolver(ds.name)))
                meta = MetadataCatalog.get(ds.name)
                if not hasattr(meta, "evaluator_type"):
                    meta.set(evaluator_type=ds.evaluator)
            else:
                _point_detectron2_at(ds, ds.paths())


def register_coco_json(name: str, json_file, image_root=None, evaluator: str = "coco", keep=None) -> None:
    """Register a COCO-format dataset. ``json_file`` may be a path (with ``image_root``)
    or a function returning ``(json path, image root)``, resolved when first used."""
    fn = json_file if callable(json_file) else (lambda: (json_file, image_root))

    def paths(fn=fn):
        j, r = fn()
        return {"json_file": j, "image_root": r}
    register_dataset(DetectionDataset(name, "coco", paths, evaluator, keep=keep))


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
        ds.format.prepare_detectron2()
        _point_detectron2_at(ds, paths)
    return paths


def get_coco_json(name: str) -> Tuple[str, str]:
    """``(json path, image root)`` of a COCO-json dataset (any kind: the paths checked)."""
    paths = check_dataset_files(name)
    return paths.get("json_file", ""), paths.get("image_root", paths.get("dirname", ""))


def _resolver(name: str) -> Callable[[], Tuple[DetectionDataset, Dict[str, str]]]:
    return lambda: (get_dataset(name), check_dataset_files(name))


def _point_detectron2_at(ds: DetectionDataset, paths: Dict[str, str]) -> None:
    """Make Detectron2's catalogs read ``ds`` from ``paths``. Detectron2 refuses to change
    a metadata path: re-register the name (keeping its other metadata) when ours differ."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    meta = MetadataCatalog.get(ds.name)
    current = {k: getattr(meta, k, v) for k, v in paths.items()}
    if current == paths and ds.name in DatasetCatalog.list():
        meta.set(**paths)
        return
    drop = ("name",) + tuple(paths)
    kept = {k: v for k, v in meta.as_dict().items() if not k.startswith(drop)}
    if ds.name in DatasetCatalog.list():
        DatasetCatalog.remove(ds.name)
    MetadataCatalog.remove(ds.name)
    DatasetCatalog.register(ds.name, ds.format.detectron2_loader(ds, paths, kept, _resolver(ds.name)))
    MetadataCatalog.get(ds.name).set(**paths, evaluator_type=ds.evaluator,
                                     **{k: v for k, v in kept.items() if k != "evaluator_type"})
