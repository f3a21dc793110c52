"""The transfer protocols: one table, one entry per downstream benchmark (config, datasets
through the config, evaluator through the datasets, the metrics to tabulate, how many
trials, which fine-tuning paths can run it, the published numbers to compare with).

``tools/transfer.py`` runs entries of this table; the protocols table in docs/transfer.md is
written from it. Published numbers are only those we could source exactly: the SCRL
release README's COCO rows (``shared/docs/method.md``) and MoCo's detection README (VOC
R50-C4, mean of 5 trials).

Each protocol names its ``reference`` (a Detectron2 model-zoo config, or one of MoCo's
published detection configs at a commit) and lists in ``deltas`` every Detectron2 key on
which its config differs from that reference, with the reason; the shared conventions of
fine-tuning a pretrained backbone are the dicts below. ``tests/test_protocol_references.py``
resolves both in Detectron2's ``get_cfg()`` and fails on any difference not listed, and on
any listed key that does not differ.
"""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from ..detection import FINETUNE_BACKENDS
from ..utils.errors import InputKeyError
from ..utils.fs import checkout_root

__all__ = ["Protocol", "PROTOCOLS", "get_protocol", "CONFIGS_DIR", "GROUPS", "BACKENDS"]

CONFIGS_DIR = os.path.join(checkout_root(), "configs")
GROUPS = {"paper": "The SCRL paper's protocols", "moco": "The field's standard protocols (MoCo's)",
          "beyond": "Beyond the paper", "option": "Other conventions (not the paper's protocol)"}

BACKENDS = BOTH = tuple(FINETUNE_BACKENDS)  # the fine-tuning paths (scrl_d2.backend chooses one)
D2 = ("detectron2",)

# Detectron2 model zoo training speed on 8 V100s (s/iteration, MODEL_ZOO.md), per model
# family: with the config's MAX_ITER it gives a protocol's expected cost.
_SPEED = {"faster_fpn": 0.210, "retinanet": 0.205, "mask_fpn": 0.261, "keypoint_fpn": 0.315,
          "faster_c4": 0.551, "mask_c4": 0.584, "lvis_mask_fpn": 0.292, "cityscapes_mask_fpn": 0.240,
          "voc_faster_c4": 0.537}

# Where references live: Detectron2's model zoo (detectron2/model_zoo/configs/ of the
# installed Detectron2, 0.6), and MoCo's detection/configs/ at the initial release (SyncBN)
# and after "use naiveSyncBN for moco".
_D2 = "detectron2:"
_MOCO_SYNCBN = "facebookresearch/moco@90e244a:detection/configs/"
_MOCO_NAIVE = "facebookresearch/moco@d00ef73:detection/configs/"

# Fine-tuning a torchvision-style self-supervised backbone (MoCo's *_moco.yaml, the release).
_PRETRAINED = {
    "MODEL.WEIGHTS": "the converted pretrained backbone (tools/convert.py; tools/transfer.py sets each checkpoint)",
    "MODEL.PIXEL_MEAN": "torchvision's RGB mean in 0-255: what the pretraining normalised with",
    "MODEL.PIXEL_STD": "torchvision's RGB std in 0-255: what the pretraining normalised with",
    "INPUT.FORMAT": "RGB: the pretraining read RGB images",
    "MODEL.RESNETS.STRIDE_IN_1X1": "False: torchvision-style ResNet v1.5 weights (stride in the 3x3 conv)",
}
# How the suite fine-tunes: every layer, with fewer checkpoints.
_FINETUNE = {
    "MODEL.BACKBONE.FREEZE_AT": "0: nothing frozen, every pretrained stage is fine-tuned",
    "SOLVER.CHECKPOINT_PERIOD": "fewer checkpoint files than Detectron2's 5k (resume points only; training unchanged)",
}
# The release: "synchronized BN for all the configurable layers" (MoCo: BN trained and
# synchronized, also in the newly initialised FPN).
_SYNCBN = {
    "MODEL.RESNETS.NORM": "SyncBN: BN trained and synchronised, not frozen (the release's rule)",
    "MODEL.FPN.NORM": "SyncBN: the release's rule; MoCo's BN in the newly initialised FPN",
    "TEST.PRECISE_BN.ENABLED": "True: BN statistics recomputed before evaluation (as MoCo's and Misc/*syncbn)",
}
_CONVENTIONS = {**_PRETRAINED, **_FINETUNE, **_SYNCBN}
# The SCRL paper's R-CNN protocol (configs/coco/Base-RCNN-FPN-SyncBN.yaml).
_PAPER = {**_CONVENTIONS, "MODEL.ROI_MASK_HEAD.NORM": "SyncBN: the release's rule (the shared base sets it; "
                                                       "inert without MASK_ON)"}
