"""Fine-tuning and evaluation without Detectron2: torchvision's Faster / Mask / Keypoint
R-CNN FPN and RetinaNet on COCO-json or Pascal VOC data, iteration-based SGD with linear
warm-up and step decay, multi-process, mixed precision, checkpoints and resume, periodic
and final evaluation (COCO AP with pycocotools, or Detectron2's VOC AP)."""
import contextlib
import json
import logging
import os
import time
from typing import Dict, Iterator, List

import numpy as np
import torch

from ..checkpoint import Checkpointer, atomic_write
from ..engine.ddp import create_ddp_model
from ..engine.preemption import StopSignals
from ..engine.defaults import TrainingDiverged, resolve_device
from ..engine.trainer import amp_dtype
from ..utils import comm
from .coco_data import build_detection_dataset, collate
from .coco_eval import evaluate_predictions, predictions_to_coco, results_json
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


class _Infinite(torch.utils.data.Sampler):
    """An endless, shuffled, per-process stream of indices, reproducible from (seed, start)."""

    def __init__(self, size: int, seed: int, start: int = 0):
        self.size, self.seed, self.start = size, seed, start
        self.rank, self.world = comm.get_rank(), comm.get_world_size()

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.start)
        while True:
            yield from torch.randperm(self.size, generator=g)[self.rank::self.world].tolist()


class _AspectRatioGrouped(torch.utils.data.Sampler):
    """Detectron2's ASPECT_RATIO_GROUPING: indices from ``sampler`` go to one of two
    buckets (landscape w > h, or not); a bucket that fills is the next batch. Batches then
    pad to similar shapes."""

    def __init__(self, sampler, buckets: List[int], batch_size: int):
        self.sampler, self.buckets, self.batch_size = sampler, buckets, batch_size

    def __iter__(self) -> Iterator[List[int]]:
        pending: List[List[int]] = [[], []]
        for i in self.sampler:
            bucket = pending[self.buckets[i]]
            bucket.append(i)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()


class TorchvisionDetectionTrainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.device = resolve_device(cfg)
        self.world = comm.get_world_size()
        model = build_torchvision_detector(cfg)  # SyncBN also synchronises CPU processes (gloo)
        self.model = model.to(self.device)
        s = cfg.SOLVER
        groups = param_groups(model, cfg)
        # kept apart: a loaded optimizer state replaces the groups' settings (older checkpoints lack the key)
        self.lr_factors = [g.pop("lr_factor") for g in groups]
        self.optimizer = torch.optim.SGD(groups, lr=s.BASE_LR, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY,
                                         nesterov=s.NESTEROV)
        self.dtype = amp_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.dtype == torch.float16 and self.device.type == "cuda")
        self.ddp = create_ddp_model(model, self.device)
        self.checkpointer = Checkpointer(model, cfg.OUTPUT_DIR, save_to_disk=comm.is_main_process(),
                                         optimizer=self.optimizer, scaler=self.scaler)
        self.start_iter = 0
        if s.IMS_PER_BATCH % self.world:
            raise ValueError(f"SOLVER.IMS_PER_BATCH {s.IMS_PER_BATCH} is not divisible by {self.world} processes")
        logger.info(f"fine-tuning with the torchvision path (no Detectron2): "
                    f"{type(model).__name__}, ResNet-{cfg.MODEL.RESNETS.DEPTH}-FPN, norm {cfg.MODEL.RESNETS.NORM}, "
                    f"{self.world} process(es) on {self.device}, mixed precision {self.dtype or 'off'}")

    # ------------------------------------------------------------------ weights
    def resume_or_load(self, resume: bool) -> None:
        if resume and self.checkpointer.has_checkpoint():
            path = self.checkpointer.get_checkpoint_file()
            extra = self.checkpointer.load(path)
            self.start_iter = int(extra.get("iteration", -1)) + 1
            logger.info(f"resumed from {path} at iteration {self.start_iter}")
        elif self.cfg.MODEL.WEIGHTS:
            what = load_detector_weights(self.model, self.cfg.MODEL.WEIGHTS)
            logger.info(f"initialised {what} from {self.cfg.MODEL.WEIGHTS}")
        else:
            logger.warning("MODEL.WEIGHTS is empty: training from random initialisation")

    # ------------------------------------------------------------------ data
    def _loader(self, names, train: bool):
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
            raise ValueError(f"{key} is {classes} but dataset(s) {', '.join(names)} have {len(ds.class_names)} "
                             "classes")
        if train:
            # SEED < 0: a random data order, the same on every process (Detectron2's shared_random_seed)
            seed = cfg.SEED if cfg.SEED >= 0 else comm.all_gather(int(np.random.randint(2 ** 31)))[0]
            sampler = _Infinite(len(ds), seed, self.start_iter)
            per_process = cfg.SOLVER.IMS_PER_BATCH // self.world
            if cfg.DATALOADER.ASPECT_RATIO_GROUPING:
                batches = _AspectRatioGrouped(sampler, ds.buckets, per_process)
            else:
                batches = torch.utils.data.BatchSampler(sampler, per_process, drop_last=False)
            return ds, torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers,
                                                   collate_fn=collate, pin_memory=self.device.type == "cuda")
        shard = list(range(comm.get_rank(), len(ds), self.world))
        return ds, torch.utils.data.DataLoader(torch.utils.data.Subset(ds, shard), batch_size=1, shuffle=False,
                                               num_workers=workers, collate_fn=collate)

    def _autocast(self):
        return (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None
                else contextlib.nullcontext())

    # ------------------------------------------------------------------ train
    def train(self) -> Dict:
        cfg = self.cfg
        max_iter = cfg.SOLVER.MAX_ITER
        if max_iter <= 0:
            raise ValueError("SOLVER.MAX_ITER must be > 0 for detection fine-tuning")
        _, loader = self._loader(cfg.DATASETS.TRAIN, train=True)
        data = iter(loader)
        metrics_path = os.path.join(cfg.OUTPUT_DIR, "metrics.json")
        log = open(metrics_path, "a") if comm.is_main_process() else None
        logger.info(f"starting training from iteration {self.start_iter} to {max_iter}")
        window, t0 = [], time.perf_counter()
        with StopSignals() as stop:
            self._train_steps(data, log, stop, max_iter, window, t0)
        self.checkpointer.save("model_final", iteration=max_iter - 1)
        results = self.evaluate(tag="final")
        if log:
            log.close()
        return results

    def _train_steps(self, data, log, stop: StopSignals, max_iter: int, window, t0) -> None:
        cfg = self.cfg
        for it in range(self.start_iter, max_iter):
            lr = lr_at(cfg, it)
            for g, factor in zip(self.optimizer.param_groups, self.lr_factors):
                g["lr"] = lr * factor
            images, targets = next(data)
            images = [im.to(self.device, non_blocking=True).float() / 255.0 for im in images]
            targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            self.ddp.train()
            with self._autocast():
                losses = self.ddp(images, targets)
            total = sum(losses.values())
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            window.append({k: v.detach() for k, v in losses.items()})
            done = it + 1
            if done % cfg.LOG_PERIOD == 0 or done == max_iter or done == self.start_iter + 1:
                vals = {k: float(torch.stack([w[k] for w in window]).mean()) for k in window[0]}
                vals["total_loss"] = sum(vals.values())
                dt = (time.perf_counter() - t0) / len(window)
                if not all(map(lambda v: v == v and abs(v) != float("inf"), vals.values())):
                    raise TrainingDiverged(f"training diverged at iteration {done}: losses {vals}; last good "
                                           f"checkpoint: {self.checkpointer.get_checkpoint_file() or 'none yet'}")
                logger.info(f"iter {done}/{max_iter}  " + "  ".join(f"{k}: {v:.4f}" for k, v in vals.items())
                            + f"  lr: {lr:.5g}  time: {dt:.3f}s")
                if log:
                    log.write(json.dumps({"iteration": done, **vals, "lr": lr, "time": dt}) + "\n")
                    log.flush()
                window, t0 = [], time.perf_counter()
            if done % cfg.SOLVER.CHECKPOINT_PERIOD == 0 and done != max_iter:
                self.checkpointer.save(f"model_{done - 1:07d}", iteration=it)
            if cfg.TEST.EVAL_PERIOD > 0 and done % cfg.TEST.EVAL_PERIOD == 0 and done != max_iter:
                self.evaluate(tag=f"iter{done}")
            signum = stop.requested()
            if signum:  # preemption: a checkpoint after this step, then stop (exit status 75)
                name = f"model_{it:07d}"
                self.checkpointer.save(name, iteration=it)
                comm.synchronize()
                if log:
                    log.close()
                stop.stop(signum, f"iteration {it}", os.path.join(cfg.OUTPUT_DIR, name + ".pth"))

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
        logger.info(f"precise BN: statistics recomputed over {self.cfg.TEST.PRECISE_BN.NUM_ITER} batches")

    def _score(self, ds, preds, out_dir: str) -> Dict:
        """The dataset's own metric: Detectron2's VOC AP for Pascal VOC, COCO AP otherwise."""
        if ds.evaluator == "pascal_voc":
            from .voc import VOC_CLASSES
            from .voc import voc_detection_ap

            voc_id = {i: ds.coco.imgs[i]["voc_id"] for i in ds.coco.imgs}
            return voc_detection_ap([{"voc_id": voc_id[p["image_id"]], "class": p["category_id"] - 1,
                                      "score": p["score"], "box": [p["bbox"][0], p["bbox"][1],
                                                                   p["bbox"][0] + p["bbox"][2],
                                                                   p["bbox"][1] + p["bbox"][3]]} for p in preds],
                                    ds.image_root, ds.split, ds.year, VOC_CLASSES)
        cfg = self.cfg
        iou_types = ["bbox"] + (["segm"] if cfg.MODEL.MASK_ON else []) + (["keypoints"] if cfg.MODEL.KEYPOINT_ON
                                                                          else [])
        return evaluate_predictions(ds.coco, preds, iou_types, ds.class_names, out_dir,
                                    kpt_oks_sigmas=cfg.TEST.KEYPOINT_OKS_SIGMAS)

    @torch.no_grad()
    def evaluate(self, tag: str = "eval") -> Dict:
        cfg = self.cfg
        self._precise_bn()
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
                    res = self._score(ds, preds, out_dir)
                    all_results[name] = res
                    for t, r in res.items():
                        logger.info(f"{name} {t} ({tag}): " + "  ".join(f"{m}: {r[m]:.2f}" for m in
                                                                     ("AP", "AP50", "AP75", "APs", "APm", "APl")
                                                                     if m in r))
            all_results = comm.broadcast_object(all_results)
        finally:
            model.train()
        flat = all_results[cfg.DATASETS.TEST[0]] if len(cfg.DATASETS.TEST) == 1 else all_results
        if comm.is_main_process() and flat:
            atomic_write(os.path.join(cfg.OUTPUT_DIR, "results.json"), lambda f: f.write(results_json(flat)), mode="w")
        return flat
