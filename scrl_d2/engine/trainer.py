"""The pretraining loop: one implementation for CPU and GPU, 1..N processes."""
import logging
import os
import time
from typing import Dict, List

import torch

from ..backend import backend_name
from ..checkpoint import (
    Checkpointer,
    LayoutError,
    extract_encoder,
    infer_resnet,
    load_checkpoint_file,
)
from ..data import build_eval_loader, build_pretrain_loader
from ..data.build import augment_on_device
from ..data.gpu_augment import BatchedAugmentation
from ..modeling import build_model
from ..solver import build_lr_scheduler, build_momentum_scheduler, build_optimizer, scaled_lr
from ..utils import comm
from ..utils.errors import InputFileNotFoundError, InputValueError
from .ddp import create_ddp_model
from .defaults import TrainingDiverged, resolve_device
from .hooks import (
    EpochCheckpointer,
    EventWriters,
    HookBase,
    IterationCheckpointer,
    KnnMonitor,
    ProbeEvaluator,
    StepMetrics,
    default_writers,
)
from .step import amp_dtype, build_forward, build_grad_scaler, optimization_step
from .train_loop import TrainerBase

__all__ = ["PretrainTrainer", "amp_dtype", "build_forward", "build_grad_scaler", "optimization_step"]

logger = logging.getLogger("scrl_d2.engine")


def count_pairs(batch: Dict[str, torch.Tensor]) -> int:
    """Pairs that produce a loss this step (SCRL needs >= 2 boxes for its heads' BN),
    read from host tensors only."""
    if "pair_index" in batch:
        n = batch["pair_index"].numel()
    elif "box_valid" in batch:
        n = int(batch["box_valid"].sum())
    else:
        return int(batch["geom1"].shape[0])
    return n if n >= 2 else 0


