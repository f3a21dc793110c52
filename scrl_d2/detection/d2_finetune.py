"""Fine-tuning and evaluation with Detectron2's own trainer and evaluators (chosen by each
dataset's ``evaluator_type``, as Detectron2's ``tools/train_net.py``).

Made as sturdy as pretraining: a run stopped by a signal and rerun ends with the weights
of an uninterrupted run (the data order, every process's random generators and the
metric history continue from the checkpoint); loader workers leave the stop signals to the
trainer; a non-finite loss or weight stops every process with exit status 3 before
anything non-finite is written.
"""
import logging
import math
import os
import weakref
from typing import Dict, Optional

import torch
import torch.distributed as dist

from ..checkpoint import SafeLoading, atomic_torch_save
from ..engine.defaults import TrainingDiverged, available_device
from ..engine.preemption import StopSignals, TrainingInterrupted
from ..engine.rng import rng_state, set_rng_state
from ..modeling.layers import cpu_capable_sync_bn
from ..utils import comm
from ..utils.errors import InputFileNotFoundError, InputValueError
from ..utils.events import history_state, restore_history
from ..utils.fs import atomic_write, finite_json
from .formats import format_of_evaluator
from .sampler import SeededItems, TrainingBatches, ignore_stop_signals

__all__ = ["run_detectron2", "build_train_loader"]

logger = logging.getLogger("scrl_d2.detection")



def build_evaluator(cfg, dataset_name: str, output_folder=None):
    """Detectron2's evaluator for the dataset's ``evaluator_type`` (COCO boxes, masks and
    keypoints, Pascal VOC, Cityscapes instances, LVIS): the dataset format's own."""
    from detectron2.data import MetadataCatalog

    out = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    kind = getattr(MetadataCatalog.get(dataset_name), "evaluator_type", "coco")
    try:
        fmt = format_of_evaluator(kind)
    except InputValueError as e:
        raise InputValueError(f"DATASETS.TEST: {dataset_name!r}: {e}") from None
    return fmt.build_evaluator(dataset_name, out)


def build_train_loader(cfg) -> torch.utils.data.DataLoader:
    """Detectron2's training data (its dataset dicts, filtering and ``DatasetMapper``) in
    a resumable order: batch ``k`` of each process depends on (SEED, rank, world size, k)
    only, each image's augmentation on its own seed (:mod:`.sampler`); set
    ``loader.batch_sampler.start_iter`` before the first ``iter()``. Workers leave the
    stop signals to the trainer; the loader draws its worker seeds from its own generator,
    not torch's global one (which a resumed run restores)."""
    from detectron2.data import DatasetFromList, DatasetMapper, MapDataset, get_detection_dataset_dicts
    from detectron2.data.build import trivial_batch_collator
    from detectron2.data.samplers import RepeatFactorTrainingSampler

    world = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world:
        raise InputValueError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is not divisible by the {world} "
                              "processes")
    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None)
    name, repeat = cfg.DATALOADER.SAMPLER_TRAIN, None
    if name == "RepeatFactorTrainingSampler":
        repeat = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dicts, cfg.DATALOADER.REPEAT_THRESHOLD, sqrt=cfg.DATALOADER.get("REPEAT_SQRT", True))
    elif name != "TrainingSampler":
        raise InputValueError(f"DATALOADER.SAMPLER_TRAIN: {name!r}; fine-tuning resumes exactly with "
                              "TrainingSampler or RepeatFactorTrainingSampler only")
    # Detectron2's AspectRatioGroupedDataset: w > h one group, the rest the other
    buckets = [0 if d["width"] > d["height"] else 1 for d in dicts] if cfg.DATALOADER.ASPECT_RATIO_GROUPING else None
    sampler = TrainingBatches(len(dicts), cfg.SOLVER.IMS_PER_BATCH // world, cfg.SEED, buckets=buckets,
                              repeat_factors=repeat)
    logger.info(f"training data: {len(dicts)} images, {sampler.batch_size} per process and step, resumable order "
                f"(SEED {cfg.SEED}{', repeat factors' if repeat is not None else ''})")
    dataset = SeededItems(MapDataset(DatasetFromList(dicts, copy=False), DatasetMapper(cfg, True)))
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=trivial_batch_collator,
                                       num_workers=cfg.DATALOADER.NUM_WORKERS, worker_init_fn=ignore_stop_signals,
                                       generator=torch.Generator().manual_seed(cfg.SEED))


