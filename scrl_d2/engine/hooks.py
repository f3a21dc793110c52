"""Hooks of the pretraining loop, all Detectron2 ``HookBase`` hooks (its class when it is
installed): metrics into the ``EventStorage`` and its writers, evaluations and
checkpoints at the end of an epoch, and periodic iteration checkpoints.

Detectron2's semantics hold: in ``after_step`` ``trainer.iter`` is the iteration just run
(0-based); ``trainer.epoch_end`` says whether it was the last of an epoch.
"""
import json
import logging
import math
import os
import re
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..checkpoint import prune_epoch_checkpoints
from ..utils import comm
from ..utils.events import CommonMetricPrinter, EventWriter, HookBase, JSONWriter, TensorboardXWriter
from ..utils.fs import WriteError, atomic_write

__all__ = ["HookBase", "StepMetrics", "EventWriters", "EpochCheckpointer", "IterationCheckpointer",
           "ProbeEvaluator", "KnnMonitor", "ThroughputTimer", "default_writers"]

logger = logging.getLogger("scrl_d2.engine")


def default_writers(output_dir: str, max_iter: Optional[int] = None, tensorboard: bool = True) -> List[EventWriter]:
    """Detectron2's default writers: console line, ``metrics.json``, TensorBoard."""
    os.makedirs(output_dir, exist_ok=True)
    writers: List[EventWriter] = [CommonMetricPrinter(max_iter), JSONWriter(os.path.join(output_dir, "metrics.json"))]
    if tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            logger.warning("tensorboard is not installed: no TensorBoard events are written")
        else:
            writers.append(TensorboardXWriter(output_dir))
    return writers


class StepMetrics(HookBase):
    """Puts every step's scalars into the trainer's ``EventStorage`` (Detectron2's names:
    the losses, ``total_loss``, ``time``, ``data_time``, ``lr``; and the trainer's own
    ``scalars``, e.g. pretraining's ``momentum``, ``epoch``, ``skipped_*``; ``img_per_s``,
    ``num_pairs``, ``probe_acc``), each at its
    own iteration, but only every ``LOG_PERIOD`` steps and at epoch ends: one device read
    (and one all-reduce: values are the mean over processes, as in Detectron2) per
    period instead of one per step. A non-finite loss stops the run there, on every
    process. Runs first, so that the other hooks see the period's values."""

    def after_step(self) -> None:
        t = self.trainer
        if t.is_log_step():
            self.flush()

    def after_train(self) -> None:
        # Normally nothing is left (the last step is a log step). After an exception on
        # one process the others may be gone: no collective, no second divergence error.
        self.flush(reduce=False, check=False)

    def flush(self, reduce: bool = True, check: bool = True) -> None:
        t = self.trainer
        window = t.pop_window()
        if not window:
            return
        keys = sorted({k for w in window for k in w["values"]})
        vals = [w["values"][k].detach().float().reshape(()).to(t.device) for w in window for k in keys
                if k in w["values"]]
        numbers: List[float] = []
        if vals:
            flat = torch.stack(vals)
            if reduce and comm.get_world_size() > 1:
                dist.all_reduce(flat)
                flat /= comm.get_world_size()
            numbers = flat.tolist()
        storage, pos = t.storage, 0
        for w in window:
            it, values = w["iter"], {}
            for k in keys:
                if k in w["values"]:
                    values[k], pos = numbers[pos], pos + 1
            losses = {k: v for k, v in values.items() if k.startswith("loss")}
            for k, v in losses.items():
                if check and not math.isfinite(v):
                    t.diverged_loss(k, v, it)  # the same values on every process: all stop
            if losses:
                storage.put_scalar("total_loss", sum(losses.values()), cur_iter=it)
            storage.put_scalars(cur_iter=it, **values, time=w["time"], data_time=w["data_time"],
                                img_per_s=t.global_batch / w["time"] if w["time"] > 0 else 0.0)
            storage.put_scalars(cur_iter=it, smoothing_hint=False, **w["scalars"])


