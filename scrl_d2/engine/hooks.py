"""Hooks of the training loop: metrics and logs, checkpoints, probe evaluation."""
import datetime
import json
import logging
import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch

from ..checkpoint import CheckpointWriteError, atomic_write, prune_epoch_checkpoints
from ..utils import comm

__all__ = ["HookBase", "MetricsWriter", "EpochCheckpointer", "ProbeEvaluator", "KnnMonitor"]

logger = logging.getLogger("scrl_d2.engine")


class HookBase:
    trainer = None

    def before_train(self) -> None: ...

    def after_train(self) -> None: ...

    def before_epoch(self) -> None: ...

    def after_epoch(self) -> None: ...

    def after_step(self) -> None: ...


class MetricsWriter(HookBase):
    """Every ``period`` steps: losses, LR, EMA momentum, images/s, data time and ETA to
    the log, ``metrics.json`` (one JSON object a line) and TensorBoard; a progress bar
    when stdout is a terminal. Only here do device values become Python numbers."""

    def __init__(self, output_dir: str, period: int = 20, tensorboard: bool = True):
        self.period = max(1, period)
        self.output_dir = output_dir
        self._tb = None
        self._json = None
        self._use_tb = tensorboard
        self._bar = None

    def before_train(self) -> None:
        if not comm.is_main_process():
            return
        os.makedirs(self.output_dir, exist_ok=True)
        self._json = open(os.path.join(self.output_dir, "metrics.json"), "a")
        if self._use_tb:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(self.output_dir)
            except ImportError:
                logger.warning("tensorboard is not installed: no TensorBoard events are written")
        if sys.stdout.isatty():
            from tqdm import tqdm

            t = self.trainer
            self._bar = tqdm(total=t.max_iter, initial=t.iter, desc=os.path.basename(self.output_dir.rstrip("/")),
                             dynamic_ncols=True, leave=False)
        self._t0, self._iter0 = time.perf_counter(), self.trainer.iter

    def after_step(self) -> None:
        t = self.trainer
        if self._bar is not None:
            self._bar.update(1)
        if t.iter % self.period == 0 or t.iter == t.max_iter:
            self.write()

    def write(self) -> None:
        t = self.trainer
        window = t.pop_window()
        if not window:
            return
        scalars: Dict[str, float] = {}
        for key in sorted({k for w in window for k in w["values"]}):
            vals = [w["values"][key] for w in window if key in w["values"]]
            scalars[key] = float(torch.stack([v.detach().float() for v in vals]).mean())  # one read per key
            if key.startswith("loss") and not math.isfinite(scalars[key]):
                t.diverged_loss(key, scalars[key])  # every process stops here
        if not comm.is_main_process():
            return
        step_time = sum(w["time"] for w in window) / len(window)
        data_time = sum(w["data_time"] for w in window) / len(window)
        ims = t.global_batch / step_time if step_time > 0 else 0.0
        eta = datetime.timedelta(seconds=int(step_time * (t.max_iter - t.iter)))
        skipped_imgs = t.skipped_images
        record = {"iteration": t.iter, "epoch": t.epoch_float(), **scalars, "lr": t.lr, "momentum": t.momentum,
                  "img_per_s": ims, "time": step_time, "data_time": data_time,
                  "skipped_steps": t.skipped_steps, "skipped_images": skipped_imgs}
        if torch.cuda.is_available():
            record["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        losses = "  ".join(f"{k}: {v:.4f}" for k, v in scalars.items())
        msg = (f"epoch {t.epoch_float():.2f}  iter {t.iter}/{t.max_iter}  {losses}  lr: {t.lr:.5g}  "
               f"m: {t.momentum:.5f}  {ims:.1f} img/s  time: {step_time:.3f}s  data: {data_time:.3f}s  eta: {eta}")
        if skipped_imgs:
            msg += f"  unreadable images skipped: {skipped_imgs}"
        if "max_mem_gib" in record:
            msg += f"  mem: {record['max_mem_gib']:.2f}GiB"
        logger.info(msg)
        self._append(record)
        if self._tb is not None:
            for k, v in record.items():
                if k != "iteration" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"train/{k}", v, t.iter)

    def _append(self, record: Dict) -> None:
        """One line of metrics.json. Not essential: a failed write (full disk) warns once
        and training goes on (checkpoints are what must not be lost)."""
        if self._json is None:
            return
        try:
            self._json.write(json.dumps(record) + "\n")
            self._json.flush()
        except OSError as e:
            logger.warning(f"cannot write {self._json.name}: {e}; metrics.json stops here, training goes on")
            self._json = None

    def log_eval(self, results: Dict[str, float]) -> None:
        if not comm.is_main_process():
            return
        t = self.trainer
        if self._json is not None:
            self._append({"iteration": t.iter, "epoch": t.epoch_float(), **results})
        if self._tb is not None:
            for k, v in results.items():
                self._tb.add_scalar(k, v, t.iter)

    def after_train(self) -> None:
        self.write()
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._json is not None:
            self._json.close()


