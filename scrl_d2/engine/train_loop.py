"""The one training loop of the project: pretraining and fine-tuning subclass it.

Detectron2's ``TrainerBase`` (hooks around each step, an ``EventStorage``, ``iter`` /
``start_iter`` / ``max_iter``) plus what a long run on a cluster needs and Detectron2
leaves to each user: stop signals agreed by every process after each step (a complete
checkpoint, then exit 75), no checkpoint with a non-finite tensor, the trainer's state
(iteration, hooks, random generators) in every checkpoint and restored on resume.
Subclasses provide ``run_loop`` (how batches arrive) and ``run_step`` (one step).
"""
import logging
import os
import time
import weakref
from typing import Dict, Iterable, List, Optional

import torch

from ..utils import comm
from ..utils.events import EventStorage, history_state, restore_history
from ..utils.fs import WriteError
from .defaults import TrainingDiverged
from .hooks import EventWriters, HookBase, StepMetrics, hook_states
from .preemption import StopSignals
from .rng import rng_state, set_rng_state

__all__ = ["TrainerBase"]

logger = logging.getLogger("scrl_d2.engine")


class TrainerBase:
    """Subclasses set ``cfg``, ``model``, ``device``, ``world_size``, ``checkpointer``,
    ``max_iter``, ``global_batch`` and register their hooks, then implement ``run_loop``
    (feed :meth:`step` until ``max_iter`` or a segment's end) and ``run_step``.

    Detectron2's convention: during a step ``iter`` is its 0-based index (hooks'
    ``after_step`` see the step just run); between steps it counts the steps done."""

    def __init__(self):
        self.iter = self.start_iter = 0
        self.max_iter = 0
        self.epoch_end = False  # pretraining: whether the step just run was the last of an epoch
        self._in_step = False
        self._stop: Optional[StopSignals] = None
        self.storage: Optional[EventStorage] = None
        self._window: List[Dict] = []
        self._hooks: List[HookBase] = []
        self._history: Dict = {}  # a resumed run's metric history, restored into the storage

    # ---------------------------------------------------------------- hooks
    def register_hooks(self, hooks: List[Optional[HookBase]]) -> None:
        """Append hooks (Detectron2 ``HookBase`` subclasses work) in the order given. The
        writers stay last, so that what a hook puts into the storage is written."""
        hooks = [h for h in hooks if h is not None]
        for h in hooks:
            h.trainer = weakref.proxy(self)  # as Detectron2: no reference cycle
        tail = [h for h in self._hooks if isinstance(h, EventWriters)]
        self._hooks = [h for h in self._hooks if not isinstance(h, EventWriters)] + hooks + tail

    @property
    def hooks(self) -> List[HookBase]:
        return self._hooks

    def _after_backward(self) -> None:
        for h in self._hooks:
            h.after_backward()

    # ---------------------------------------------------------------- loop
    def train(self) -> None:
        """Detectron2's ``TrainerBase.train``: an ``EventStorage`` around the run, hooks
        called at the same points; when it returns normally ``iter == max_iter``."""
        with EventStorage(self.start_iter) as self.storage, StopSignals() as self._stop:
            restore_history(self.storage, self._history)
            try:
                for h in self._hooks:
                    h.before_train()
                while self.iter < self.max_iter:
                    self.run_loop()
            finally:
                self.storage.iter = self.iter  # as Detectron2: == max_iter after a complete run
                for h in self._hooks:
                    h.after_train()

    def run_loop(self) -> None:
        raise NotImplementedError

    def run_step(self, batch, data_time: float) -> None:
        raise NotImplementedError

    def end_of_step(self) -> None:
        """Called after ``run_step`` and before the hooks' ``after_step`` (pretraining: the
        epoch's end)."""

    def step(self, batch, data_time: float) -> None:
        """Step ``self.iter`` with its hooks; then every process agrees whether any got a
        stop signal (one small all-reduce) and, if so, all checkpoint and stop here."""
        self.storage.iter = self.iter
        self._in_step = True
        for h in self._hooks:
            h.before_step()
        self.run_step(batch, data_time)
        self.end_of_step()
        for h in self._hooks:
            h.after_step()
        signum = self._stop.requested()  # every process the same answer
        if signum:
            self._interrupt(signum)
        self._in_step, self.epoch_end = False, False
        self.iter += 1

    def iterate(self, loader: Iterable, stop_at: Optional[int] = None) -> None:
        """Steps over ``loader``'s batches until ``max_iter`` (or iteration ``stop_at``)."""
        end = self.max_iter if stop_at is None else min(stop_at, self.max_iter)
        if self.iter >= end:
            return
        t_data = time.perf_counter()
        for batch in loader:
            self.step(batch, time.perf_counter() - t_data)
            t_data = time.perf_counter()
            if self.iter >= end:
                break

    def pop_window(self) -> List[Dict]:
        """The steps since the last read: each ``{"iter", "values" (device tensors),
        "time", "data_time", "scalars"}`` (StepMetrics puts them into the storage)."""
        window, self._window = self._window, []
        return window

    def is_log_step(self) -> bool:
        """Whether the writers write after this step: every LOG_PERIOD steps (as
        Detectron2's PeriodicWriter), at the last step and at each epoch end."""
        period = max(1, self.cfg.LOG_PERIOD)
        return (self.iter + 1) % period == 0 or self.iter == self.max_iter - 1 or self.epoch_end

    # ---------------------------------------------------------------- checkpoints
    def interrupt_checkpoint_name(self, done: int) -> str:
        """The file a stop signal writes after ``done`` steps (Detectron2's name)."""
        return f"model_{done - 1:07d}"

    def _interrupt(self, signum: int) -> None:
        """Preemption: a complete checkpoint of the state after this step, then stop
        (submitit's handler, if any, requeues the job)."""
        name = self.interrupt_checkpoint_name(self.iter + 1)
        self.save_checkpoint(name, **self.checkpoint_extra())
        self._stop.stop(signum, self.where(), os.path.join(self.cfg.OUTPUT_DIR, f"{name}.pth"))

    def checkpoint_extra(self) -> Dict:
        """Top-level entries of an iteration checkpoint beside the trainer's state:
        Detectron2's ``iteration`` (the step just run), which its tools read."""
        return {"iteration": self.iter}

    def where(self) -> str:
        return f"iteration {self.iter}"

    def save_checkpoint(self, name: str, essential: bool = True, **extra) -> None:
        """Write ``name.pth`` (never with a non-finite tensor). A failed write of an
        essential checkpoint stops the run; of another (``checkpoint_best``) it warns."""
        self.check_finite(f"before writing {name}.pth")
        for h in self._hooks:  # the steps' metrics into the storage: the checkpoint keeps their history
            if isinstance(h, StepMetrics):
                h.flush()
        try:
            self.checkpointer.save(name, tag_last=essential, trainer=self.state_dict(), **extra)
        except WriteError as e:
            if essential:
                raise
            logger.warning(f"{e}; training goes on")
        comm.synchronize()

    def last_good_checkpoint(self) -> str:
        path = self.checkpointer.get_checkpoint_file() if self.cfg.OUTPUT_DIR else ""
        return path or "none yet"

    def diverged_advice(self) -> str:
        return "Lower SOLVER.BASE_LR or check the data, then resume from it."

    @torch.no_grad()
    def check_finite(self, when: str) -> None:
        """Raise :class:`TrainingDiverged` on every process if a weight or buffer (running
        statistics included) is NaN or infinite on any (a collective: every process calls
        it, as :meth:`save_checkpoint`)."""
        bad = [n for n, t in self.model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if self.world_size > 1:  # per-process BN statistics may differ: every process must stop together
            flag = torch.tensor([len(bad)], dtype=torch.int64)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=comm._cpu_group())
            if flag.item() and not bad:
                bad = ["(on another process)"]
        if bad:
            raise TrainingDiverged(
                f"training diverged by {self.where()}: non-finite values in {len(bad)} tensors, e.g. {bad[:3]}; "
                f"stopped {when}. Last good checkpoint: {self.last_good_checkpoint()}. {self.diverged_advice()}")

    def diverged_loss(self, key: str, value: float, iteration: int) -> None:
        """Called with values all-reduced over the processes (StepMetrics): all stop."""
        raise TrainingDiverged(
            f"training diverged at iteration {iteration}: {key} is {value}; nothing was written after it. Last good "
            f"checkpoint: {self.last_good_checkpoint()}. {self.diverged_advice()}")

    def state_dict(self) -> Dict:
        """``iter``: steps done (the next step's index), from a hook's after_step too; the
        random generators of every process (a collective: every process calls it, as
        :meth:`save_checkpoint`). Plain tensors and numbers only
        (``torch.load(weights_only=True)`` reads it)."""
        return {"iter": self.iter + 1 if self._in_step else self.iter, "seed": self.cfg.SEED,
                "world_size": self.world_size, "rng": comm.all_gather(rng_state()),  # every process's own
                "hooks": hook_states(self._hooks),
                "history": history_state(self.storage) if self.storage is not None else {}}

    def load_state_dict(self, state: Dict) -> None:
        self.iter = self.start_iter = int(state["iter"])
        self._history = state.get("history", {})
        for name, value in state.get("hooks", {}).items():  # as Detectron2's TrainerBase
            match = [h for h in self._hooks if type(h).__qualname__ == name]
            if match:
                match[0].load_state_dict(value)
            else:
                logger.warning(f"no hook {name} in this run: its saved state is ignored")
        if state.get("seed") != self.cfg.SEED:
            logger.warning(f"resuming with SEED {self.cfg.SEED}, the checkpoint used {state.get('seed')}: "
                           "the data order from here on differs from an uninterrupted run")
        if state.get("world_size") != self.world_size:
            logger.warning(f"resuming on {self.world_size} processes, the checkpoint was written by "
                           f"{state.get('world_size')}: the data order (and batch statistics) differ")
        rng = state.get("rng")
        if isinstance(rng, dict):  # an older checkpoint: the main process's generators only
            set_rng_state(rng)
        elif rng and len(rng) == self.world_size:
            set_rng_state(rng[comm.get_rank()])
        elif rng:
            set_rng_state(rng[comm.get_rank() % len(rng)])

    def resume(self, path: str) -> None:
        """Everything from ``path``: weights, optimizer, scaler, the trainer's state. A file
        of Detectron2's own PeriodicCheckpointer (no trainer state) resumes after its
        iteration with fresh random generators."""
        logger.info(f"resuming from {path}")
        extra = self.checkpointer.load(path)
        if "trainer" not in extra and "iteration" in extra:
            logger.warning(f"{path} has no trainer state (a Detectron2 PeriodicCheckpointer file): resuming "
                           f"after its iteration {extra['iteration']} with fresh random generators")
            extra["trainer"] = {"iter": int(extra["iteration"]) + 1, "seed": self.cfg.SEED,
                                "world_size": self.world_size}
        self.load_state_dict(extra.get("trainer", {"iter": 0}))
