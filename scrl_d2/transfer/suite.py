"""The transfer suite: pretrained checkpoints x protocols x trials -> fine-tuning runs ->
one table (markdown, CSV, JSON) with mean +- std per metric beside the published numbers.

Layout under the suite's output directory::

    weights/<checkpoint>.pkl                      converted once (Detectron2 layout)
    runs/<protocol>/<checkpoint>/trial<k>/        one ``python -m scrl_d2.cli.train_net`` run each
        results.json                              present = complete (skipped on rerun)
        transfer_run.json                         the command, for the record
        log.txt                                   its stdout and stderr
    table.md  table.csv  table.json

A rerun skips complete runs and resumes incomplete ones (``--resume``: Detectron2's and
our checkpoints), so only failed or missing trials cost time.
"""
import contextlib
import csv
import io
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..utils.errors import InputFileNotFoundError, InputValueError
from ..utils.fs import atomic_write, checkout_root, finite_json
from .miniature import miniature_overrides
from .protocols import Protocol

__all__ = ["TransferRun", "TransferSuite", "mean_std", "RANDOM_INIT", "timed", "wall_time", "Interrupted",
           "call_forwarding_signals", "stop_signals_interrupt", "check_backends"]

logger = logging.getLogger("scrl_d2.transfer")
ROOT = checkout_root()  # configs/ and tools/
TRAIN_NET = ["-m", "scrl_d2.cli.train_net"]  # the package's entry point, not a file of the checkout
SUBMIT_SLURM = ["-m", "scrl_d2.cli.submit_slurm"]
RANDOM_INIT = "random"  # checkpoint path meaning "no pretraining"
LAUNCHERS = ("local", "torchrun", "slurm", "print")


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value). A missing metric
    (NaN: nothing to evaluate) makes both NaN rather than being dropped silently."""
    if not values:
        return float("nan"), float("nan")
    if any(v is None or not math.isfinite(v) for v in values):
        return float("nan"), float("nan")
    m = sum(values) / len(values)
    if len(values) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def check_backends(protocols: Sequence[Protocol]) -> None:
    """Refuse, before anything runs, a protocol that the fine-tuning path of this environment
    (``scrl_d2.backend``) cannot run: each protocol declares its ``backends``."""
    from ..backend import backend_name

    backend = backend_name()
    refused = [p for p in protocols if backend not in p.backends]
    if refused:
        chosen = os.environ.get("SCRL_D2_BACKEND", "auto").lower() != "auto"
        why = (f"SCRL_D2_BACKEND={backend}" if chosen
               else "Detectron2 is not installed; see docs/detectron2.md")
        raise InputValueError(f"--protocols: {', '.join(p.name for p in refused)} run(s) on "
                              f"{' / '.join(sorted({b for p in refused for b in p.backends}))} only; this environment "
                              f"fine-tunes with {backend} ({why})")


@dataclass
class TransferRun:
    protocol: Protocol
    checkpoint: str
    trial: int
    output_dir: str
    command: List[str]

    @property
    def results_file(self) -> str:
        return os.path.join(self.output_dir, "results.json")

    def complete(self) -> bool:
        return os.path.isfile(self.results_file)

    def results(self) -> Dict[str, float]:
        """``{"task/metric": value}`` of a complete run (NaN where results.json has null)."""
        with open(self.results_file) as f:
            res = json.load(f)
        flat = {}
        for task, metrics in res.items():
            if isinstance(metrics, dict):
                for m, v in metrics.items():
                    flat[f"{task}/{m}"] = float("nan") if v is None else float(v)
        return flat


class TransferSuite:
    """Plans, runs and tabulates (checkpoint, protocol, trial) fine-tunings."""

    def __init__(self, output_dir: str, checkpoints: Dict[str, str], protocols: Sequence[Protocol],
                 trials: Optional[int] = None, max_trials: Optional[int] = None, num_gpus: int = 1, launcher: str = "local",
                 miniature_root: str = "", opts: Sequence[str] = (), slurm_args: Sequence[str] = (),
                 python: str = sys.executable):
        if launcher not in LAUNCHERS:
            raise InputValueError(f"--launcher {launcher!r}: expected one of {list(LAUNCHERS)}")
        if not checkpoints:
            raise InputValueError("no checkpoints: give --weights NAME=PATH (PATH 'random' for random initialisation)")
        if not protocols:
            raise InputValueError("no protocols: give --protocols (see --list)")
        for name, path in checkpoints.items():
            if not name or "/" in name or name.startswith("."):
                raise InputValueError(f"--weights {name}={path}: the NAME must be a plain word (it names folders)")
            if path != RANDOM_INIT and not os.path.isfile(path):
                raise InputFileNotFoundError(f"--weights {name}={path}: file not found")
        if trials is not None and trials < 1:
            raise InputValueError(f"--trials {trials}: expected 1 or more")
        self.output_dir = os.path.abspath(output_dir)
        self.checkpoints, self.protocols = dict(checkpoints), list(protocols)
        self.trials, self.max_trials, self.num_gpus, self.launcher = trials, max_trials, num_gpus, launcher
        self.miniature_root = miniature_root
        self.opts, self.slurm_args, self.python = list(opts), list(slurm_args), python

    # ------------------------------------------------------------------ planning
    def weights_file(self, name: str) -> str:
        src = self.checkpoints[name]
        if src == RANDOM_INIT:
            return ""
        if src.endswith(".pkl"):  # already Detectron2's layout (tools/convert.py, MoCo's converter)
            return os.path.abspath(src)
        return os.path.join(self.output_dir, "weights", f"{name}.pkl")

    def convert_weights(self) -> None:
        """Convert every checkpoint not yet converted (ours, the release's, torchvision's)."""
        from ..checkpoint.convert import convert_checkpoint

        for name, src in self.checkpoints.items():
            dst = self.weights_file(name)
            if not dst or os.path.isfile(dst) or dst == os.path.abspath(src):
                continue
            if self.launcher == "print":
                print(shlex.join([self.python, os.path.join(ROOT, "tools", "convert.py"), src, dst]))
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            s = convert_checkpoint(src, dst)
            logger.info(f"converted {name}: {s['layout']} layout, ResNet-{s['resnet_depth']} -> {dst}")

    def trials_of(self, protocol: Protocol) -> int:
        """``trials`` if given, else the protocol's own count (capped at ``max_trials``)."""
        return self.trials or min(protocol.trials, self.max_trials or protocol.trials)

    def runs(self) -> List[TransferRun]:
        out = []
        for p in self.protocols:
            for name in self.checkpoints:
                for k in range(1, self.trials_of(p) + 1):
                    d = os.path.join(self.output_dir, "runs", p.name, name, f"trial{k}")
                    out.append(TransferRun(p, name, k, d, self._command(p, name, k, d)))
        return out

    def _command(self, p: Protocol, name: str, trial: int, out_dir: str) -> List[str]:
        opts = ["MODEL.WEIGHTS", self.weights_file(name), "OUTPUT_DIR", out_dir] + p.trial_overrides(trial)
        if self.miniature_root:
            opts += miniature_overrides(p, self.miniature_root, trial)
        opts += self.opts
        args = ["--config-file", p.config_path, "--resume"]
        if self.launcher == "slurm":
            return [self.python, *SUBMIT_SLURM] + self.slurm_args + args + opts
        if self.launcher == "torchrun":
            return ["torchrun", f"--nproc-per-node={self.num_gpus}", *TRAIN_NET] + args + opts
        return [self.python, *TRAIN_NET] + args + ["--num-gpus", str(self.num_gpus)] + opts

    # ------------------------------------------------------------------ running
    def runs_here(self) -> bool:
        """Whether the runs run in this environment (printed commands and SLURM jobs may run
        where another fine-tuning path is installed)."""
        return self.launcher in ("local", "torchrun")

    def execute(self) -> Dict[str, List[TransferRun]]:
        """Run (or print, or submit) every incomplete run; returns runs by state. A protocol
        that this environment's fine-tuning path cannot run is refused before anything runs."""
        if self.runs_here():
            check_backends(self.protocols)
        self.convert_weights()
        state: Dict[str, List[TransferRun]] = {"complete": [], "ran": [], "failed": [], "submitted": [],
                                               "printed": []}
        runs = self.runs()
        todo = [r for r in runs if not r.complete()]
        done = [r for r in runs if r.complete()]
        state["complete"] = done
        if done:
            logger.info(f"{len(done)} run(s) already complete: skipped")
        for i, run in enumerate(todo, 1):
            state[self.execute_run(run, f"[{i}/{len(todo)}]")].append(run)
        return state

    def execute_run(self, run: TransferRun, prefix: str = "") -> str:
        """Run (or print, or submit) one run; returns its state: ``ran``, ``failed``,
        ``submitted`` or ``printed``. The wall time of every attempt is added to the run's
        ``timing.json`` (``wall_s``: all attempts together, interrupted ones included)."""
        tag = f"{prefix} {run.protocol.name} / {run.checkpoint} / trial {run.trial}".strip()
        if self.launcher == "print":
            print(shlex.join(run.command))
            return "printed"
        os.makedirs(run.output_dir, exist_ok=True)
        atomic_write(os.path.join(run.output_dir, "transfer_run.json"), lambda f: f.write(json.dumps(
            {"protocol": run.protocol.name, "checkpoint": run.checkpoint, "trial": run.trial,
             "command": run.command}, indent=1)), mode="w")
        logger.info(f"{tag}: {'submitting' if self.launcher == 'slurm' else 'running'} "
                    f"(log: {os.path.join(run.output_dir, 'log.txt')})")
        with open(os.path.join(run.output_dir, "log.txt"), "a") as log, timed(run.output_dir):
            rc = call_forwarding_signals(run.command, log, tag)
        if rc != 0:
            logger.error(f"{tag}: failed with exit status {rc}; see {os.path.join(run.output_dir, 'log.txt')}")
            return "failed"
        if self.launcher == "slurm":
            return "submitted"
        if run.complete():
            return "ran"
        logger.error(f"{tag}: ended without {run.results_file}")
        return "failed"

    # ------------------------------------------------------------------ the table
    def table(self) -> List[Dict]:
        """One row per (protocol, checkpoint) and per published row: mean/std/n per metric."""
        rows = []
        by_key: Dict[Tuple[str, str], List[TransferRun]] = {}
        for r in self.runs():
            by_key.setdefault((r.protocol.name, r.checkpoint), []).append(r)
        for p in self.protocols:
            for name in self.checkpoints:
                runs = by_key[(p.name, name)]
                done = [r for r in runs if r.complete()]
                values = [r.results() for r in done]
                cells = {}
                for m in p.metrics:
                    mean, std = mean_std([v.get(m, float("nan")) for v in values]) if values else (float("nan"),) * 2
                    cells[m] = {"mean": mean, "std": std, "n": len(values)}
                rows.append({"protocol": p.name, "title": p.title, "row": name, "source": "ours",
                             "trials": f"{len(done)}/{len(runs)}", "metrics": cells,
                             "runs": [os.path.relpath(r.output_dir, self.output_dir) for r in done]})
            for label, published in p.published.items():
                rows.append({"protocol": p.name, "title": p.title, "row": label, "source": p.source,
                             "trials": "", "metrics": {m: {"mean": published[m], "std": None, "n": None}
                                                       for m in p.metrics if m in published}, "runs": []})
        return rows

    def write_table(self) -> str:
        """Write table.md / table.csv / table.json; returns the markdown."""
        rows = self.table()
        md = self._markdown(rows)
        os.makedirs(self.output_dir, exist_ok=True)
        atomic_write(os.path.join(self.output_dir, "table.md"), lambda f: f.write(md), mode="w")
        atomic_write(os.path.join(self.output_dir, "table.csv"), lambda f: f.write(self._csv(rows)), mode="w")
        atomic_write(os.path.join(self.output_dir, "table.json"),
                     lambda f: f.write(finite_json(rows)), mode="w")
        return md

    @staticmethod
    def _cell(c: Dict) -> str:
        if c is None:
            return ""
        mean, std, n = c["mean"], c["std"], c["n"]
        if n == 0:
            return "—"
        if mean is None or not math.isfinite(mean):
            return "n/a"
        if n is None:  # published
            return f"{mean:.2f}"
        return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"

    def _markdown(self, rows: List[Dict]) -> str:
        out = io.StringIO()
        for p in self.protocols:
            mine = [r for r in rows if r["protocol"] == p.name]
            out.write(f"### {p.title}\n\n`configs/{p.config}`, {self.trials_of(p)} trial(s) per checkpoint; "
                      "mean ± sample std over trials\n\n")
            head = ["", "source"] + list(p.metrics) + ["trials", "runs"]
            out.write("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
            for r in mine:
                links = ", ".join(f"[{i + 1}]({path})" for i, path in enumerate(r["runs"]))
                cells = [self._cell(r["metrics"].get(m)) for m in p.metrics]
                out.write("| " + " | ".join([r["row"], r["source"]] + cells + [r["trials"], links]) + " |\n")
            out.write("\n")
        return out.getvalue()

    @staticmethod
    def _csv(rows: List[Dict]) -> str:
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(["protocol", "row", "source", "metric", "mean", "std", "n", "runs"])
        for r in rows:
            for m, c in r["metrics"].items():
                w.writerow([r["protocol"], r["row"], r["source"], m, _fmt(c["mean"]), _fmt(c["std"]),
                            "" if c["n"] is None else c["n"], " ".join(r["runs"])])
        return out.getvalue()


class Interrupted(Exception):
    """The tool or the run it waited for got a stop signal (SIGTERM / SIGUSR1 / SIGUSR2); the
    run stopped with its checkpoint (exit 75) or before starting: rerun to resume."""

    def __init__(self, signum: Optional[int], step: str):
        by = f"by {signal.Signals(signum).name} " if signum else ""
        super().__init__(f"interrupted {by}during {step}; rerun the same command to resume")
        self.signum = signum


def call_forwarding_signals(cmd: Sequence[str], log, step: str = "", cwd: Optional[str] = None) -> int:
    """Run ``cmd`` (stdout and stderr to ``log``) and wait for it. A stop signal to this
    process is passed on to the child, which checkpoints and exits; then, as when the child
    itself stopped on a signal (exit 75), :class:`Interrupted` is raised. The handlers are in
    place before the child starts and the child is always waited for, so a rerun never races
    a trainer still running in the same folder (only SIGKILL can orphan it)."""
    from ..engine.defaults import EXIT_INTERRUPTED
    from ..engine.preemption import STOP_SIGNALS

    got: List[int] = []
    proc: Optional[subprocess.Popen] = None

    def forward(signum, frame):
        got.append(signum)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signum)  # a signal to the whole process group reaches the child twice: harmless

    main = threading.current_thread() is threading.main_thread()  # only there can handlers be installed
    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS} if main else {}
    try:
        if not got:
            proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
            if got:  # arrived while it started
                proc.send_signal(got[0])
            rc = proc.wait()
    finally:
        if proc is not None and proc.poll() is None:  # left by an exception (e.g. KeyboardInterrupt): not orphaned
            proc.wait()  # (stop signals meanwhile still reach it through ``forward``)
        for s, h in previous.items():
            signal.signal(s, h)
    step = step or shlex.join(cmd[:4])
    if got:
        raise Interrupted(got[0], step)
    if rc == EXIT_INTERRUPTED:  # the child alone was signalled (e.g. a scheduler's signal to it)
        raise Interrupted(None, step)
    return rc


@contextlib.contextmanager
def stop_signals_interrupt(step: str):
    """A stop signal during an in-process step raises :class:`Interrupted` (one line, exit 75;
    every step's output is atomic, so a rerun resumes). Subprocess steps install their own
    handlers (:func:`call_forwarding_signals`) and restore these."""
    from ..engine.preemption import STOP_SIGNALS

    def stop(signum, frame):
        raise Interrupted(signum, step)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def timed(folder: str):
    """Add the wall time of the enclosed block to ``folder/timing.json`` (``wall_s``), also
    when it ends by an exception or an interruption (the time was spent)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        path = os.path.join(folder, "timing.json")
        total = wall_time(folder) + time.perf_counter() - t0
        atomic_write(path, lambda f: f.write(json.dumps({"wall_s": round(total, 3)})), mode="w")


def wall_time(folder: str) -> float:
    """The seconds :func:`timed` recorded for ``folder`` (0 if none)."""
    try:
        with open(os.path.join(folder, "timing.json")) as f:
            return float(json.load(f)["wall_s"])
    except (OSError, ValueError, KeyError):
        return 0.0


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:.4f}"