_X05 = {"SOLVER.STEPS": "the paper's x0.5 schedule (appendix A.3): 30k/40k",
        "SOLVER.MAX_ITER": "the paper's x0.5 schedule: 45k"}
_X2 = {"SOLVER.STEPS": "2x schedule (Detectron2's 2x): 120k/160k", "SOLVER.MAX_ITER": "2x schedule: 180k"}
_X1 = {"SOLVER.STEPS": "1x schedule (Detectron2's 1x): 60k/80k", "SOLVER.MAX_ITER": "1x schedule: 90k"}
_MOCO_WEIGHTS = {"MODEL.WEIGHTS": "the converted pretrained backbone (MoCo's file: 'See Instructions')"}
_SUBSET = "the shipped subset, seed 1 (trial k of tools/transfer.py uses seed k)"


def _deltas(*parts: Dict[str, str]) -> Dict[str, str]:
    return {k: v for part in parts for k, v in part.items()}


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
    # the config it equals up to `deltas`: "detectron2:<model-zoo path>" or "<repo>@<commit>:<path>"
    reference: str = ""
    # {Detectron2 key: why this protocol's config differs from the reference there}
    deltas: Dict[str, str] = field(default_factory=dict)

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
                                ("bbox/AP",)), source=_RELEASE,
             reference=_D2 + "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", deltas=_PAPER),
    Protocol("coco_faster_rcnn_R50_FPN_0.5x", "COCO Faster R-CNN R50-FPN x0.5 (45k)",
             "coco/faster_rcnn_R_50_FPN_0.5x_syncbn.yaml", "paper", _FASTER, "faster_fpn",
             reference=_D2 + "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", deltas=_deltas(_PAPER, _X05)),
    Protocol("coco_faster_rcnn_R50_FPN_2x", "COCO Faster R-CNN R50-FPN x2 (180k)",
             "coco/faster_rcnn_R_50_FPN_2x_syncbn.yaml", "paper", _FASTER, "faster_fpn",
             reference=_D2 + "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", deltas=_deltas(_PAPER, _X2)),
    Protocol("coco_mask_rcnn_R50_FPN_1x", "COCO Mask R-CNN R50-FPN 1x", "coco/mask_rcnn_R_50_FPN_1x_syncbn.yaml",
             "paper", _MASK, "mask_fpn",
             published=_release({"Random init": (30.95, 28.70), "ImageNet supervised": (39.00, 35.44),
                                 "BYOL 200ep": (38.86, 35.96), "BYOL 1000ep": (40.19, 37.16),
                                 "SCRL 200ep": (41.02, 37.50), "SCRL 1000ep": (41.40, 37.92)},
                                ("bbox/AP", "segm/AP")), source=_RELEASE,
             reference=_D2 + "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", deltas=_PAPER),
    Protocol("coco_retinanet_R50_FPN_1x", "COCO RetinaNet R50-FPN 1x", "coco/retinanet_R_50_FPN_1x_syncbn.yaml",
             "paper", _FASTER, "retinanet",
             reference=_D2 + "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
             deltas=_deltas(_CONVENTIONS, {
                 "MODEL.RETINANET.NORM": "SyncBN: the release's rule, read as for the mask head (the head's convs "
                                         "have a norm key); Detectron2 0.6 keeps per-level statistics"})),
    Protocol("voc0712_faster_rcnn_R50_FPN", "VOC07+12 Faster R-CNN R50-FPN 18k",
             "voc/faster_rcnn_R_50_FPN_18k_syncbn.yaml", "paper", _VOC, "faster_fpn", trials=5,
             reference=_D2 + "PascalVOC-Detection/faster_rcnn_R_50_FPN.yaml", deltas=_PAPER),
    Protocol("cityscapes_mask_rcnn_R50_FPN", "Cityscapes Mask R-CNN R50-FPN",
             "cityscapes/mask_rcnn_R_50_FPN_syncbn.yaml", "paper", ("segm/AP", "segm/AP50"), "cityscapes_mask_fpn",
             backends=D2, miniature=("INPUT.MIN_SIZE_TRAIN", "(160,)", "SOLVER.IMS_PER_BATCH", "4"),
             reference=_D2 + "Cityscapes/mask_rcnn_R_50_FPN.yaml",
             deltas=_deltas(_PAPER, {
                 "MODEL.WEIGHTS": "the converted pretrained backbone, not Detectron2's COCO Mask R-CNN: the "
                                  "transfer measures the pretraining",
                 "TEST.EVAL_PERIOD": "0: evaluated once, at the end (the suite reads the final metrics); "
                                     "the reference's 8k/16k evaluations cost time, not results"})),
    Protocol("coco_keypoint_rcnn_R50_FPN_1x", "COCO Keypoint R-CNN R50-FPN 1x",
             "coco/keypoint_rcnn_R_50_FPN_1x_syncbn.yaml", "paper",
             ("keypoints/AP", "keypoints/AP50", "keypoints/AP75", "bbox/AP"), "keypoint_fpn",
             miniature=("MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", "(64, 64)"),
             reference=_D2 + "COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml", deltas=_PAPER),
    Protocol("coco_1pct_faster_rcnn_R50_FPN", "COCO 1% labels, Faster R-CNN R50-FPN",
             "coco/faster_rcnn_R_50_FPN_1x_syncbn_1pct.yaml", "paper", _FASTER, "faster_fpn", trials=5,
             per_trial=("DATASETS.TRAIN", "('coco_2017_train_1pct_seed{trial}',)"),
             reference=_D2 + "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
             deltas=_deltas(_PAPER, {"DATASETS.TRAIN": "1% of train2017: " + _SUBSET})),
    Protocol("coco_10pct_faster_rcnn_R50_FPN", "COCO 10% labels, Faster R-CNN R50-FPN",
             "coco/faster_rcnn_R_50_FPN_1x_syncbn_10pct.yaml", "paper", _FASTER, "faster_fpn", trials=5,
             per_trial=("DATASETS.TRAIN", "('coco_2017_train_10pct_seed{trial}',)"),
             reference=_D2 + "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
             deltas=_deltas(_PAPER, {"DATASETS.TRAIN": "10% of train2017: " + _SUBSET})),
    # ---------------------------------------------------------------- MoCo's
    # MoCo's paper reports COCO C4 at 1x and 2x; its repository ships the 2x file only.
    Protocol("voc0712_faster_rcnn_R50_C4_24k", "VOC07+12 Faster R-CNN R50-C4 24k (MoCo)",
             "moco/faster_rcnn_R_50_C4_voc0712_24k.yaml", "moco", _VOC, "voc_faster_c4", backends=D2, trials=5,
             published=_release({"ImageNet supervised": (81.3, 53.5, 58.8), "MoCo v1 200ep": (81.5, 55.9, 62.6),
                                 "MoCo v2 200ep": (82.4, 57.0, 63.6), "MoCo v2 800ep": (82.5, 57.4, 64.0)}, _VOC),
             source=_MOCO, reference=_MOCO_SYNCBN + "pascal_voc_R_50_C4_24k_moco.yaml", deltas=_MOCO_WEIGHTS),
    Protocol("voc0712_faster_rcnn_R50_C4_24k_naivesyncbn", "VOC07+12 Faster R-CNN R50-C4 24k, naiveSyncBN",
             "moco/faster_rcnn_R_50_C4_voc0712_24k_naivesyncbn.yaml", "moco", _VOC, "voc_faster_c4", backends=D2,
             trials=5, reference=_MOCO_NAIVE + "pascal_voc_R_50_C4_24k_moco.yaml", deltas=_MOCO_WEIGHTS),
    Protocol("coco_mask_rcnn_R50_C4_1x", "COCO Mask R-CNN R50-C4 1x (MoCo)", "moco/mask_rcnn_R_50_C4_1x.yaml",
             "moco", _MASK, "mask_c4", backends=D2, reference=_MOCO_SYNCBN + "coco_R_50_C4_2x_moco.yaml",
             deltas=_deltas(_MOCO_WEIGHTS, _X1)),
    Protocol("coco_mask_rcnn_R50_C4_2x", "COCO Mask R-CNN R50-C4 2x (MoCo)", "moco/mask_rcnn_R_50_C4_2x.yaml",
             "moco", _MASK, "mask_c4", backends=D2, reference=_MOCO_SYNCBN + "coco_R_50_C4_2x_moco.yaml",
             deltas=_MOCO_WEIGHTS),
    Protocol("coco_mask_rcnn_R50_C4_1x_naivesyncbn", "COCO Mask R-CNN R50-C4 1x, naiveSyncBN",
             "moco/mask_rcnn_R_50_C4_1x_naivesyncbn.yaml", "moco", _MASK, "mask_c4", backends=D2,
             reference=_MOCO_NAIVE + "coco_R_50_C4_2x_moco.yaml", deltas=_deltas(_MOCO_WEIGHTS, _X1)),
    Protocol("coco_mask_rcnn_R50_C4_2x_naivesyncbn", "COCO Mask R-CNN R50-C4 2x, naiveSyncBN",
             "moco/mask_rcnn_R_50_C4_2x_naivesyncbn.yaml", "moco", _MASK, "mask_c4", backends=D2,
             reference=_MOCO_NAIVE + "coco_R_50_C4_2x_moco.yaml", deltas=_MOCO_WEIGHTS),
    # MoCo published no FPN config: its paper's text (BN trained and synchronised in the
    # backbone and the new FPN, Detectron2's 1x / 2x) on Detectron2's R50-FPN.
    Protocol("coco_mask_rcnn_R50_FPN_1x_moco", "COCO Mask R-CNN R50-FPN 1x (MoCo: SyncBN backbone + FPN)",
             "moco/mask_rcnn_R_50_FPN_1x.yaml", "moco", _MASK, "mask_fpn",
             reference=_D2 + "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", deltas=_CONVENTIONS),
    Protocol("coco_mask_rcnn_R50_FPN_2x_moco", "COCO Mask R-CNN R50-FPN 2x (MoCo: SyncBN backbone + FPN)",
             "moco/mask_rcnn_R_50_FPN_2x.yaml", "moco", _MASK, "mask_fpn",
             reference=_D2 + "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
             deltas=_deltas(_CONVENTIONS, _X2)),
    # ---------------------------------------------------------------- beyond the paper
    Protocol("lvis_v1_mask_rcnn_R50_FPN_1x", "LVIS v1 Mask R-CNN R50-FPN 1x", "lvis/mask_rcnn_R_50_FPN_1x_syncbn.yaml",
             "beyond", ("segm/AP", "segm/APr", "segm/APc", "segm/APf", "bbox/AP"), "lvis_mask_fpn", backends=D2,
             miniature=("DATALOADER.REPEAT_THRESHOLD", "0.5"),
             reference=_D2 + "LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", deltas=_PAPER),
    # ---------------------------------------------------------------- other conventions
    # Detectron2's SyncBN 4conv1fc model (Misc/*_syncbn: SyncBN backbone, FPN, box and mask
    # heads, precise BN) on the 1x schedule.
    Protocol("coco_faster_rcnn_R50_FPN_1x_4conv1fc", "COCO Faster R-CNN R50-FPN 1x, SyncBN 4conv1fc head",
             "coco/faster_rcnn_R_50_FPN_1x_syncbn_4conv1fc.yaml", "option", _FASTER, "faster_fpn",
             reference=_D2 + "Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml",
             deltas=_deltas(_PRETRAINED, _FINETUNE, _X1, {"MODEL.MASK_ON": "False: Faster R-CNN, the same model "
                                                                           "without the mask branch"})),
    Protocol("coco_mask_rcnn_R50_FPN_1x_4conv1fc", "COCO Mask R-CNN R50-FPN 1x, SyncBN 4conv1fc head",
             "coco/mask_rcnn_R_50_FPN_1x_syncbn_4conv1fc.yaml", "option", _MASK, "mask_fpn",
             reference=_D2 + "Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml", deltas=_deltas(_PRETRAINED, _FINETUNE, _X1)),
]
PROTOCOLS: Dict[str, Protocol] = {p.name: p for p in _PROTOCOLS}

def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise InputKeyError(f"unknown protocol {name!r}; available: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
