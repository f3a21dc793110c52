"""Detection dataset formats, one module each: what a format needs on both fine-tuning
paths in one place. A format says

- how Detectron2 reads it (:meth:`DatasetFormat.detectron2_loader`, plus any metadata)
  and evaluates it (:meth:`DatasetFormat.build_evaluator`, chosen by ``evaluator_type``);
- how the torchvision path reads it (:meth:`DatasetFormat.coco_api`: a pycocotools
  ``COCO`` object) and scores it (:meth:`DatasetFormat.score`), if it can;
- how its miniature is written (:meth:`DatasetFormat.write_miniature`, for the transfer
  suite's CPU runs of every protocol).

Adding a format is one module here that registers a :class:`DatasetFormat` in
:data:`FORMATS`; its built-in splits are rows of :mod:`scrl_d2.detection.builtin`.
"""
from typing import Callable, Dict, List, Tuple

from ...utils.errors import InputKeyError, InputValueError

__all__ = ["DatasetFormat", "FORMATS", "register_format", "get_format", "format_of_evaluator"]


class DatasetFormat:
    name = ""
    evaluator_type = ""  # Detectron2's evaluator_type of this format's datasets
    torchvision = False  # whether the torchvision fine-tuner reads it
    needs: Tuple[str, ...] = ()  # packages the Detectron2 path needs besides Detectron2
    miniature_needs: Tuple[str, ...] = ()  # formats whose miniature files this one's reads

    def prepare_detectron2(self) -> None:
        """Work-arounds to apply before Detectron2 reads or evaluates this format."""

    def detectron2_loader(self, ds, paths: Dict[str, str], metadata: Dict,
                          resolve: Callable[[], Tuple]) -> Callable[[], List[dict]]:
        """The function Detectron2's ``DatasetCatalog`` registers for ``ds``: it may bind
        ``paths`` (the files now) or call ``resolve()`` when Detectron2 reads the dataset
        (``(dataset, checked paths)`` looked up again by name); it may complete ``metadata``
        (the name's other metadata, set after)."""
        raise NotImplementedError

    def build_evaluator(self, dataset_name: str, output_dir: str):
        """Detectron2's evaluator of a dataset of this format."""
        raise NotImplementedError

    def require_torchvision(self, ds) -> None:
        """Refuse, in one line, a dataset of a format the torchvision path cannot read."""
        if self.torchvision:
            return
        extra = "".join(f" and the `{p}` package" for p in self.needs)
        raise InputValueError(f"detection dataset {ds.name!r} ({self.name} format, {ds.evaluator} evaluation) needs "
                              f"Detectron2: install it (see docs/detectron2.md){extra}")

    def coco_api(self, ds, paths: Dict[str, str]):
        """``(pycocotools COCO, image root)`` for the torchvision fine-tuner."""
        raise NotImplementedError

    def score(self, ds, predictions: List[Dict], out_dir: str, cfg) -> Dict[str, Dict[str, float]]:
        """The format's metric of COCO-style ``predictions`` on the torchvision path:
        ``{task: {metric: value}}`` as Detectron2 reports it."""
        raise NotImplementedError

    def write_miniature(self, tmp: str, scenes: Dict[str, list]) -> None:
        """Write this format's miniature dataset under ``tmp`` from generated ``scenes``
        (``{split: [(image, info, COCO annotations)]}``, four shape classes)."""
        raise NotImplementedError


FORMATS: Dict[str, DatasetFormat] = {}


def register_format(fmt: DatasetFormat) -> DatasetFormat:
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> DatasetFormat:
    if name not in FORMATS:
        raise InputKeyError(f"detection dataset format {name!r} unknown; available: {sorted(FORMATS)}")
    return FORMATS[name]


def format_of_evaluator(evaluator_type: str) -> DatasetFormat:
    for fmt in FORMATS.values():
        if fmt.evaluator_type == evaluator_type:
            return fmt
    raise InputValueError(f"evaluator_type {evaluator_type!r}: detection fine-tuning evaluates "
                          f"{', '.join(f.evaluator_type for f in FORMATS.values())} datasets")


def _register_all() -> None:
    """Import every module of this package: each registers its format (a new format is a
    new module, nothing else)."""
    import importlib
    import pkgutil

    for m in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{m.name}")


_register_all()
