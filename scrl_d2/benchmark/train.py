"""The real loop's throughput (``train``): :class:`~scrl_d2.engine.PretrainTrainer`'s
loader, step (transfer, forward, backward, LARS, EMA) and ``train()`` on a folder of
images, timed by the :class:`~scrl_d2.engine.hooks.ThroughputTimer` hook."""
import shutil
import statistics
import tempfile
from typing import List

import torch

from ..engine.hooks import ThroughputTimer
from ..engine.trainer import PretrainTrainer
from .common import settings
from .steps import bench_model

__all__ = ["BenchmarkTrainer", "benchmark_config", "time_training", "bench_train"]


class BenchmarkTrainer(PretrainTrainer):
    """:class:`PretrainTrainer` as built for training (loader, model, optimizer, step,
    ``train()``'s loop over epochs) with none of its default hooks: no metrics, evaluations,
    checkpoints or writers inside the measured steps; the caller registers its timer. The
    steps' outputs (device tensors, which StepMetrics would read) are dropped unread:
    reading them would synchronise the device."""

    def build_hooks(self, num_classes: int = 0):
        return []

    def run_step(self, batch, data_time: float) -> None:
        super().run_step(batch, data_time)
        self.pop_window()

    def check_finite(self, when: str) -> None:
        """Not timed: training checks the weights once per epoch (every ~5000 steps on
        ImageNet), the benchmark's short epochs would put it among the measured steps."""


def benchmark_config(cfg):
    """``cfg`` for a timed run: a temporary OUTPUT_DIR, no evaluation, k-NN or probe, no
    logging syncs inside the measured steps (LOG_PERIOD), a fixed SEED."""
    c = cfg.clone()
    c.defrost()
    c.OUTPUT_DIR = tempfile.mkdtemp(prefix="scrl_bench_")
    c.DATASETS.TEST = ()
    c.TEST.EVAL_PERIOD = 0
    c.KNN.PERIOD = 0
    c.LOG_PERIOD = 10 ** 9  # no logging syncs inside the measured steps
    c.MODEL.PROBE.ENABLED = False
    c.SEED = max(c.SEED, 0)
    return c


def time_training(trainer: PretrainTrainer, iters: int, warmup: int, window: int = 5) -> ThroughputTimer:
    """Run ``trainer.train()`` for ``warmup`` steps and then ``iters`` steps rounded down to
    whole windows of ``window`` (at least one window), from its current iteration, with a
    :class:`ThroughputTimer` registered; returns the timer. The run is bounded by setting
    ``trainer.max_iter`` (as Detectron2's ``train(start_iter, max_iter)``); the schedules
    keep the config's length."""
    timer = ThroughputTimer(warmup, window)
    trainer.register_hooks([timer])
    trainer.max_iter = trainer.iter + warmup + max(1, iters // window) * window
    trainer.train()
    return timer


def bench_train(cfg, iters: int, warmup: int, window: int = 5, with_model: bool = False) -> List[dict]:
    """The trainer's real loop on real files. Synchronises only every ``window`` steps
    (so the loader and the GPU overlap as in training) and reports per-step medians;
    ``with_model``: also :func:`bench_model` at the same settings (how much the data
    path costs)."""
    c = benchmark_config(cfg)
    try:
        trainer = BenchmarkTrainer(c)
        device = trainer.device
        timer = time_training(trainer, iters, warmup, window)
    finally:
        shutil.rmtree(c.OUTPUT_DIR, ignore_errors=True)
    row = {"mode": "train", "settings": settings(c, data=c.DATASETS.TRAIN[0]),
           "img_per_s": timer.timed_steps * c.SOLVER.IMS_PER_GPU / timer.total_s,
           "step_ms_median": statistics.median(timer.step_times) * 1e3}
    if timer.peak_mem_gib is not None:
        row["peak_mem_gib"] = timer.peak_mem_gib
    if with_model:  # the same settings fed from device tensors: how much the data path costs
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model_row = bench_model(c, iters, warmup)[0]
        row["model_img_per_s"] = model_row["img_per_s"]
        row["fraction_of_model"] = row["img_per_s"] / model_row["img_per_s"]
    return [row]
