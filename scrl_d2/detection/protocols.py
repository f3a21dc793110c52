"""The transfer protocols: one table, one entry per downstream benchmark (config, datasets
through the config, evaluator through the datasets, the metrics to tabulate, how many
trials, which fine-tuning paths can run it, the published numbers to compare with).

``tools/transfer.py`` runs entries of this table; the README's reproduction guide is
written from it. Published numbers are only those we could source exactly: the SCRL
release README's COCO rows (``shared/docs/method.md``) and MoCo's detection README (VOC
R50-C4, mean of 5 trials).
"""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

__all__ = ["Protocol", "PROTOCOLS", "get_protocol", "MINIATURE", "miniature_overrides", "miniature_formats",
           "CONFIGS_DIR", "GROUPS"]

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
GROUPS = {"paper": "The SCRL paper's protocols", "moco": "The field's standard protocols (MoCo's)",
          "beyond": "Beyond the paper", "option": "Other conventions (not the paper's protocol)"}

BOTH = ("detectron2", "torchvision")
D2 = ("detectron2",)

# Detectron2 model zoo training speed on 8 V100s (s/iteration, MODEL_ZOO.md), per model
# family: with the config's MAX_ITER it gives a protocol's expected cost.
_SPEED = {"faster_fpn": 0.210, "retinanet": 0.205, "mask_fpn": 0.261, "keypoint_fpn": 0.315,
          "faster_c4": 0.551, "mask_c4": 0.584, "lvis_mask_fpn": 0.292, "cityscapes_mask_fpn": 0.240,
          "voc_faster_c4": 0.537}

_RELEASE = "SCRL release README (ImageNet pretraining, Detectron2, SyncBN, 1x)"
_MOCO = "MoCo detection README (mean of 5 trials)"


@dataclass(frozen=True)
class Protocol:
    name: str
    title: str
    config: str  # relative to configs/
    group: str
    metrics: Tuple[str, ...]  # "task/metric" keys of results.json, e.g. "bbox/AP"
    family: str  # key of _SPEED
    backends: Tuple[str, ...] = BOTH
    trials: int = 1
    # per-trial overrides; "{trial}" is replaced by the trial number (1-based)
    per_trial: Tuple[str, ...] = ()
    # {row label: {metric: value}} with the source in `source`
    published: Dict[str, Dict[str, float]] = field(default_factory=dict)
    source: str = ""
    # miniature-run overrides this protocol needs on top of MINIATURE
    miniature: Tuple[str, ...] = ()

    @property
    def config_path(self) -> str:
        return os.path.join(CONFIGS_DIR, self.config)

    def trial_overrides(self, trial: int) -> List[str]:
        """Trial ``k`` (1-based): SEED k, and the per-trial overrides (e.g. the subset seed)."""
        return ["SEED", str(trial)] + [v.replace("{trial}", str(trial)) for v in self.per_trial]

    def gpu_hours(self, cfg=None) -> float:
        """Expected hours on 8 V100s: MAX_ITER x Detectron2's model-zoo s/iteration."""
        if cfg is None:
            from ..config import config_from_args

            cfg = config_from_args(self.config_path)
        return cfg.SOLVER.MAX_ITER * _SPEED[self.family] / 3600.0


def _release(rows: Dict[str, Tuple[float, ...]], keys: Tuple[str, ...]) -> Dict[str, Dict[str, float]]:
    return {label: dict(zip(keys, values)) for label, values in rows.items()}


_FASTER = ("bbox/AP", "bbox/AP50", "bbox/AP75")
_MASK = ("bbox/AP", "segm/AP", "segm/AP50", "segm/AP75")
_VOC = ("bbox/AP50", "bbox/AP", "bbox/AP75")

