"""Preemption: a signal asks the run to stop; it stops at the next step boundary.

Schedulers warn before they kill: SLURM sends SIGTERM (and, through submitit, SIGUSR2
before the time limit), torchrun and Kubernetes SIGTERM, some clusters SIGUSR1. The
handler only records the signal; the trainer checks it after each step (every process
agrees through one small all-reduce, so all stop at the same step), writes a complete
checkpoint and raises :class:`TrainingInterrupted` (exit status 75, "temporary failure:
rerun"). Under submitit, its own handler then runs too, and requeues the job.

Launchers signal more than the trainers: torchrun's agent sends SIGTERM to each worker's
whole process group (when a peer died and it restarts the group, or when it is stopped
itself), SLURM to every process of a task. DataLoader workers therefore run
:func:`loader_worker_signals`: such a signal leaves them alone. A worker that died of it
would make PyTorch's SIGCHLD handler raise "DataLoader worker ... is killed by signal"
in the trainer wherever it is: inside a checkpoint being written (lost, and reported as
an unwritable file), or in place of the trainer's own stop or "lost contact" message.
"""
import logging
import signal
import threading
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from ..data.workers import loader_worker_signals  # noqa: F401  (a loader worker's side)
from ..utils import comm

__all__ = ["TrainingInterrupted", "StopSignals", "STOP_SIGNALS", "loader_worker_signals", "start_resource_tracker"]

logger = logging.getLogger("scrl_d2.engine")

STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, n))


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (the helper process that frees the shared
    memory of loader workers' batches) with SIGUSR1 / SIGUSR2 ignored. SLURM signals every
    process of a job; the tracker ignores SIGINT and SIGTERM itself but died on SIGUSR2, and
    its successor printed KeyError tracebacks for every segment it had not seen. An ignored
    signal stays ignored across exec, so the tracker inherits it."""
    from multiprocessing import resource_tracker

    previous = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS if s != signal.SIGTERM}
    try:
        resource_tracker.ensure_running()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class TrainingInterrupted(RuntimeError):
    """The run stopped on a signal after writing a complete checkpoint: rerun to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """Records SIGTERM / SIGUSR1 / SIGUSR2 while installed (main thread only; elsewhere a
    no-op). ``requested()`` says, identically on every process, whether any process got one."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = signals
        self.signum: Optional[int] = None
        self._previous: Dict[int, Callable] = {}
        self._said = False

    def _handle(self, signum, frame) -> None:
        # only recorded here: logging from a handler can re-enter a stream being written
        if self.signum is None:
            self.signum = signum

    def _say_received(self) -> None:
        if self.signum and not self._said:
            self._said = True
            logger.warning(f"received {signal.Signals(self.signum).name}: stopping after the current step, with "
                           "a checkpoint")

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def requested(self) -> Optional[int]:
        """The signal any process received (None: none). A collective when distributed."""
        self._say_received()
        mine = self.signum or 0
        if comm.get_world_size() > 1:
            t = torch.tensor([mine], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=comm._cpu_group())
            mine = int(t.item())
        return mine or None

    def pass_on(self) -> None:
        """Call the handler that was installed before ours for the signal received (e.g.
        submitit's, which requeues the job and exits) once the checkpoint is written."""
        prev = self._previous.get(self.signum) if self.signum else None
        if callable(prev):
            prev(self.signum, None)

    def stop(self, signum: int, where: str, path: str) -> None:
        """After the checkpoint ``path`` is written: say so, hand the signal on (submitit
        requeues and exits here) and raise :class:`TrainingInterrupted`."""
        msg = (f"interrupted by {signal.Signals(signum).name} after {where}; wrote {path}: rerun the same command "
               "to resume")
        logger.warning(msg)
        self.pass_on()
        raise TrainingInterrupted(msg, signum)


