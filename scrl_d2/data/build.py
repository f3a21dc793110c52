"""Data loaders built from a config: the seam between datasets and the engine."""
import logging
from typing import List, Tuple

import torch
from torch.utils.data import DataLoader

from ..config.defaults import AUGMENT_DEVICES  # re-exported
from ..utils import comm
from ..utils.errors import InputValueError
from .augment import TwoViewAugmentation
from .boxes import BoxPairGenerator
from .catalog import DatasetCatalog, MetadataCatalog, apply_datasets_root
from .datasets import EvalDataset, PretrainCollate, PretrainDataset, SeededSampler
from .workers import loader_worker_signals

__all__ = ["get_dataset_dicts", "dataset_dicts_of", "build_pretrain_loader", "build_eval_loader", "uses_boxes", "augment_on_device", "augment_device", "AUGMENT_DEVICES"]

logger = logging.getLogger("scrl_d2.data")


def get_dataset_dicts(names) -> Tuple[List[dict], int]:
    """The concatenated records of ``names`` and their number of classes (0: unlabelled)."""
    if isinstance(names, str):
        names = (names,)
    if not names:
        raise InputValueError("no dataset given (DATASETS.TRAIN is empty)")
    dicts, num_classes = [], 0
    for name in names:
        d = DatasetCatalog.get(name)
        logger.info(f"dataset {name!r}: {len(d)} images")
        dicts.extend(d)
        num_classes = max(num_classes, getattr(MetadataCatalog.get(name), "num_classes", 0) or 0)
    return dicts, num_classes


def dataset_dicts_of(cfg, names=None) -> Tuple[List[dict], int]:
    """:func:`get_dataset_dicts` of ``names`` (default ``DATASETS.TRAIN``) with the config's
    datasets root in effect."""
    apply_datasets_root(cfg)
    return get_dataset_dicts(cfg.DATASETS.TRAIN if names is None else names)


def uses_boxes(cfg) -> bool:
    return cfg.MODEL.META_ARCHITECTURE.upper() == "SCRL"


def augment_device(cfg) -> str:
    """INPUT.AUGMENT_DEVICE: ``cpu`` (the loader's workers render the views), ``split``
    (workers decode, crop, resize and flip; the training device applies the colour
    operations), ``device`` (workers only read the files; the device decodes and renders)."""
    where = cfg.INPUT.AUGMENT_DEVICE
    if where not in AUGMENT_DEVICES:
        raise InputValueError(f"INPUT.AUGMENT_DEVICE: {where!r} is not one of {', '.join(map(repr, AUGMENT_DEVICES))}")
    return where


def augment_on_device(cfg) -> bool:
    """Whether the training device takes part in rendering the views (``split`` or ``device``)."""
    return augment_device(cfg) != "cpu"


def _worker_init(_: int) -> None:
    # One intra-op thread per worker: parallelism comes from the workers themselves.
    torch.set_num_threads(1)
    # SLURM and torchrun signal loader workers too: they leave the stop to the trainer,
    # which stops after its step (a worker that died of it would end the run before the
    # checkpoint); SIGTERM from the DataLoader itself still ends them.
    loader_worker_signals()


def _loader_kwargs(cfg) -> dict:
    workers = cfg.DATALOADER.NUM_WORKERS
    kw = dict(num_workers=workers, pin_memory=cfg.DATALOADER.PIN_MEMORY and torch.cuda.is_available(),
              worker_init_fn=_worker_init)
    if workers > 0:
        kw.update(persistent_workers=cfg.DATALOADER.PERSISTENT_WORKERS,
                  prefetch_factor=cfg.DATALOADER.PREFETCH_FACTOR)
    return kw


def build_pretrain_loader(cfg, seed: int) -> Tuple[DataLoader, SeededSampler, int]:
    """The two-view loader of this process, its sampler (``set_epoch`` each epoch) and
    the training set's number of classes."""
    dicts, num_classes = dataset_dicts_of(cfg)
    boxes = BoxPairGenerator.from_config(cfg) if uses_boxes(cfg) else None
    where = augment_device(cfg)
    dataset = PretrainDataset(
        dicts, TwoViewAugmentation.from_config(cfg), boxes,
        require_overlap=cfg.MODEL.SCRL.REQUIRE_OVERLAP, max_crop_tries=cfg.MODEL.SCRL.MAX_CROP_TRIES,
        jpeg_draft=cfg.INPUT.JPEG_DRAFT, decode_on_device=where == "device",
        photometric_on_device=where == "split",
        exif_transpose=cfg.INPUT.EXIF_TRANSPOSE,
    )
    sampler = SeededSampler(len(dataset), cfg.SOLVER.IMS_PER_GPU, seed,
                            rank=comm.get_rank(), world_size=comm.get_world_size())
    loader = DataLoader(dataset, batch_size=cfg.SOLVER.IMS_PER_GPU, sampler=sampler, drop_last=True,
                        collate_fn=PretrainCollate(boxes), **_loader_kwargs(cfg))
    return loader, sampler, num_classes


def build_eval_loader(cfg, name: str) -> DataLoader:
    """Centre-crop loader over ``name``, sharded across processes (no padding)."""
    dicts, _ = dataset_dicts_of(cfg, (name,))
    shard = dicts[comm.get_rank()::comm.get_world_size()]
    size = cfg.INPUT.CROP_SIZE
    dataset = EvalDataset(shard, size, int(round(size * 256 / 224)), cfg.INPUT.INTERPOLATION,
                          cfg.INPUT.EXIF_TRANSPOSE)
    kw = _loader_kwargs(cfg)
    kw["persistent_workers"] = False
    return DataLoader(dataset, batch_size=cfg.TEST.IMS_PER_GPU, shuffle=False, **kw)