def _any_process(flag: bool) -> bool:
    """Whether ``flag`` holds on any process (one small all-reduce on the CPU group)."""
    if comm.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=comm._cpu_group())
    return bool(t.item())


def last_good_checkpoint(cfg) -> str:
    """What a rerun would resume from: the newest checkpoint of OUTPUT_DIR, else MODEL.WEIGHTS."""
    try:
        with open(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")) as f:
            path = os.path.join(cfg.OUTPUT_DIR, f.read().strip())
        if os.path.isfile(path):
            return path
    except OSError:
        pass
    return f"none in {cfg.OUTPUT_DIR} (a rerun starts again from MODEL.WEIGHTS {cfg.MODEL.WEIGHTS or '(none)'})"


def _diverged(cfg, what: str) -> TrainingDiverged:
    return TrainingDiverged(f"training diverged {what}; nothing was written after it. Last good checkpoint: "
                            f"{last_good_checkpoint(cfg)}. Lower SOLVER.BASE_LR or check the data, then rerun: it "
                            "resumes from there")


def _trainer_class():
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks

    from ..engine.ddp import create_ddp_model

    class Checkpointer(SafeLoading, DetectionCheckpointer):
        """Detectron2's checkpointer whose files are never half-written (a kill during a
        save leaves the previous file and ``last_checkpoint`` intact) and that runs no
        code from the files it reads (:class:`SafeLoading`)."""

        def save(self, name: str, **kwargs) -> None:
            if not self.save_dir or not self.save_to_disk:
                return
            data = {"model": self.model.state_dict()}
            for key, obj in self.checkpointables.items():
                data[key] = obj.state_dict()
            data.update(kwargs)
            path = os.path.join(self.save_dir, f"{name}.pth")
            self.logger.info(f"Saving checkpoint to {path}")
            atomic_torch_save(data, path)
            self.tag_last_checkpoint(f"{name}.pth")

        def tag_last_checkpoint(self, last_filename_basename: str) -> None:
            atomic_write(os.path.join(self.save_dir, "last_checkpoint"), lambda f: f.write(last_filename_basename),
                         mode="w")

    class FiniteLoss:
        """Every process checks its own losses each step and all agree (one all-reduce)
        before Detectron2's metrics gather, where only the main process would raise
        (the others then wait in a collective) and before the optimizer step: a
        non-finite loss stops every process with :class:`TrainingDiverged`."""

        cfg = None

        def _write_metrics(self, loss_dict, data_time, prefix="", iter=None):
            iteration = self.iter if iter is None else iter
            names = list(loss_dict)
            values = torch.stack([loss_dict[k].detach().float().reshape(()) for k in names]).cpu().tolist() \
                if names else []
            bad = {k: v for k, v in zip(names, values) if not math.isfinite(v)}
            if _any_process(bool(bad)):
                found = [(r, k, v) for r, b in enumerate(comm.all_gather(bad)) for k, v in b.items()]
                where = ", ".join(f"{k} {v} (rank {r})" for r, k, v in found[:4]) + (", ..." if len(found) > 4 else "")
                raise _diverged(self.cfg, f"at iteration {iteration}: {where}")
            super()._write_metrics(loss_dict, data_time, prefix, iter)

    class CheckedSimpleTrainer(FiniteLoss, SimpleTrainer):
        pass

    class CheckedAMPTrainer(FiniteLoss, AMPTrainer):
        pass

    class ResumeState(hooks.HookBase):
        """Checkpoint-time state Detectron2 does not keep: every process's random
        generators (RoI sampling draws from torch's) and the metric history the writers
        smooth over; and the weights' finiteness, checked before any checkpoint. Captured
        on every process at the steps a checkpoint follows (a collective), restored at
        ``before_train`` of a resumed run."""

        __qualname__ = "ResumeState"  # its key in the checkpoint's hook states

        def __init__(self, checkpoint_period: int):
            self._period = checkpoint_period
            self._saved: Optional[Dict] = None
            self._loaded: Optional[Dict] = None

        def capture(self) -> None:
            t = self.trainer
            model = t.model.module if hasattr(t.model, "module") else t.model
            bad = [n for n, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if _any_process(bool(bad)):
                raise _diverged(t.cfg, f"by iteration {t.iter}: non-finite values in {len(bad)} weight tensor(s), "
                                       f"e.g. {bad[:3]}; stopped before writing a checkpoint of them")
            self._saved = {"rng": comm.all_gather(rng_state()), "history": history_state(t.storage)}

        def after_step(self):
            it = self.trainer.iter
            if (it + 1) % self._period == 0 or it >= self.trainer.max_iter - 1:  # PeriodicCheckpointer's steps
                self.capture()

        def state_dict(self):
            return self._saved or {}

        def load_state_dict(self, state_dict):
            self._loaded = state_dict

        def before_train(self):
            if not self._loaded:
                return
            rngs, world = self._loaded["rng"], comm.get_world_size()
            if len(rngs) == world:
                set_rng_state(rngs[comm.get_rank()])
            else:
                logger.warning(f"resuming on {world} processes, the checkpoint was written by {len(rngs)}: the random "
                               "streams (RoI sampling) differ from an uninterrupted run's")
            restore_history(self.trainer.storage, self._loaded["history"])
            self._loaded = None

    class StopOnSignal(hooks.HookBase):
        """Preemption for Detectron2's trainer: on SIGTERM / SIGUSR1 / SIGUSR2, the
        step ends, ``model_{iter:07d}.pth`` is written (Detectron2's resume continues
        after it) and the run stops (exit status 75)."""

        def __init__(self, state: ResumeState):
            self._state = state

        def before_train(self):
            self._stop = StopSignals().__enter__()

        def after_train(self):
            self._stop.__exit__()

        def after_step(self):
            signum = self._stop.requested()
            if signum:
                t = self.trainer
                name = f"model_{t.iter:07d}"
                self._state.capture()
                t.checkpointer.save(name, iteration=t.iter)
                comm.synchronize()
                self._stop.stop(signum, f"iteration {t.iter}", os.path.join(t.cfg.OUTPUT_DIR, name + ".pth"))

    class Trainer(DefaultTrainer):
        """Detectron2's DefaultTrainer with a resumable data order, exact resume, a
        finite-loss check on every process, atomic checkpoints, and DDP on CPU
        processes too (Detectron2 passes GPU ``device_ids`` to DDP unconditionally, and
        torch's DDP refuses SyncBN in a CPU module)."""

        def __init__(self, cfg):
            TrainerBase.__init__(self)  # DefaultTrainer.__init__, but for the DDP and inner-trainer choices
            cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
            model = self.build_model(cfg)
            optimizer = self.build_optimizer(cfg, model)
            data_loader = self.build_train_loader(cfg)
            # scrl_d2's DDP: GPU device_ids only on GPUs, and SyncBN also on CPU processes
            model = create_ddp_model(model, next(model.parameters()).device, broadcast_buffers=False)
            self._trainer = (CheckedAMPTrainer if cfg.SOLVER.AMP.ENABLED else CheckedSimpleTrainer)(
                model, data_loader, optimizer)
            self._trainer.cfg = cfg
            self.scheduler = self.build_lr_scheduler(cfg, optimizer)
            self.checkpointer = Checkpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
            self.start_iter = 0
            self.max_iter = cfg.SOLVER.MAX_ITER
            self.cfg = cfg
            self.diverged = self.interrupted = False
            self.register_hooks(self.build_hooks())

        checkpointer_class = Checkpointer  # also for --eval-only

        @classmethod
        def build_model(cls, cfg):
            return cpu_capable_sync_bn(super().build_model(cfg))  # SyncBN also over gloo between CPU processes

        @classmethod
        def build_train_loader(cls, cfg):
            return build_train_loader(cfg)

        @classmethod
        def build_test_loader(cls, cfg, dataset_name):
            loader = super().build_test_loader(cfg, dataset_name)
            loader.worker_init_fn = ignore_stop_signals  # a stop signal during evaluation must not kill a worker
            return loader

        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            return build_evaluator(cfg, dataset_name, output_folder)

        @classmethod
        def test(cls, cfg, model, evaluators=None):
            """Detectron2's evaluation, leaving the random generators as it found them (a
            periodic evaluation must not shift the training's random streams)."""
            state = rng_state()
            try:
                return super().test(cfg, model, evaluators)
            finally:
                set_rng_state(state)

        def build_hooks(self):
            """Detectron2's hooks; metrics every LOG_PERIOD iterations (its fixed 20 is
            minutes between lines on a CPU); the resume state captured right before the
            checkpointer; the stop on signals before the writer."""
            ret = [h for h in super().build_hooks() if h is not None]
            for h in ret:
                if isinstance(h, hooks.PeriodicWriter):
                    h._period = self.cfg.LOG_PERIOD
            state = ResumeState(self.cfg.SOLVER.CHECKPOINT_PERIOD)
            at = next(i for i, h in enumerate(ret) if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook)))
            ret.insert(at, state)
            writers = [i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)]
            ret.insert(writers[0] if writers else len(ret), StopOnSignal(state))
            return ret

        def resume_or_load(self, resume=True):
            """Detectron2's, then the training data (and precise BN's) continue where the
            checkpoint left them."""
            super().resume_or_load(resume=resume)
            if self._trainer._data_loader_iter_obj is not None:
                raise RuntimeError("the training loader was started before resume_or_load")
            self._trainer.data_loader.batch_sampler.start_iter = self.start_iter
            for h in self._hooks:
                if isinstance(h, hooks.PreciseBN) and not h._disabled and h._period > 0:
                    # it has run after every multiple of its period so far, NUM_ITER batches each time
                    h._data_loader.batch_sampler.start_iter = (self.start_iter // h._period) * h._num_iter
            if self.start_iter:
                logger.info(f"resumed at iteration {self.start_iter} from {self.checkpointer.get_checkpoint_file()}")

        def run_step(self):
            try:
                super().run_step()
            except TrainingDiverged:
                self.diverged = True
                raise

        def after_step(self):
            try:
                super().after_step()
            except TrainingDiverged:
                self.diverged = True
                raise
            except TrainingInterrupted:
                self.interrupted = True
                raise

        def after_train(self):
            """After a divergence: no final checkpoint, precise BN or evaluation (Detectron2
            runs them when the last iteration raised); the writers still flush. Then the
            loader workers end (they leave the stop signals to the trainer), whatever
            ended the training, before the process reports and exits."""
            try:
                if not self.diverged:
                    return super().after_train()
                self.storage.iter = self.iter
                for h in self._hooks:
                    if not isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook, hooks.PreciseBN)):
                        h.after_train()
            finally:
                end_workers = getattr(self._trainer._data_loader_iter_obj, "_shutdown_workers", None)
                if end_workers is not None:  # a multi-process DataLoader iterator
                    end_workers()
                if self.diverged or self.interrupted:
                    # every process stopped at the same step (a collective decision); once the
                    # slowest (the main one, closing its writers) is here, each says why at once,
                    # before the launcher ends the processes still running
                    comm.synchronize()

    return Trainer


