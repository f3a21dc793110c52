"""Fine-tuning and evaluation without Detectron2: torchvision's Faster / Mask / Keypoint
R-CNN FPN and RetinaNet on COCO-json or Pascal VOC data, iteration-based SGD with linear
warm-up and step decay, multi-process, mixed precision, checkpoints and resume, periodic
and final evaluation (COCO AP with pycocotools, or Detectron2's VOC AP)."""
import contextlib
import logging
import os
import time
from typing import Dict, List

import numpy as np
import torch

from ..checkpoint import Checkpointer
from ..engine.ddp import create_ddp_model
from ..engine.defaults import resolve_device
from ..engine.hooks import EventWriters, HookBase, IterationCheckpointer, StepMetrics, default_writers
from ..engine.step import amp_dtype, build_grad_scaler, optimization_step
from ..engine.train_loop import TrainerBase
from ..utils import comm
from ..utils.errors import InputValueError
from ..utils.fs import atomic_write, finite_json
from .coco_eval import predictions_to_coco
from .formats import get_format
from .sampler import SeededItems, TrainingBatches, ignore_stop_signals
from .torchvision_data import build_detection_dataset, collate
from .torchvision_model import build_torchvision_detector, load_detector_weights

__all__ = ["TorchvisionDetectionTrainer", "lr_at"]

logger = logging.getLogger("scrl_d2.detection")


def lr_at(cfg, it: int) -> float:
    """Detectron2's WarmupMultiStepLR: warm-up from WARMUP_FACTOR (linear or constant),
    x GAMMA at each STEP."""
    s = cfg.SOLVER
    factor = s.GAMMA ** sum(1 for step in s.STEPS if it >= step)
    if it < s.WARMUP_ITERS:
        if s.WARMUP_METHOD == "constant":
            factor *= s.WARMUP_FACTOR
        else:
            alpha = it / s.WARMUP_ITERS
            factor *= s.WARMUP_FACTOR * (1 - alpha) + alpha
    return s.BASE_LR * factor