class EventWriters(HookBase):
    """Detectron2's ``PeriodicWriter`` for our loop: the writers write every ``LOG_PERIOD``
    steps, at the last step and at each epoch end (so an epoch's evaluation is written
    with it), on the main process; a line with what Detectron2's printer leaves out
    (epoch, EMA momentum, images/s, box pairs, probe accuracy, skipped images); a
    progress bar when stdout is a terminal. A failed write (full disk) warns and drops
    that writer: checkpoints are what must not be lost. Runs last."""

    def __init__(self, writers_fn):
        self._writers_fn = writers_fn
        self._writers: List[EventWriter] = []
        self._bar = None

    def before_train(self) -> None:
        if not comm.is_main_process():
            return
        self._writers = self._writers_fn()
        if sys.stdout.isatty():
            from tqdm import tqdm

            t = self.trainer
            self._bar = tqdm(total=t.max_iter, initial=t.iter, dynamic_ncols=True, leave=False,
                             desc=os.path.basename(t.cfg.OUTPUT_DIR.rstrip("/")))

    def after_step(self) -> None:
        if self._bar is not None:
            self._bar.update(1)
        if self.trainer.is_log_step():
            self.write()

    def write(self, summary: bool = True) -> None:
        for w in list(self._writers):
            try:
                w.write()
            except OSError as e:
                logger.warning(f"{type(w).__name__} cannot write: {e}; it stops here, training goes on")
                self._writers.remove(w)
        if summary and comm.is_main_process():
            self._summary()

    def _summary(self) -> None:
        s = self.trainer.storage
        latest = s.latest()
        if "epoch" not in latest:
            return
        parts = [f"epoch {latest['epoch'][0]:.2f}", f"m: {latest['momentum'][0]:.5f}"]
        for k, fmt in (("img_per_s", "{:.1f} img/s"), ("num_pairs", "pairs: {:.0f}"), ("probe_acc", "probe_acc: {:.3f}")):
            if k in latest:
                parts.append(fmt.format(s.history(k).median(s.count_samples(k))))
        if latest["skipped_images"][0]:
            parts.append(f"unreadable images skipped: {latest['skipped_images'][0]:.0f}")
        logger.info("  ".join(parts))

    def after_train(self) -> None:
        self.write(summary=False)  # what other hooks' after_train put, if anything
        for w in self._writers:
            try:
                w.close()
            except OSError as e:
                logger.warning(f"{type(w).__name__} cannot close: {e}")
        if self._bar is not None:
            self._bar.close()


class EpochCheckpointer(HookBase):
    """``checkpoint_{epoch}.pth`` every ``interval`` epochs and at the end of training
    (also when SOLVER.MAX_ITER ends it at an epoch boundary between snapshots), keeping
    the newest ``max_to_keep`` of them (0: all). A run that SOLVER.MAX_ITER stops
    mid-epoch ends with ``checkpoint_{epoch}_iter{n}.pth``."""

    def __init__(self, interval: int, max_to_keep: int = 0):
        self.interval = max(1, interval)
        self.max_to_keep = max_to_keep

    def saves_now(self) -> bool:
        t = self.trainer
        return t.epoch_end and (t.epoch % self.interval == 0 or t.epoch == t.max_epoch or t.iter + 1 >= t.max_iter)

    def after_step(self) -> None:
        t = self.trainer
        if self.saves_now():
            t.save_checkpoint(f"checkpoint_{t.epoch}")
            if comm.is_main_process() and t.cfg.OUTPUT_DIR:
                for f in prune_epoch_checkpoints(t.cfg.OUTPUT_DIR, self.max_to_keep):
                    logger.info(f"removed {f} (SOLVER.SNAPSHOT_MAX_TO_KEEP {self.max_to_keep})")

    def after_train(self) -> None:
        t = self.trainer
        finished = t.iter == t.max_iter  # Detectron2's convention: not after an exception
        if finished and t.iter % t.iters_per_epoch != 0 and t.iter > t.start_iter:
            t.save_checkpoint(f"checkpoint_{t.epoch}_iter{t.iter}")


_ITER_RE = re.compile(r"^model_(\d{7,})\.pth$")


class IterationCheckpointer(HookBase):
    """Detectron2's ``PeriodicCheckpointer`` semantics for ``SOLVER.CHECKPOINT_PERIOD``:
    after iteration ``i`` with ``(i + 1) % period == 0``, ``model_{i:07d}.pth`` holding
    ``iteration: i`` beside the full resumable state; the newest ``max_to_keep`` of them
    are kept (0: all), across restarts too. Not written where the epoch checkpoint of
    the same step already is, nor at the last iteration (the final epoch checkpoint)."""

    def __init__(self, period: int, max_to_keep: int = 0, epoch_checkpointer: Optional[EpochCheckpointer] = None):
        self.period, self.max_to_keep, self._epoch = period, max_to_keep, epoch_checkpointer

    def after_step(self) -> None:
        t = self.trainer
        if (t.iter + 1) % self.period or t.iter + 1 >= t.max_iter:
            return
        if self._epoch is not None and self._epoch.saves_now():
            return
        t.save_checkpoint(f"model_{t.iter:07d}", iteration=t.iter)
        d = t.cfg.OUTPUT_DIR
        if self.max_to_keep > 0 and comm.is_main_process() and d:
            found = sorted(f for f in os.listdir(d) if _ITER_RE.match(f))
            for f in found[:-self.max_to_keep]:
                os.remove(os.path.join(d, f))
                logger.info(f"removed {f} (SOLVER.CHECKPOINT_MAX_TO_KEEP {self.max_to_keep})")