def run_detectron2(cfg, resume: bool, eval_only: bool) -> Dict:
    """Detectron2's ``tools/train_net.py`` logic; writes ``OUTPUT_DIR/results.json``."""
    from .catalog import DETECTION_DATASETS, check_dataset_files

    for name in tuple(cfg.DATASETS.TRAIN) + tuple(cfg.DATASETS.TEST):
        if name in DETECTION_DATASETS:
            check_dataset_files(name)  # a missing file fails here, naming it
    if cfg.MODEL.WEIGHTS and not cfg.MODEL.WEIGHTS.startswith(("detectron2://", "http")) \
            and not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise InputFileNotFoundError(f"MODEL.WEIGHTS: file not found: {cfg.MODEL.WEIGHTS}")
    device = available_device(cfg.MODEL.DEVICE)
    if device != cfg.MODEL.DEVICE:  # no GPU visible: warned, on the CPU
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = "cpu"
        cfg.freeze()
    Trainer = _trainer_class()
    logger.info("fine-tuning with Detectron2's DefaultTrainer and evaluators")
    if eval_only:
        model = Trainer.build_model(cfg)
        Trainer.checkpointer_class(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=resume)
        trainer.train()
        results = getattr(trainer, "_last_eval_results", None)  # set by its final evaluation hook
    results = {k: dict(v) for k, v in (results or {}).items()}
    if comm.is_main_process() and results:
        atomic_write(os.path.join(cfg.OUTPUT_DIR, "results.json"), lambda f: f.write(finite_json(results)), mode="w")
    return results