_PROTOCOLS: List[Protocol] = [
    # ---------------------------------------------------------------- the paper's
    Protocol("coco_faster_rcnn_R50_FPN_1x", "COCO Faster R-CNN R50-FPN 1x", "coco/faster_rcnn_R_50_FPN_1x_syncbn.yaml",
             "paper", _FASTER, "faster_fpn",
             published=_release({"Random init": (29.77,), "ImageNet supervised": (38.52,), "BYOL 200ep": (38.35,),
                                 "BYOL 1000ep": (40.10,), "SCRL 200ep": (40.49,), "SCRL 1000ep": (40.92,)},
                                ("bbox/AP",)), source=_RELEASE),
    Protocol("coco_faster_rcnn_R50_FPN_0.5x", "COCO Faster R-CNN R50-FPN x0.5 (45k)",
             "coco/faster_rcnn_R_50_FPN_0.5x_syncbn.yaml", "paper", _FASTER, "faster_fpn"),
    Protocol("coco_faster_rcnn_R50_FPN_2x", "COCO Faster R-CNN R50-FPN x2 (180k)",
             "coco/faster_rcnn_R_50_FPN_2x_syncbn.yaml", "paper", _FASTER, "faster_fpn"),
    Protocol("coco_mask_rcnn_R50_FPN_1x", "COCO Mask R-CNN R50-FPN 1x", "coco/mask_rcnn_R_50_FPN_1x_syncbn.yaml",
             "paper", _MASK, "mask_fpn",
             published=_release({"Random init": (30.95, 28.70), "ImageNet supervised": (39.00, 35.44),
                                 "BYOL 200ep": (38.86, 35.96), "BYOL 1000ep": (40.19, 37.16),
                                 "SCRL 200ep": (41.02, 37.50), "SCRL 1000ep": (41.40, 37.92)},
                                ("bbox/AP", "segm/AP")), source=_RELEASE),
    Protocol("coco_retinanet_R50_FPN_1x", "COCO RetinaNet R50-FPN 1x", "coco/retinanet_R_50_FPN_1x_syncbn.yaml",
             "paper", _FASTER, "retinanet"),
    Protocol("voc0712_faster_rcnn_R50_FPN", "VOC07+12 Faster R-CNN R50-FPN 18k",
             "voc/faster_rcnn_R_50_FPN_18k_syncbn.yaml", "paper", _VOC, "faster_fpn", trials=5),
    Protocol("cityscapes_mask_rcnn_R50_FPN", "Cityscapes Mask R-CNN R50-FPN",
             "cityscapes/mask_rcnn_R_50_FPN_syncbn.yaml", "paper", ("segm/AP", "segm/AP50"), "cityscapes_mask_fpn",
             backends=D2, miniature=("INPUT.MIN_SIZE_TRAIN", "(160,)", "SOLVER.IMS_PER_BATCH", "4")),
    Protocol("coco_keypoint_rcnn_R50_FPN_1x", "COCO Keypoint R-CNN R50-FPN 1x",
             "coco/keypoint_rcnn_R_50_FPN_1x_syncbn.yaml", "paper",
             ("keypoints/AP", "keypoints/AP50", "keypoints/AP75", "bbox/AP"), "keypoint_fpn",
             miniature=("MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", "(64, 64)")),
    Protocol("coco_1pct_faster_rcnn_R50_FPN", "COCO 1% labels, Faster R-CNN R50-FPN",
             "coco/faster_rcnn_R_50_FPN_1x_syncbn_1pct.yaml", "paper", _FASTER, "faster_fpn", trials=5,
             per_trial=("DATASETS.TRAIN", "('coco_2017_train_1pct_seed{trial}',)")),
    Protocol("coco_10pct_faster_rcnn_R50_FPN", "COCO 10% labels, Faster R-CNN R50-FPN",
             "coco/faster_rcnn_R_50_FPN_1x_syncbn_10pct.yaml", "paper", _FASTER, "faster_fpn", trials=5,
             per_trial=("DATASETS.TRAIN", "('coco_2017_train_10pct_seed{trial}',)")),
    # ---------------------------------------------------------------- MoCo's
    Protocol("voc0712_faster_rcnn_R50_C4_24k", "VOC07+12 Faster R-CNN R50-C4 24k (MoCo)",
             "moco/faster_rcnn_R_50_C4_voc0712_24k.yaml", "moco", _VOC, "voc_faster_c4", backends=D2, trials=5,
             published=_release({"ImageNet supervised": (81.3, 53.5, 58.8), "MoCo v1 200ep": (81.5, 55.9, 62.6),
                                 "MoCo v2 200ep": (82.4, 57.0, 63.6), "MoCo v2 800ep": (82.5, 57.4, 64.0)}, _VOC),
             source=_MOCO),
    Protocol("voc0712_faster_rcnn_R50_C4_24k_naivesyncbn", "VOC07+12 Faster R-CNN R50-C4 24k, naiveSyncBN",
             "moco/faster_rcnn_R_50_C4_voc0712_24k_naivesyncbn.yaml", "moco", _VOC, "voc_faster_c4", backends=D2,
             trials=5),
    Protocol("coco_mask_rcnn_R50_C4_1x", "COCO Mask R-CNN R50-C4 1x (MoCo)", "moco/mask_rcnn_R_50_C4_1x.yaml",
             "moco", _MASK, "mask_c4", backends=D2),
    Protocol("coco_mask_rcnn_R50_C4_2x", "COCO Mask R-CNN R50-C4 2x (MoCo)", "moco/mask_rcnn_R_50_C4_2x.yaml",
             "moco", _MASK, "mask_c4", backends=D2),
    Protocol("coco_mask_rcnn_R50_C4_1x_naivesyncbn", "COCO Mask R-CNN R50-C4 1x, naiveSyncBN",
             "moco/mask_rcnn_R_50_C4_1x_naivesyncbn.yaml", "moco", _MASK, "mask_c4", backends=D2),
    Protocol("coco_mask_rcnn_R50_C4_2x_naivesyncbn", "COCO Mask R-CNN R50-C4 2x, naiveSyncBN",
             "moco/mask_rcnn_R_50_C4_2x_naivesyncbn.yaml", "moco", _MASK, "mask_c4", backends=D2),
    Protocol("coco_mask_rcnn_R50_FPN_1x_moco", "COCO Mask R-CNN R50-FPN 1x (MoCo: SyncBN backbone + FPN)",
             "moco/mask_rcnn_R_50_FPN_1x.yaml", "moco", _MASK, "mask_fpn"),
    Protocol("coco_mask_rcnn_R50_FPN_2x_moco", "COCO Mask R-CNN R50-FPN 2x (MoCo: SyncBN backbone + FPN)",
             "moco/mask_rcnn_R_50_FPN_2x.yaml", "moco", _MASK, "mask_fpn"),
    # ---------------------------------------------------------------- beyond the paper
    Protocol("lvis_v1_mask_rcnn_R50_FPN_1x", "LVIS v1 Mask R-CNN R50-FPN 1x", "lvis/mask_rcnn_R_50_FPN_1x_syncbn.yaml",
             "beyond", ("segm/AP", "segm/APr", "segm/APc", "segm/APf", "bbox/AP"), "lvis_mask_fpn", backends=D2,
             miniature=("DATALOADER.REPEAT_THRESHOLD", "0.5")),
    # ---------------------------------------------------------------- other conventions
    Protocol("coco_faster_rcnn_R50_FPN_1x_4conv1fc", "COCO Faster R-CNN R50-FPN 1x, SyncBN 4conv1fc head",
             "coco/faster_rcnn_R_50_FPN_1x_syncbn_4conv1fc.yaml", "option", _FASTER, "faster_fpn"),
    Protocol("coco_mask_rcnn_R50_FPN_1x_4conv1fc", "COCO Mask R-CNN R50-FPN 1x, SyncBN 4conv1fc head",
             "coco/mask_rcnn_R_50_FPN_1x_syncbn_4conv1fc.yaml", "option", _MASK, "mask_fpn"),
]
PROTOCOLS: Dict[str, Protocol] = {p.name: p for p in _PROTOCOLS}