class ProbeEvaluator(HookBase):
    """Top-1 of the online probe on the evaluation split every ``period`` epochs; the
    best state goes to ``checkpoint_best.pth`` and the history to ``probe_eval.json``
    (both kept in the trainer's checkpointed state, so a resume continues them)."""

    def __init__(self, period: int, evaluate):
        self.period, self.evaluate = period, evaluate

    def after_step(self) -> None:
        t = self.trainer
        if not (t.epoch_end and self.period > 0 and (t.epoch % self.period == 0 or t.epoch == t.max_epoch)):
            return
        top1 = self.evaluate()
        t.eval_history.append({"epoch": t.epoch, "probe/top1": top1})
        t.storage.put_scalar("probe/top1", top1, smoothing_hint=False)
        is_best = top1 > t.best_probe
        if is_best:
            t.best_probe, t.best_probe_epoch = top1, t.epoch
            t.save_checkpoint("checkpoint_best", essential=False)
        logger.info(f"epoch {t.epoch}: online probe top-1 {top1:.2f}% (best {t.best_probe:.2f}% at epoch "
                    f"{t.best_probe_epoch}{', saved checkpoint_best.pth' if is_best else ''})")
        if comm.is_main_process():
            history = [h for h in t.eval_history if "probe/top1" in h]
            try:
                atomic_write(os.path.join(t.cfg.OUTPUT_DIR, "probe_eval.json"),
                             lambda f: f.write(json.dumps(history, indent=1)), mode="w")
            except WriteError as e:
                logger.warning(f"{e}; training goes on")


class KnnMonitor(HookBase):
    """Weighted k-NN top-1 of the online encoder every ``period`` epochs."""

    def __init__(self, period: int, random_baseline: bool = False):
        self.period, self.random_baseline = period, random_baseline
        self.baseline: Optional[float] = None  # TEST.RANDOM_BASELINE: computed once per process

    def after_step(self) -> None:
        t = self.trainer
        if not (t.epoch_end and (t.epoch % self.period == 0 or t.epoch == t.max_epoch)):
            return
        from ..evaluation import Encoder, random_encoder, run_knn

        m = t.model
        enc = Encoder(m.backbone, t.cfg.MODEL.PIXEL_MEAN, t.cfg.MODEL.PIXEL_STD, m.in_feature, m.channels_last)
        res = run_knn(t.cfg, enc.to(t.device), t.device, t.dtype)
        m.train()
        t.eval_history.append({"epoch": t.epoch, "knn/top1": res["knn/top1"]})
        t.storage.put_scalar("knn/top1", res["knn/top1"], smoothing_hint=False)
        beside = ""
        if self.random_baseline:
            if self.baseline is None:
                self.baseline = run_knn(t.cfg, random_encoder(t.cfg).to(t.device), t.device, t.dtype)["knn/top1"]
            t.storage.put_scalar("knn/top1_random_init", self.baseline, smoothing_hint=False)
            beside = f" (random init: {self.baseline:.2f}%)"
        logger.info(f"epoch {t.epoch}: k-NN (k={res['knn/k']}, T={res['knn/temperature']}) top-1 "
                    f"{res['knn/top1']:.2f}%{beside}")


class ThroughputTimer(HookBase):
    """Wall-clock time per step for throughput figures (not Detectron2's ``IterationTimer``,
    which times each step's ``run_step`` alone): after ``warmup`` steps, the steps run in
    windows of ``window`` that each end with a device synchronisation, so the loader and
    the device overlap inside a window as in training and each window's time includes
    waiting for data. Records ``step_times`` (seconds per step, one per complete window),
    ``timed_steps``, ``total_s`` (from the end of warm-up to the last window's end) and, on
    a GPU, ``peak_mem_gib`` (peak allocated since the end of warm-up). Steps after the last
    complete window are not timed. Puts nothing into the storage."""

    def __init__(self, warmup: int = 0, window: int = 1):
        self.warmup, self.window = max(0, warmup), max(1, window)
        self.step_times: List[float] = []
        self.timed_steps = 0
        self.total_s = 0.0
        self.peak_mem_gib: Optional[float] = None
        self._steps = 0  # steps seen since before_train
        self._t0 = self._t = 0.0

    def _cuda(self) -> bool:
        return self.trainer.device.type == "cuda"

    def _start(self) -> None:
        if self._cuda():
            torch.cuda.synchronize(self.trainer.device)
            torch.cuda.reset_peak_memory_stats(self.trainer.device)
        self._t0 = self._t = time.perf_counter()

    def before_train(self) -> None:
        self._steps = 0
        if self.warmup == 0:
            self._start()

    def after_step(self) -> None:
        self._steps += 1
        timed = self._steps - self.warmup
        if timed == 0:
            self._start()
        if timed <= 0 or timed % self.window:
            return
        if self._cuda():
            torch.cuda.synchronize(self.trainer.device)
        now = time.perf_counter()
        self.step_times.append((now - self._t) / self.window)
        self.timed_steps += self.window
        self.total_s, self._t = now - self._t0, now
        if self._cuda():
            self.peak_mem_gib = torch.cuda.max_memory_allocated(self.trainer.device) / 2 ** 30


def hook_states(hooks: List[HookBase]) -> Dict:
    """Detectron2's ``TrainerBase.state_dict`` for hooks: by class name, when not empty."""
    out: Dict = {}
    for h in hooks:
        sd = h.state_dict()
        if sd and type(h).__qualname__ not in out:
            out[type(h).__qualname__] = sd
    return out