class EpochCheckpointer(HookBase):
    """``checkpoint_{epoch}.pth`` every ``interval`` epochs and at the end of training
    (also when SOLVER.MAX_ITER ends it at an epoch boundary between snapshots), keeping
    the newest ``max_to_keep`` of them (0: all)."""

    def __init__(self, interval: int, max_to_keep: int = 0):
        self.interval = max(1, interval)
        self.max_to_keep = max_to_keep

    def after_epoch(self) -> None:
        t = self.trainer
        if t.epoch % self.interval == 0 or t.epoch == t.max_epoch or t.iter >= t.max_iter:
            t.save_checkpoint(f"checkpoint_{t.epoch}")
            if comm.is_main_process() and t.cfg.OUTPUT_DIR:
                for f in prune_epoch_checkpoints(t.cfg.OUTPUT_DIR, self.max_to_keep):
                    logger.info(f"removed {f} (SOLVER.SNAPSHOT_MAX_TO_KEEP {self.max_to_keep})")

    def after_train(self) -> None:
        t = self.trainer
        if t.iter % t.iters_per_epoch != 0 and t.iter > t.start_iter:  # stopped mid-epoch by SOLVER.MAX_ITER
            t.save_checkpoint(f"checkpoint_{t.epoch}_iter{t.iter}")


class ProbeEvaluator(HookBase):
    """Top-1 of the online probe on the evaluation split every ``period`` epochs; the
    best state goes to ``checkpoint_best.pth`` and the history to ``probe_eval.json``
    (both kept in the trainer's checkpointed state, so a resume continues them)."""

    def __init__(self, period: int, evaluate, writer: Optional[MetricsWriter] = None):
        self.period, self.evaluate, self.writer = period, evaluate, writer

    def after_epoch(self) -> None:
        t = self.trainer
        if self.period > 0 and (t.epoch % self.period == 0 or t.epoch == t.max_epoch):
            top1 = self.evaluate()
            t.eval_history.append({"epoch": t.epoch, "probe/top1": top1})
            is_best = top1 > t.best_probe
            if is_best:
                t.best_probe, t.best_probe_epoch = top1, t.epoch
                t.save_checkpoint("checkpoint_best", essential=False)
            logger.info(f"epoch {t.epoch}: online probe top-1 {top1:.2f}% (best {t.best_probe:.2f}% at epoch "
                        f"{t.best_probe_epoch}{', saved checkpoint_best.pth' if is_best else ''})")
            if self.writer is not None:
                self.writer.log_eval({"probe/top1": top1})
            if comm.is_main_process():
                history = [h for h in t.eval_history if "probe/top1" in h]
                try:
                    atomic_write(os.path.join(t.cfg.OUTPUT_DIR, "probe_eval.json"),
                                 lambda f: f.write(json.dumps(history, indent=1)), mode="w")
                except CheckpointWriteError as e:
                    logger.warning(f"{e}; training goes on")


class KnnMonitor(HookBase):
    """Weighted k-NN top-1 of the online encoder every ``period`` epochs."""

    def __init__(self, period: int, writer: Optional[MetricsWriter] = None):
        self.period, self.writer = period, writer

    def after_epoch(self) -> None:
        t = self.trainer
        if t.epoch % self.period == 0 or t.epoch == t.max_epoch:
            from ..evaluation import Encoder, run_knn

            m = t.model
            enc = Encoder(m.backbone, t.cfg.MODEL.PIXEL_MEAN, t.cfg.MODEL.PIXEL_STD, m.in_feature, m.channels_last)
            res = run_knn(t.cfg, enc.to(t.device), t.device, t.dtype)
            m.train()
            t.eval_history.append({"epoch": t.epoch, "knn/top1": res["knn/top1"]})
            logger.info(f"epoch {t.epoch}: k-NN (k={res['knn/k']}, T={res['knn/temperature']}) top-1 "
                        f"{res['knn/top1']:.2f}%")
            if self.writer is not None:
                self.writer.log_eval({"knn/top1": res["knn/top1"]})
