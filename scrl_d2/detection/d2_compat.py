"""Work-arounds for known breakages of Detectron2's main branch that transfer protocols hit."""
import importlib
import importlib.abc
import importlib.machinery
import multiprocessing
import sys
import types

from ..utils.errors import InputImportError

__all__ = ["alias_cityscapesscripts", "numpy_compat"]

_INTERNAL = "deeplearning.projects.cityscapesApi.cityscapesscripts"


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``<_INTERNAL>[.sub]`` as the very module object ``cityscapesscripts[.sub]``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == _INTERNAL or fullname.startswith(_INTERNAL + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return importlib.import_module("cityscapesscripts" + spec.name[len(_INTERNAL):])

    def exec_module(self, module):
        pass


def alias_cityscapesscripts() -> None:
    """Detectron2's Cityscapes loader and evaluator import cityscapesscripts under a
    Meta-internal path (facebookresearch/detectron2#5436, "No module named 'deeplearning'").
    Serve that path from the public ``cityscapesscripts`` package; a missing package is named."""
    numpy_compat()
    if any(isinstance(f, _Alias) for f in sys.meta_path):
        return
    try:
        importlib.import_module(_INTERNAL)
        return  # an environment that has the internal path
    except ImportError:
        pass
    try:
        importlib.import_module("cityscapesscripts")
    except ImportError:
        raise InputImportError("the Cityscapes protocol needs `cityscapesscripts` (pip install cityscapesscripts; "
                               "Detectron2's Cityscapes loader and evaluator use it)") from None
    parts = _INTERNAL.split(".")
    for i in range(1, len(parts)):  # the empty parent packages
        name = ".".join(parts[:i])
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = []
            sys.modules[name] = module
    sys.meta_path.insert(0, _Alias())
    _cityscapes_json_writer()
    _cityscapes_pool_without_fork()


class _ForkserverPools:
    """Stands in for the ``multiprocessing`` module in Detectron2's Cityscapes loader: its
    ``Pool`` starts workers from a forkserver (with the alias above installed in them)."""

    cpu_count = staticmethod(multiprocessing.cpu_count)

    @staticmethod
    def Pool(processes=None):  # noqa: N802  (multiprocessing's name)
        ctx = multiprocessing.get_context("forkserver")
        # imported once by the server (if it is not running yet), not by every worker
        ctx.set_forkserver_preload(["scrl_d2.detection.d2_compat", "detectron2.data.datasets.cityscapes"])
        return _ClosingPool(ctx.Pool(processes, initializer=_pool_worker))


class _ClosingPool:
    """Detectron2 maps once and never closes its pool; left to the garbage collector, the pool
    is terminated from a finalizer, which can wait forever on a worker holding the task
    queue's lock. Closed and joined right after the map instead."""

    def __init__(self, pool):
        self._pool = pool

    def map(self, func, iterable):
        try:
            return self._pool.map(func, iterable)
        finally:
            self._pool.close()
            self._pool.join()

    def close(self) -> None:
        self._pool.close()

    def join(self) -> None:
        self._pool.join()


def _pool_worker() -> None:
    """A Cityscapes pool worker: the alias, and the stop signals left to the trainer (SLURM
    signals every process of a job; a worker that died of it would leave ``Pool.map``
    waiting forever). :class:`_ClosingPool` closes the pool after its map, so the workers end."""
    import signal

    from ..engine.preemption import STOP_SIGNALS

    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    alias_cityscapesscripts()


def _cityscapes_pool_without_fork() -> None:
    """Detectron2's Cityscapes loader parses the annotations in a ``multiprocessing.Pool``
    forked from the calling process: the trainer, at start-up and at every evaluation, while
    other threads run (TensorBoard's writer, loader threads). A worker forked while one of
    them held a lock waits forever, and the run with it (seen: a test session hung in the
    Cityscapes protocol). Its workers start from a forkserver instead, a process with one
    thread."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return
    from detectron2.data.datasets import cityscapes

    cityscapes.mp = _ForkserverPools


def _cityscapes_json_writer() -> None:
    """cityscapesscripts dumps its matches with ``default=o.__dict__``, which fails on the
    NumPy scalars NumPy 2 returns (``count_nonzero``), and into the current directory.
    Write NumPy scalars as numbers, and relative names beside the evaluator's
    ``gtInstancesFile`` (Detectron2 puts it in its temporary folder)."""
    import json
    import os

    import numpy as np

    ev = importlib.import_module("cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling")

    def write(data, file_name):
        if not os.path.isabs(file_name) and getattr(ev.args, "gtInstancesFile", ""):
            file_name = os.path.join(os.path.dirname(os.path.abspath(ev.args.gtInstancesFile)), file_name)
        with open(file_name, "w") as f:
            f.write(json.dumps(data, default=lambda o: o.item() if isinstance(o, np.generic) else o.__dict__,
                               sort_keys=True, indent=4))

    ev.writeDict2JSON = write


def numpy_compat() -> None:
    """The evaluators' packages predate NumPy 2: cityscapesscripts 2.3.0 (the newest) calls
    ``np.in1d`` (removed in NumPy 2.4) and lvis 0.5.3 (the newest) ``np.float`` (removed in
    1.24). Give NumPy back both names with their documented meaning (``isin`` flattened;
    the builtin ``float``) when they are missing; nothing else changes."""
    import numpy as np

    if "float" not in np.__dict__:
        np.float = float
    if not hasattr(np, "in1d"):
        np.in1d = lambda ar1, ar2, assume_unique=False, invert=False: np.isin(
            ar1, ar2, assume_unique=assume_unique, invert=invert).ravel()