# A miniature run of any protocol: ResNet-18, small images, a few iterations, on the
# generated datasets of scrl_d2.detection.miniature (DATASETS.ROOT is added by the caller).
MINIATURE: Tuple[str, ...] = (
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "600", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "300",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "300", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
    # a few iterations give low scores: keep them, so AP measures ranking, not the threshold
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.001", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.001",
    "INPUT.MIN_SIZE_TRAIN", "(160, 192)", "INPUT.MAX_SIZE_TRAIN", "320",
    "INPUT.MIN_SIZE_TEST", "160", "INPUT.MAX_SIZE_TEST", "320",
    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "40", "SOLVER.STEPS", "(30,)", "SOLVER.WARMUP_ITERS", "10",
    "SOLVER.CHECKPOINT_PERIOD", "20", "TEST.PRECISE_BN.NUM_ITER", "5", "DATALOADER.NUM_WORKERS", "1",
    "LOG_PERIOD", "10",
)


def miniature_overrides(protocol: Protocol, root: str, trial: int = 1) -> List[str]:
    """MINIATURE, then the protocol's own miniature overrides, then DATASETS.ROOT."""
    extra = [v.replace("{trial}", str(trial)) for v in protocol.miniature]
    return list(MINIATURE) + extra + ["DATASETS.ROOT", root]


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise KeyError(f"unknown protocol {name!r}; available: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def miniature_formats(protocol: Protocol) -> Tuple[str, ...]:
    """Which miniature datasets a protocol's miniature run reads."""
    from ..config import config_from_args
    from .datasets import get_dataset

    cfg = config_from_args(protocol.config_path)
    kinds = {get_dataset(n).kind for n in tuple(cfg.DATASETS.TRAIN) + tuple(cfg.DATASETS.TEST)}
    return tuple(sorted(kinds))

