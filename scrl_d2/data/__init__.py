from . import builtin  # noqa: F401  (registers the built-in datasets)
from .augment import TwoViewAugmentation, ViewAugmentation
from .boxes import BoxPairGenerator, box_iou, view_to_original
from .build import build_eval_loader, build_pretrain_loader, dataset_dicts_of, get_dataset_dicts
from .catalog import DatasetCatalog, MetadataCatalog, register_image_folder
from .datasets import PretrainDataset, SeededSampler, read_image
from .demo import ensure_demo_images

__all__ = [
    "TwoViewAugmentation", "ViewAugmentation", "BoxPairGenerator", "box_iou", "view_to_original",
    "build_eval_loader", "build_pretrain_loader", "get_dataset_dicts", "dataset_dicts_of", "DatasetCatalog",
    "MetadataCatalog", "register_image_folder", "PretrainDataset", "SeededSampler", "read_image",
    "ensure_demo_images",
]