def param_groups(model: torch.nn.Module, cfg) -> List[Dict]:
    """Detectron2's default optimizer groups (``get_default_optimizer_params``): norm
    layers' parameters take WEIGHT_DECAY_NORM, every bias BASE_LR x BIAS_LR_FACTOR; frozen
    ones are left out."""
    s = cfg.SOLVER
    norm_types = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
    groups: Dict[tuple, List] = {}
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            wd = s.WEIGHT_DECAY_NORM if isinstance(m, norm_types) else s.WEIGHT_DECAY
            lr_factor = s.BIAS_LR_FACTOR if name == "bias" else 1.0
            groups.setdefault((wd, lr_factor), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr_factor": f} for (wd, f), ps in groups.items()]


class FinalCheckpointer(HookBase):
    """``model_final.pth`` after the last iteration (Detectron2's PeriodicCheckpointer)."""

    def after_step(self) -> None:
        t = self.trainer
        if t.iter == t.max_iter - 1:
            t.save_checkpoint("model_final", iteration=t.iter)


class PreciseBN(HookBase):
    """Detectron2's PreciseBN hook: the batch-norm statistics recomputed every EVAL_PERIOD
    and after the last iteration, before that step's checkpoint and evaluation."""

    def __init__(self, period: int):
        self.period = period

    def after_step(self) -> None:
        t = self.trainer
        done = t.iter + 1
        if done == t.max_iter or (self.period > 0 and done % self.period == 0):
            t._precise_bn()


class EvalHook(HookBase):
    """Detectron2's EvalHook: an evaluation every EVAL_PERIOD iterations (its metrics go to
    the storage, so to metrics.json) and the final one after training, which alone writes
    ``results.json``: a run with ``results.json`` is complete. A run resumed from its
    final checkpoint evaluates again."""

    def __init__(self, period: int):
        self.period = period

    def _put(self, results: Dict) -> None:
        flat = {}
        for name, res in results.items():
            if isinstance(res, dict) and all(isinstance(v, dict) for v in res.values()):
                flat.update({f"{name}/{task}/{m}": v for task, r in res.items() for m, v in r.items()})
            elif isinstance(res, dict):
                flat.update({f"{name}/{m}": v for m, v in res.items()})
        self.trainer.storage.put_scalars(**{k: float(v) for k, v in flat.items()
                                            if isinstance(v, (int, float)) and v == v}, smoothing_hint=False)

    def after_step(self) -> None:
        t = self.trainer
        done = t.iter + 1
        if done == t.max_iter:  # as Detectron2: the final evaluation's metrics go with the last step's
            self._final()
        elif self.period > 0 and done % self.period == 0:
            self._put(t.evaluate(tag=f"iter{done}"))

    def _final(self) -> None:
        t = self.trainer
        t.results = t.evaluate(tag="final")
        self._put(t.results)
        self._done = True

    def after_train(self) -> None:
        # a run resumed from its final checkpoint (stopped before or during the final evaluation)
        t = self.trainer
        if t.iter == t.max_iter and not getattr(self, "_done", False):
            self._final()


class TorchvisionDetectionTrainer(TrainerBase):
    """Fine-tuning without Detectron2 on the project's one training loop
    (:class:`~scrl_d2.engine.train_loop.TrainerBase`): the data order resumes exactly
    (:mod:`.sampler`), stop signals checkpoint and stop every process (loader workers
    ignore them), a non-finite loss stops every process (exit 3), checkpoints carry
    Detectron2's names (``model_{iter:07d}.pth``, ``model_final.pth``)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.device = resolve_device(cfg)
        self.world = self.world_size = comm.get_world_size()
        s = cfg.SOLVER
        if s.MAX_ITER <= 0:
            raise InputValueError(f"SOLVER.MAX_ITER: {s.MAX_ITER}; detection fine-tuning needs MAX_ITER > 0")
        if s.IMS_PER_BATCH % self.world:
            raise InputValueError(f"SOLVER.IMS_PER_BATCH {s.IMS_PER_BATCH} is not divisible by {self.world} "
                                  "processes")
        model = build_torchvision_detector(cfg)  # SyncBN also synchronises CPU processes (gloo)
        self.model = model.to(self.device)
        groups = param_groups(model, cfg)
        # kept apart: a loaded optimizer state replaces the groups' settings (older checkpoints lack the key)
        self.lr_factors = [g.pop("lr_factor") for g in groups]
        self.optimizer = torch.optim.SGD(groups, lr=s.BASE_LR, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY,
                                         nesterov=s.NESTEROV)
        self.dtype = amp_dtype(cfg, self.device)
        self.scaler = build_grad_scaler(self.dtype, self.device)
        self.ddp = create_ddp_model(model, self.device)
        self.checkpointer = Checkpointer(model, cfg.OUTPUT_DIR, save_to_disk=comm.is_main_process(),
                                         optimizer=self.optimizer, scaler=self.scaler)
        self.max_iter = s.MAX_ITER
        self.global_batch = s.IMS_PER_BATCH
        self.lr = 0.0
        self.results: Dict = {}
        self.register_hooks(self.build_hooks())
        logger.info(f"fine-tuning with the torchvision path (no Detectron2): "
                    f"{type(model).__name__}, ResNet-{cfg.MODEL.RESNETS.DEPTH}-FPN, norm {cfg.MODEL.RESNETS.NORM}, "
                    f"{self.world} process(es) on {self.device}, mixed precision {self.dtype or 'off'}")

    def build_hooks(self) -> List[HookBase]:
        """Detectron2's DefaultTrainer order: metrics, PreciseBN, checkpoints, evaluation,
        writers (last)."""
        cfg = self.cfg
        hooks: List[HookBase] = [StepMetrics()]
        if cfg.TEST.PRECISE_BN.ENABLED:
            hooks.append(PreciseBN(cfg.TEST.EVAL_PERIOD))
        if cfg.SOLVER.CHECKPOINT_PERIOD > 0:
            hooks.append(IterationCheckpointer(cfg.SOLVER.CHECKPOINT_PERIOD))
        hooks += [FinalCheckpointer(), EvalHook(cfg.TEST.EVAL_PERIOD),
                  EventWriters(lambda: default_writers(cfg.OUTPUT_DIR, self.max_iter))]
        return hooks

    # ------------------------------------------------------------------ weights
    def resume_or_load(self, resume: bool) -> bool:
        """Continue from the newest checkpoint of OUTPUT_DIR (weights, optimizer, scaler,
        iteration, random generators) when ``resume`` and there is one; else start from
        MODEL.WEIGHTS. Returns whether it resumed."""
        if resume and self.checkpointer.has_checkpoint():
            self.resume(self.checkpointer.get_checkpoint_file())
            logger.info(f"resumed at iteration {self.iter}")  # (TrainerBase.resume logged the file)
            return True
        if self.cfg.MODEL.WEIGHTS:
            what = load_detector_weights(self.model, self.cfg.MODEL.WEIGHTS)
            logger.info(f"initialised {what} from {self.cfg.MODEL.WEIGHTS}")
        else:
            logger.warning("MODEL.WEIGHTS is empty: training from random initialisation")
        return False

    # ------------------------------------------------------------------ data
    def _loader(self, names, train: bool, start_iter: int = 0):
        cfg = self.cfg
        ds = build_detection_dataset(names, train=train, with_masks=cfg.MODEL.MASK_ON,
                                     with_keypoints=cfg.MODEL.KEYPOINT_ON, flip=cfg.INPUT.RANDOM_FLIP,
                                     filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
                                     mask_format=cfg.INPUT.MASK_FORMAT,
                                     min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE)
        workers = cfg.DATALOADER.NUM_WORKERS
        key, classes = (("MODEL.RETINANET.NUM_CLASSES", cfg.MODEL.RETINANET.NUM_CLASSES)
                        if cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
                        else ("MODEL.ROI_HEADS.NUM_CLASSES", cfg.MODEL.ROI_HEADS.NUM_CLASSES))
        if len(ds.class_names) != classes:
            raise InputValueError(f"{key} is {classes} but dataset(s) {', '.join(names)} have {len(ds.class_names)} "
                             "classes")
        if train:
            # SEED < 0: a random data order, the same on every process (Detectron2's shared_random_seed;
            # default_setup draws it once per run and keeps it in config.yaml)
            seed = cfg.SEED if cfg.SEED >= 0 else comm.all_gather(int(np.random.randint(2 ** 31)))[0]
            batches = TrainingBatches(len(ds), cfg.SOLVER.IMS_PER_BATCH // self.world, seed, start_iter,
                                      ds.buckets if cfg.DATALOADER.ASPECT_RATIO_GROUPING else None)
            # the loader's own generator: creating its iterator must not draw from torch's global one,
            # whose state a resumed run restores (RoI sampling and multi-scale sizes draw from it)
            return ds, torch.utils.data.DataLoader(SeededItems(ds), batch_sampler=batches, num_workers=workers,
                                                   collate_fn=collate, pin_memory=self.device.type == "cuda",
                                                   worker_init_fn=ignore_stop_signals,
                                                   generator=torch.Generator().manual_seed(seed))
        shard = list(range(comm.get_rank(), len(ds), self.world))
        return ds, torch.utils.data.DataLoader(torch.utils.data.Subset(ds, shard), batch_size=1, shuffle=False,
                                               num_workers=workers, collate_fn=collate,
                                               worker_init_fn=ignore_stop_signals,
                                               generator=torch.Generator().manual_seed(0))

    def _autocast(self):
        return (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None
                else contextlib.nullcontext())

    # ------------------------------------------------------------------ train
    def train(self) -> Dict:
        """Train from the current iteration to SOLVER.MAX_ITER, then evaluate; returns the
        final results (also in ``results.json``)."""
        logger.info(f"starting training from iteration {self.iter} to {self.max_iter}")
        super().train()
        return self.results

    def run_loop(self) -> None:
        _, loader = self._loader(self.cfg.DATASETS.TRAIN, train=True, start_iter=self.iter)
        self.ddp.train()
        self.iterate(loader)

    def run_step(self, batch, data_time: float) -> None:
        t0 = time.perf_counter()
        self.lr = lr_at(self.cfg, self.iter)
        for g, factor in zip(self.optimizer.param_groups, self.lr_factors):
            g["lr"] = self.lr * factor
        images, targets = batch
        images = [im.to(self.device, non_blocking=True).float() / 255.0 for im in images]
        targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        losses = optimization_step(lambda b: self.ddp(*b), self.model, self.optimizer, self.scaler,
                                   (images, targets), self.dtype, self.device, after_backward=self._after_backward)
        self._window.append({"iter": self.iter, "values": {k: v.detach() for k, v in losses.items()},
                             "time": time.perf_counter() - t0 + data_time, "data_time": data_time,
                             "scalars": {"lr": self.lr}})

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _precise_bn(self) -> None:
        from fvcore.nn.precise_bn import get_bn_modules, update_bn_stats

        if not self.cfg.TEST.PRECISE_BN.ENABLED or not get_bn_modules(self.model):
            return
        _, loader = self._loader(self.cfg.DATASETS.TRAIN, train=True)
        model = self.model

        class _Wrap(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = model

            def forward(self, batch):
                images, targets = batch
                dev = next(model.parameters()).device
                return self.m([im.to(dev).float() / 255.0 for im in images],
                              [{k: v.to(dev) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets])

        with torch.enable_grad():
            update_bn_stats(_Wrap().train(), iter(loader), self.cfg.TEST.PRECISE_BN.NUM_ITER)
        if self.world > 1:
            # fvcore weights each process's (already synchronised) statistics by its own batch size
            # (RoIs per process differ): the main process's, so every process evaluates one model
            for m in get_bn_modules(self.model):
                for b in (m.running_mean, m.running_var):
                    torch.distributed.broadcast(b, 0, group=comm._cpu_group() if b.device.type == "cpu" else None)
        model.train()
        logger.info(f"precise BN: statistics recomputed over {self.cfg.TEST.PRECISE_BN.NUM_ITER} batches")

    @torch.no_grad()
    def evaluate(self, tag: str = "eval") -> Dict:
        """COCO / VOC metrics of DATASETS.TEST, on every process. ``results.json`` is
        written by the final evaluation (``tag`` "final") and by --eval-only only."""
        cfg = self.cfg
        model = self.model
        model.eval()
        all_results: Dict = {}
        try:
            for name in cfg.DATASETS.TEST:
                ds, loader = self._loader((name,), train=False)
                preds = []
                for images, targets in loader:
                    images = [im.to(self.device).float() / 255.0 for im in images]
                    with self._autocast():
                        outputs = model(images)
                    preds += predictions_to_coco(outputs, [t["image_id"] for t in targets],
                                                 {v: k for k, v in ds.cat_to_label.items()})
                preds = [p for part in comm.all_gather(preds) for p in part]
                if comm.is_main_process():
                    out_dir = os.path.join(cfg.OUTPUT_DIR, "inference", name)
                    os.makedirs(out_dir, exist_ok=True)
                    res = get_format(ds.kind).score(ds, preds, out_dir, cfg)  # the format's own metric
                    all_results[name] = res
                    for t, r in res.items():
                        logger.info(f"{name} {t} ({tag}): " + "  ".join(f"{m}: {r[m]:.2f}" for m in
                                                                     ("AP", "AP50", "AP75", "APs", "APm", "APl")
                                                                     if m in r))
            all_results = comm.broadcast_object(all_results)
        finally:
            model.train()
        flat = all_results[cfg.DATASETS.TEST[0]] if len(cfg.DATASETS.TEST) == 1 else all_results
        if comm.is_main_process() and flat and tag in ("final", "eval-only"):
            atomic_write(os.path.join(cfg.OUTPUT_DIR, "results.json"), lambda f: f.write(finite_json(flat)), mode="w")
        return flat