class PretrainTrainer(TrainerBase):
    """Builds data, model, optimizer and schedules from ``cfg`` and runs the epochs.

    Order of a step, as the release: set LR -> forward (autocast) -> backward ->
    optimizer step -> EMA update with the momentum of this step.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.device = resolve_device(cfg)
        self.world_size = comm.get_world_size()
        self.loader, self.sampler, num_classes = build_pretrain_loader(cfg, cfg.SEED)
        model = build_model(cfg, num_classes=num_classes)
        self._check_norm(model)
        model.to(self.device)
        if cfg.MODEL.CHANNELS_LAST:
            model.to(memory_format=torch.channels_last)
        self.model = model
        logger.info(f"built {type(model).__name__} on {self.device} with the {backend_name()} backend "
                    f"(encoder {type(model.backbone).__module__}.{type(model.backbone).__name__}); "
                    f"{sum(p.numel() for p in model.online_parameters()) / 1e6:.1f}M trainable parameters")
        self.optimizer = build_optimizer(cfg, model, self.world_size)
        self.dtype = amp_dtype(cfg, self.device)
        self.scaler = build_grad_scaler(self.dtype, self.device)
        logger.info(f"mixed precision: {self.dtype or 'off'}; channels_last: {cfg.MODEL.CHANNELS_LAST}")
        ddp = cfg.SOLVER.DDP
        # broadcast_buffers=False (create_ddp_model's default), as the release.
        self.ddp = create_ddp_model(model, self.device, gradient_as_bucket_view=ddp.GRADIENT_AS_BUCKET_VIEW,
                                    static_graph=ddp.STATIC_GRAPH, bucket_cap_mb=ddp.BUCKET_CAP_MB)
        self.forward = build_forward(cfg, self.ddp)
        self.device_augment = (BatchedAugmentation.from_config(cfg, self.device)
                               if augment_on_device(cfg) else None)
        self.iters_per_epoch = len(self.loader)
        self.max_epoch = cfg.SOLVER.EPOCHS
        self.max_iter = self.iters_per_epoch * self.max_epoch
        if cfg.SOLVER.MAX_ITER > 0:
            self.max_iter = min(self.max_iter, cfg.SOLVER.MAX_ITER)
        self.lr_schedule = build_lr_scheduler(cfg, scaled_lr(cfg, self.world_size), self.iters_per_epoch)
        self.momentum_schedule = build_momentum_scheduler(cfg, self.iters_per_epoch)
        self.global_batch = cfg.SOLVER.IMS_PER_GPU * self.world_size
        self.epoch = 0
        self.lr = self.momentum = 0.0
        self.skipped_steps = 0
        self.skipped_images = 0
        self.checkpointer = Checkpointer(model, cfg.OUTPUT_DIR, save_to_disk=comm.is_main_process(),
                                         optimizer=self.optimizer, scaler=self.scaler)
        model.report_to_storage = False  # StepMetrics reads the metrics once per LOG_PERIOD
        self.best_probe, self.best_probe_epoch = -1.0, 0
        self.eval_history: List[Dict] = []  # every evaluation so far; part of the checkpoint
        self.register_hooks(self.build_hooks(num_classes))

    def build_hooks(self, num_classes: int = 0) -> List[HookBase]:
        """The default hooks, in order (override to change them, as Detectron2's
        ``DefaultTrainer.build_hooks``). Evaluations run before the epoch's checkpoint,
        which then records them: a run interrupted anywhere resumes to the same
        evaluation record. The writers come last."""
        cfg = self.cfg
        hooks: List[HookBase] = [StepMetrics()]
        if self.model.probe is not None and cfg.DATASETS.TEST and cfg.TEST.EVAL_PERIOD > 0:
            hooks.append(ProbeEvaluator(cfg.TEST.EVAL_PERIOD, self.evaluate_probe))
        if cfg.KNN.PERIOD > 0 and cfg.DATASETS.TEST and num_classes > 0:
            hooks.append(KnnMonitor(cfg.KNN.PERIOD, cfg.TEST.RANDOM_BASELINE))
        epochs = EpochCheckpointer(cfg.SOLVER.SNAPSHOT_INTERVAL, cfg.SOLVER.SNAPSHOT_MAX_TO_KEEP)
        if cfg.SOLVER.CHECKPOINT_PERIOD > 0:
            hooks.append(IterationCheckpointer(cfg.SOLVER.CHECKPOINT_PERIOD, cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP, epochs))
        hooks.append(epochs)
        hooks.append(EventWriters(lambda: default_writers(cfg.OUTPUT_DIR, self.max_iter)))
        return hooks

    def _check_norm(self, model) -> None:
        """Say which batch-norm statistics this run uses (the release: global batch)."""
        n = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        plain = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(m, torch.nn.SyncBatchNorm)
                    for m in model.modules())
        if n and self.world_size > 1:
            logger.info(f"SyncBN: {n} batch-norm layers take their statistics from the global batch "
                        f"({self.world_size} processes{', over gloo on CPU' if self.device.type == 'cpu' else ''})")
        elif n:
            logger.info("SyncBN with a single process behaves as BN")
        if plain and self.world_size > 1:
            logger.warning(f"{plain} batch-norm layers use per-process statistics (MODEL.RESNETS.NORM / "
                           "MODEL.BYOL.HEAD_NORM 'BN'); the release synchronises them ('SyncBN')")

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_extra(self) -> Dict:
        return {}

    def interrupt_checkpoint_name(self, done: int) -> str:
        return f"checkpoint_{done // self.iters_per_epoch}_iter{done}"

    def where(self) -> str:
        done = self.iter + 1 if self._in_step else self.iter
        return f"iteration {self.iter} (epoch {done / self.iters_per_epoch:.2f})"

    def diverged_loss(self, key: str, value: float, iteration: int) -> None:
        raise TrainingDiverged(
            f"training diverged at iteration {iteration} (epoch {iteration / self.iters_per_epoch:.2f}): {key} is "
            f"{value}; "
            f"nothing was written after it. Last good checkpoint: {self.last_good_checkpoint()}. Lower "
            "SOLVER.BASE_LR or check the data, then resume from it.")

    def state_dict(self) -> Dict:
        return {**super().state_dict(), "epoch": self.epoch, "skipped_steps": self.skipped_steps,
                "best_probe": self.best_probe, "best_probe_epoch": self.best_probe_epoch,
                "eval_history": self.eval_history, "skipped_images": self.skipped_images}

    def load_state_dict(self, state: Dict) -> None:
        super().load_state_dict(state)
        self.epoch = self.iter // self.iters_per_epoch
        self.skipped_steps = state.get("skipped_steps", 0)
        self.skipped_images = state.get("skipped_images", 0)
        self.best_probe, self.best_probe_epoch = state.get("best_probe", -1.0), state.get("best_probe_epoch", 0)
        self.eval_history = list(state.get("eval_history", []))

    def resume_or_load(self, resume: bool = True) -> bool:
        """Continue from the newest checkpoint of LOAD_DIR or OUTPUT_DIR when there is one
        (everything: model, optimizer, scaler, schedules, RNG); else start from
        MODEL.WEIGHTS (encoder only) or from scratch. Returns whether it resumed."""
        cfg = self.cfg
        directory = cfg.LOAD_DIR or cfg.OUTPUT_DIR
        if cfg.LOAD_DIR and not os.path.isdir(cfg.LOAD_DIR):
            raise InputFileNotFoundError(f"LOAD_DIR does not exist: {cfg.LOAD_DIR}")
        probe = Checkpointer(self.model, directory, save_to_disk=False)
        path = probe.get_checkpoint_file() if (resume or cfg.LOAD_DIR) else ""
        if cfg.LOAD_DIR and not path:
            raise InputFileNotFoundError(f"LOAD_DIR {cfg.LOAD_DIR} holds no checkpoint_*.pth")
        if path:
            self.resume(path)  # a Detectron2 PeriodicCheckpointer file too (the data order follows its iteration)
            logger.info(f"resumed at epoch {self.epoch}, iteration {self.iter}")
            return True
        if cfg.MODEL.WEIGHTS:
            try:
                layout, enc, _ = extract_encoder(load_checkpoint_file(cfg.MODEL.WEIGHTS))
            except FileNotFoundError as e:
                raise FileNotFoundError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: {e}") from e
            except ValueError as e:  # LayoutError included
                raise ValueError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: {e}") from e
            own = self.model.backbone.state_dict()
            wrong = [k for k in enc if k in own and enc[k].shape != own[k].shape]
            if wrong:
                try:
                    theirs = f"ResNet-{infer_resnet(enc)['depth']}"
                except (LayoutError, ValueError, KeyError):
                    theirs = "another encoder"
                k = wrong[0]
                raise InputValueError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS} holds {theirs} ({k} {tuple(enc[k].shape)}) but the "
                                 f"model is ResNet-{cfg.MODEL.RESNETS.DEPTH} ({tuple(own[k].shape)}); set "
                                 "MODEL.RESNETS.DEPTH (and RES2_OUT_CHANNELS) to match")
            result = self.model.backbone.load_state_dict(enc, strict=False)
            if result.missing_keys:
                raise InputValueError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS} ({layout} layout): encoder keys missing, "
                                 f"e.g. {result.missing_keys[:5]}")
            logger.info(f"initialised the online encoder from {cfg.MODEL.WEIGHTS}")
        return False

    # ---------------------------------------------------------------- loop
    def epoch_float(self) -> float:
        return (self.iter + 1 if self._in_step else self.iter) / self.iters_per_epoch

    def train(self) -> None:
        """:meth:`TrainerBase.train` over epochs; when it returns normally ``iter ==
        max_iter``."""
        logger.info(f"training {self.max_iter} iterations ({self.iters_per_epoch}/epoch, {self.max_epoch} epochs) "
                    f"from iteration {self.iter}; global batch {self.global_batch}; output {self.cfg.OUTPUT_DIR}")
        super().train()
        logger.info(f"training done at iteration {self.iter}")
        if self.world_size > 1:
            self.check_replicas_agree()

    @torch.no_grad()
    def check_replicas_agree(self) -> bool:
        """Whether every process holds the same online and target weights (DDP's
        promise; a mismatch means a non-deterministic or unsynchronised update). Also
        says whether the batch-norm running statistics agree: they do with SyncBN
        (global statistics) and differ with per-process BN (buffers are not broadcast)."""

        def fingerprint(tensors):
            tensors = [t for t in tensors if t.is_floating_point()]
            return [float(t.double().sum()) for t in tensors] + [float(t.double().pow(2).sum()) for t in tensors]

        prints = comm.all_gather((fingerprint(self.model.parameters()), fingerprint(self.model.buffers())))
        same = all(f[0] == prints[0][0] for f in prints)
        if same:
            logger.info(f"weights identical on all {self.world_size} processes")
        else:
            logger.warning(f"weights differ between the {self.world_size} processes")
        stats = "identical" if all(f[1] == prints[0][1] for f in prints) else "different"
        logger.info(f"batch-norm running statistics {stats} on the {self.world_size} processes")
        return same

    def run_loop(self) -> None:
        """The steps of one epoch from ``self.iter`` on (mid-epoch after a resume): the
        sampler skips the batches already seen."""
        epoch = self.iter // self.iters_per_epoch
        skip = self.iter - epoch * self.iters_per_epoch
        self.sampler.set_epoch(epoch, start_batch=skip)
        self.ddp.train()
        self.iterate(self.loader, stop_at=(epoch + 1) * self.iters_per_epoch)
        self.epoch = self.iter // self.iters_per_epoch

    run_epoch = run_loop

    def end_of_step(self) -> None:
        self.epoch_end = (self.iter + 1) % self.iters_per_epoch == 0
        if self.epoch_end:
            self.epoch = (self.iter + 1) // self.iters_per_epoch
            self.check_finite(f"at the end of epoch {self.epoch}")

    def run_step(self, batch: Dict[str, torch.Tensor], data_time: float) -> None:
        """Step ``self.iter``: LR, (device augmentation), forward, backward, optimizer,
        EMA. Its outputs stay on the device, in the window that StepMetrics reads."""
        t0 = time.perf_counter()
        self.lr = self.lr_schedule(self.iter)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr
        if self.device_augment is not None:
            batch = self.device_augment(batch)  # decode + views (device) or colours (split) on the device
        self.skipped_images += int(batch.pop("skipped").sum())
        pairs = count_pairs(batch)  # host tensors only: no device sync
        if self.world_size > 1:
            pairs = int(comm.all_reduce_cpu_sum(pairs))
        batch.pop("seed", None)
        # Pinned host memory -> device, each view on its own (no host-side concatenation).
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        values: Dict[str, torch.Tensor] = {}
        if pairs == 0:
            # No image of the global batch has a usable view overlap: nothing to learn.
            self.skipped_steps += 1
            logger.warning(f"iteration {self.iter}: no box pair in the batch on any process; step skipped "
                           f"({self.skipped_steps} so far)")
        else:
            self.momentum = self.momentum_schedule(self.iter)
            out = optimization_step(self.forward, self.model, self.optimizer, self.scaler, batch, self.dtype,
                                    self.device, self.momentum, self._after_backward)
            values = {**{k: v.detach() for k, v in out.items()}, **self.model.metrics}
        if self.device.type == "cuda" and (self.iter + 1) % max(1, self.cfg.LOG_PERIOD) == 0:
            torch.cuda.synchronize()  # honest step times at the logging interval only
        self._window.append({"iter": self.iter, "values": values, "time": time.perf_counter() - t0 + data_time,
                             "data_time": data_time,
                             "scalars": {"lr": self.lr, "momentum": self.momentum,
                                         "epoch": (self.iter + 1) / self.iters_per_epoch,
                                         "skipped_steps": self.skipped_steps, "skipped_images": self.skipped_images}})

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate_probe(self) -> float:
        """Top-1 (%) of the online probe on DATASETS.TEST[0], over all processes."""
        model = self.model
        loader = build_eval_loader(self.cfg, self.cfg.DATASETS.TEST[0])
        was_training = model.training
        model.eval()
        correct = total = 0
        for batch in loader:
            images = batch["image"].to(self.device, non_blocking=True)
            if self.cfg.MODEL.CHANNELS_LAST:
                images = images.contiguous(memory_format=torch.channels_last)
            logits = model.classify(images)
            labels = batch["label"].to(self.device)
            correct += int((logits.argmax(1) == labels).sum())
            total += int(labels.numel())
        model.train(was_training)
        correct = comm.all_reduce_cpu_sum(correct)
        total = comm.all_reduce_cpu_sum(total)
        return 100.0 * correct / max(total, 1)
