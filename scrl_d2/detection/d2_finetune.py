"""Fine-tuning and evaluation with Detectron2's own trainer and evaluators (chosen by each
dataset's ``evaluator_type``, as Detectron2's ``tools/train_net.py``)."""
import logging
import os
from typing import Dict

import torch

from ..checkpoint import atomic_write
from ..engine.preemption import StopSignals
from ..utils import comm
from .coco_eval import results_json

__all__ = ["run_detectron2"]

logger = logging.getLogger("scrl_d2.detection")


def build_evaluator(cfg, dataset_name: str, output_folder=None):
    """Detectron2's evaluator for the dataset's ``evaluator_type``: COCO (boxes, masks,
    keypoints), Pascal VOC, Cityscapes instances, LVIS."""
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import (CityscapesInstanceEvaluator, COCOEvaluator, LVISEvaluator,
                                       PascalVOCDetectionEvaluator)

    out = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    kind = getattr(MetadataCatalog.get(dataset_name), "evaluator_type", "coco")
    if kind == "pascal_voc":
        return PascalVOCDetectionEvaluator(dataset_name)
    if kind == "cityscapes_instance":
        return CityscapesInstanceEvaluator(dataset_name)
    if kind == "lvis":
        return LVISEvaluator(dataset_name, output_dir=out)
    if kind != "coco":
        raise ValueError(f"DATASETS.TEST: {dataset_name!r} has evaluator_type {kind!r}; detection fine-tuning "
                         "evaluates coco, pascal_voc, cityscapes_instance and lvis datasets")
    return COCOEvaluator(dataset_name, output_dir=out)


def _trainer_class():
    from detectron2.engine import DefaultTrainer, hooks

    class Trainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            return build_evaluator(cfg, dataset_name, output_folder)

        def build_hooks(self):
            """Detectron2's hooks; metrics every LOG_PERIOD iterations (its fixed 20 is
            minutes between lines on a CPU)."""
            ret = super().build_hooks()
            for h in ret:
                if isinstance(h, hooks.PeriodicWriter):
                    h._period = self.cfg.LOG_PERIOD
            writers = [i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)]
            ret.insert(writers[0] if writers else len(ret), StopOnSignal())
            return ret

    class StopOnSignal(hooks.HookBase):
        """Preemption for Detectron2's trainer: on SIGTERM / SIGUSR1 / SIGUSR2, the
        step ends, ``model_{iter:07d}.pth`` is written (Detectron2's resume continues
        after it) and the run stops (exit status 75)."""

        def before_train(self):
            self._stop = StopSignals().__enter__()

        def after_train(self):
            self._stop.__exit__()

        def after_step(self):
            signum = self._stop.requested()
            if signum:
                t = self.trainer
                name = f"model_{t.iter:07d}"
                t.checkpointer.save(name, iteration=t.iter)
                comm.synchronize()
                self._stop.stop(signum, f"iteration {t.iter}", os.path.join(t.cfg.OUTPUT_DIR, name + ".pth"))

    return Trainer


def run_detectron2(cfg, resume: bool, eval_only: bool) -> Dict:
    """Detectron2's ``tools/train_net.py`` logic; writes ``OUTPUT_DIR/results.json``."""
    from detectron2.checkpoint import DetectionCheckpointer

    from .datasets import DETECTION_DATASETS, check_dataset_files

    for name in tuple(cfg.DATASETS.TRAIN) + tuple(cfg.DATASETS.TEST):
        if name in DETECTION_DATASETS:
            check_dataset_files(name)  # a missing file fails here, naming it
    if cfg.MODEL.WEIGHTS and not cfg.MODEL.WEIGHTS.startswith(("detectron2://", "http")) \
            and not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise FileNotFoundError(f"MODEL.WEIGHTS: file not found: {cfg.MODEL.WEIGHTS}")
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but no GPU is visible: running on the CPU")
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = "cpu"
        cfg.freeze()
    Trainer = _trainer_class()
    logger.info("fine-tuning with Detectron2's DefaultTrainer and evaluators")
    if eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=resume)
        trainer.train()
        results = getattr(trainer, "_last_eval_results", None)  # set by its final evaluation hook
    results = {k: dict(v) for k, v in (results or {}).items()}
    if comm.is_main_process() and results:
        atomic_write(os.path.join(cfg.OUTPUT_DIR, "results.json"), lambda f: f.write(results_json(results)), mode="w")
    return results
