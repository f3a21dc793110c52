"""Throughput figures for SCRL and BYOL pretraining (figures, not pass/fail), and the
speed options' parity with the plain path. ``tools/benchmark.py`` (``scrl_d2.cli.benchmark``)
is the command line over these functions; each returns rows (dicts) that it prints.

* :mod:`.common`: the machine, the settings a row reports, a synthetic batch as the loader
  delivers it;
* :mod:`.train`: the real loop, :class:`BenchmarkTrainer` (PretrainTrainer without its
  default hooks) run by ``train()`` with the :class:`~scrl_d2.engine.hooks.ThroughputTimer`
  hook;
* :mod:`.steps`: the optimisation step on batches already on the device (``model``) and
  each speed option against the plain path (``parity``, with the structural pooling check
  :func:`scrl_d2.modeling.audit.pooling_check`);
* :mod:`.data`: the loader alone, the box-pair generator, the dataset index's start-up.
"""
from .common import machine, release_geometries, settings, synthetic_batch
from .data import bench_boxes, bench_data, bench_index, bench_per_core, one_core
from .steps import PARITY_VARIANTS, bench_model, bench_parity, default_parity_variants, run_steps
from .train import BenchmarkTrainer, bench_train, benchmark_config, time_training

__all__ = ["machine", "release_geometries", "settings", "synthetic_batch", "bench_boxes", "bench_data", "bench_index",
           "bench_per_core", "one_core",
           "PARITY_VARIANTS", "bench_model", "bench_parity", "default_parity_variants", "run_steps",
           "BenchmarkTrainer", "bench_train", "benchmark_config", "time_training"]
