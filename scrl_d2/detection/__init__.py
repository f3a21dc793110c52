"""Detection fine-tuning: Detectron2's trainer when installed, else torchvision's models."""
from typing import Callable, Dict

from ..backend import backend_name, use_detectron2
from ..config.detection_defaults import DETECTION_ARCHITECTURES
from ..utils.errors import InputFileNotFoundError
from . import builtin  # noqa: F401  (registers the built-in detection datasets)
from .catalog import get_coco_json, register_coco_json
from .synthetic import ensure_synthetic_detection

__all__ = ["DETECTION_ARCHITECTURES", "FINETUNE_BACKENDS", "is_detection_config", "check_finetune_config", "run_finetune",
           "register_coco_json", "get_coco_json", "ensure_synthetic_detection"]


def is_detection_config(cfg) -> bool:
    """A Detectron2 detector config (R-CNNs and RetinaNet), as opposed to pretraining."""
    return cfg.MODEL.META_ARCHITECTURE in DETECTION_ARCHITECTURES


def check_finetune_config(cfg) -> None:
    """Before any process starts: on the torchvision path, a Detectron2 key whose value it
    cannot honour raises ConfigError naming key and value (see ``torchvision_keys.py``)."""
    if is_detection_config(cfg) and not use_detectron2():
        from .torchvision_keys import check_torchvision_keys

        check_torchvision_keys(cfg)


def _run_detectron2(cfg, resume: bool, eval_only: bool) -> Dict:
    from .d2_finetune import run_detectron2

    return run_detectron2(cfg, resume, eval_only)


def _run_torchvision(cfg, resume: bool, eval_only: bool) -> Dict:
    from .torchvision_finetune import TorchvisionDetectionTrainer

    trainer = TorchvisionDetectionTrainer(cfg)
    if eval_only:
        if not cfg.MODEL.WEIGHTS and not trainer.checkpointer.has_checkpoint():
            raise InputFileNotFoundError("--eval-only: set MODEL.WEIGHTS to a fine-tuned detector (or OUTPUT_DIR to "
                                         "a run)")
        trainer.resume_or_load(resume=resume or not cfg.MODEL.WEIGHTS)
        return trainer.evaluate(tag="eval-only")
    trainer.resume_or_load(resume=resume)
    return trainer.train()


# The fine-tuning backends by name (scrl_d2.backend chooses one; each protocol lists those it
# runs on): a runner (cfg, resume, eval_only) -> results of DATASETS.TEST.
FINETUNE_BACKENDS: Dict[str, Callable[..., Dict]] = {"detectron2": _run_detectron2, "torchvision": _run_torchvision}


def run_finetune(cfg, resume: bool = False, eval_only: bool = False) -> Dict:
    """Train (or only evaluate) a detector; returns the COCO results of DATASETS.TEST."""
    from ..data.catalog import apply_datasets_root

    apply_datasets_root(cfg)  # DATASETS.ROOT, else $SCRL_DATASETS / $DETECTRON2_DATASETS
    return FINETUNE_BACKENDS[backend_name()](cfg, resume, eval_only)
