"""Command-line conventions and per-run set-up, as Detectron2's ``engine.defaults``."""
import argparse
import logging
import os
import random
import re
import sys
import traceback
from typing import Optional

import numpy as np
import torch
import yaml

from ..checkpoint import UNSAFE_LOAD_ENV, has_run_checkpoint
from ..utils import comm
from ..utils.errors import InputValueError, bad_input_cause
from ..utils.fs import atomic_write
from ..utils.logger import setup_logger

__all__ = ["ArgumentParser", "default_argument_parser", "default_setup", "resolve_output_dir", "seed_all_rng",
           "resolve_device", "available_device",
           "run_main", "TrainingDiverged", "EXIT_BAD_INPUT", "EXIT_DIVERGED", "EXIT_FAILED", "EXIT_PEER_LOST",
           "EXIT_INTERRUPTED"]

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_PEER_LOST = 1, 2, 3, 4
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped on a signal with a checkpoint; rerun to resume


class TrainingDiverged(FloatingPointError):
    """A non-finite loss or weight: the run stops before it can write a checkpoint of it."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected 1 or more")
    return value


# what gloo's errors say (they carry its source path, also for timeouts); NCCL's come as
# DistBackendError. A RuntimeError that merely mentions NCCL (a CUDA error, a bug) is not
# a lost peer: it keeps its traceback.
_PEER_MARKERS = ("Connection reset by peer", "Connection closed by peer", "/gloo/")


def peer_lost(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another process of the run died
    or stopped answering (torch's DistError, e.g. NCCL's; gloo's errors and timeouts)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and comm.get_world_size() > 1):
        return False
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _PEER_MARKERS)


def _dist_timeout_s() -> float:
    return comm.dist_timeout_s()


def _message(e: BaseException) -> str:
    if peer_lost(e):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (f"lost contact with another process of this run: {first[:300]} -- it died or stopped answering "
                f"(--dist-timeout {_dist_timeout_s():g}s bounds the wait). Files already written are intact; rerun "
                "the command (or let torchrun / SLURM restart it) to resume from the newest checkpoint")
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def _exit_code(e: BaseException) -> Optional[int]:
    """The status of a known failure: 2 bad input (only what the project diagnosed as
    such: ``scrl_d2.utils.errors.BadInput``, or an error raised from one), 3 divergence,
    4 a lost peer process, 75 stopped on a signal with a checkpoint, 1 an unwritable
    checkpoint; None for anything else (a bug: its traceback must be seen)."""
    from ..utils.fs import WriteError
    from .preemption import TrainingInterrupted

    if isinstance(e, TrainingInterrupted):
        return EXIT_INTERRUPTED
    if peer_lost(e):
        return EXIT_PEER_LOST
    if isinstance(e, TrainingDiverged):
        return EXIT_DIVERGED
    if isinstance(e, WriteError):
        return EXIT_FAILED
    if bad_input_cause(e) is not None:
        return EXIT_BAD_INPUT
    return None


def _log_to_files(msg: str, exc_info) -> None:
    """The message and traceback into every process's log.txt (not to the console)."""
    log = logging.getLogger("scrl_d2")
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, msg, None, exc_info)
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def run_main(main_func, *args) -> None:
    """Run ``main_func(*args)`` in this process. A known failure ends the process with one
    line on stderr and its exit status: 2 bad input, 3 divergence, 1 an unwritable
    checkpoint; the full traceback goes to log.txt (and to stderr too with
    SCRL_D2_DEBUG=1, the status unchanged). Anything else is raised as usual (traceback,
    exit status 1), and logged to log.txt."""
    try:
        main_func(*args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        _log_to_files(f"fatal error: {type(e).__name__}: {e}", sys.exc_info())
        code = _exit_code(e)
        if code is None:
            raise
        if os.environ.get("SCRL_D2_DEBUG"):
            traceback.print_exc()
        rank = f"[rank {comm.get_rank()}] " if comm.get_world_size() > 1 else ""
        kind = "stopped" if code == EXIT_INTERRUPTED else "error"
        # one write: the processes of a run share stderr, and print() writes the newline
        # apart, so two processes' lines could run together
        sys.stderr.write(f"{rank}{kind}: {_message(e)}\n")
        sys.stderr.flush()
        if code in (EXIT_INTERRUPTED, EXIT_PEER_LOST):
            logging.getLogger("scrl_d2").info(f"{kind}: {_message(e)}")
        sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's bad-input convention: a wrong argument is one line
    (``error: argument --num-gpus: 0: expected 1 or more``) and exit status 2, without
    the usage block (``--help`` shows it)."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


class _UnsafeLoad(argparse.Action):
    """``--unsafe-load``: sets $SCRL_D2_UNSAFE_LOAD for this process and every process it
    starts (spawned workers, submitted jobs), where files are loaded."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        os.environ[UNSAFE_LOAD_ENV] = "1"
        setattr(namespace, self.dest, True)


def add_unsafe_load_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--unsafe-load", action=_UnsafeLoad,
                        help="also load checkpoints / weights whose unpickling calls functions (files that are not "
                             "only tensors and plain values, e.g. written by older versions): this runs whatever code "
                             f"they hold, so only for files you trust (same as {UNSAFE_LOAD_ENV}=1)")


def default_argument_parser(epilog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        epilog=epilog or f"""
Examples:

Pretrain SCRL on 8 GPUs:
    $ {sys.argv[0]} --config-file configs/scrl_pretrain.yaml --num-gpus 8

Change some config options (KEY VALUE pairs after the flags):
    $ {sys.argv[0]} --config-file cfg.yaml SOLVER.BASE_LR 0.2 OUTPUT_DIR output/run1

Two machines:
    (machine0)$ {sys.argv[0]} --num-gpus 8 --num-machines 2 --machine-rank 0 --dist-url tcp://HOST:PORT
    (machine1)$ {sys.argv[0]} --num-gpus 8 --num-machines 2 --machine-rank 1 --dist-url tcp://HOST:PORT
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    parser.add_argument("--resume", action="store_true",
                        help="resume from the newest checkpoint (automatic when OUTPUT_DIR has one, for "
                             "pretraining and fine-tuning alike: rerunning a command, or a requeue, resumes; with "
                             "an empty OUTPUT_DIR, continue the newest numbered run of this config)")
    parser.add_argument("--fresh", action="store_true",
                        help="start over although OUTPUT_DIR holds checkpoints: its run (checkpoints, metrics, "
                             "results) is first moved to OUTPUT_DIR/previous_<n>/, never overwritten")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate a checkpoint (LOAD_DIR, OUTPUT_DIR or MODEL.WEIGHTS) without training")
    parser.add_argument("--num-gpus", type=_positive_int, default=1,
                        help="processes per machine (GPUs; CPU processes with gloo when there is no GPU)")
    parser.add_argument("--num-machines", type=_positive_int, default=1, help="total number of machines")
    parser.add_argument("--machine-rank", type=int, default=0, help="the rank of this machine")
    parser.add_argument("--dist-url", default="auto",
                        help="initialisation URL, tcp://HOST:PORT of the main machine; 'auto' picks a free port "
                             "there and prints the address the other machines need")
    parser.add_argument("--dist-timeout", type=float, default=_dist_timeout_s(), metavar="SECONDS",
                        help="how long a process waits in a collective for a peer that died or hangs before it "
                             "stops with a message (default 600; $SCRL_D2_DIST_TIMEOUT)")
    add_unsafe_load_argument(parser)
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs, e.g. SOLVER.BASE_LR 0.2")
    return parser


def has_checkpoint(directory: str) -> bool:
    """Whether ``directory`` holds a run's checkpoint (any the project writes; see
    :func:`scrl_d2.checkpoint.has_run_checkpoint`)."""
    return has_run_checkpoint(directory)


# what a run writes in OUTPUT_DIR besides log.txt and config.yaml (--fresh moves them aside)
_RUN_FILES = re.compile(r"^(model_\d+\.pth|model_final\.pth|checkpoint_.*\.pth|last_checkpoint|metrics\.json|"
                        r"results\.json|probe_eval\.json|events\.out\.tfevents\..*|inference|linear_eval|"
                        r"config(_resume_\d+)?\.yaml)$")


def archive_run(directory: str) -> Optional[str]:
    """Move the run in ``directory`` (checkpoints, metrics, results, evaluations, its
    config) to ``directory/previous_<n>/``; returns that folder, or None when there was
    no run. Nothing is deleted."""
    if not has_run_checkpoint(directory):
        return None
    n = 0
    while os.path.exists(os.path.join(directory, f"previous_{n}")):
        n += 1
    target = os.path.join(directory, f"previous_{n}")
    os.makedirs(target)
    for name in sorted(os.listdir(directory)):
        if _RUN_FILES.match(name):
            os.replace(os.path.join(directory, name), os.path.join(target, name))
    return target


# keys a rerun may change and still continue the same run (how it runs, not what it trains)
RESUME_MAY_CHANGE = ("DATALOADER.NUM_WORKERS", "LOG_PERIOD", "MODEL.DEVICE", "OUTPUT_DIR",
                     "SOLVER.CHECKPOINT_PERIOD", "SOLVER.CHECKPOINT_MAX_TO_KEEP", "DATASETS.ROOT")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resolve_resume(cfg, args) -> bool:
    """Whether this run continues the one in OUTPUT_DIR: with ``--resume``, or whenever
    OUTPUT_DIR holds a checkpoint of a run with this config (rerunning a command, or a
    requeue, resumes; ``--fresh`` moved any aside in :func:`default_setup`). A checkpoint of
    a run whose ``config.yaml`` differs in what it trains (another MODEL.WEIGHTS, dataset,
    schedule...) is not resumed silently: one line, exit 2."""
    if getattr(args, "resume", False) or not has_run_checkpoint(cfg.OUTPUT_DIR):
        return bool(getattr(args, "resume", False))
    path = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
    try:
        with open(path) as f:
            saved = _flat(yaml.safe_load(f) or {})
    except (OSError, yaml.YAMLError):
        return True  # no readable record of the run: as Detectron2, the newest checkpoint
    now = _flat(yaml.safe_load(cfg.dump()) or {})
    # keys on both sides only: a key added by an update (or by installing Detectron2) is no other run
    differ = sorted(k for k in set(saved) & set(now) if saved[k] != now[k] and k not in RESUME_MAY_CHANGE)
    if differ:
        k = differ[0]
        raise InputValueError(
            f"OUTPUT_DIR {cfg.OUTPUT_DIR} holds a run with another config ({k}: {saved.get(k)!r} there, "
            f"{now.get(k)!r} now{f', and {len(differ) - 1} more' if len(differ) > 1 else ''}): choose another "
            "OUTPUT_DIR, pass --resume to continue that run anyway, or --fresh to start over (the old run is "
            "moved to OUTPUT_DIR/previous_<n>/)")
    return True


def _restarted() -> bool:
    """Whether this process is a restart of the same job (torchrun, SLURM requeue)."""
    return any(int(os.environ.get(k, "0") or 0) > 0 for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def check_resume_arguments(args) -> None:
    """--fresh contradicts --resume and --eval-only: one line, exit 2, before anything runs."""
    if getattr(args, "fresh", False) and (args.resume or args.eval_only):
        other = "--resume" if args.resume else "--eval-only"
        raise InputValueError(f"--fresh and {other} exclude each other: --fresh starts a new run in OUTPUT_DIR "
                              "(the old one is moved to OUTPUT_DIR/previous_<n>/)")


def resolve_output_dir(cfg, config_file: str, resume: bool) -> str:
    """OUTPUT_DIR, or ``output/<config name>_<n>``: the next free ``n``, or with
    ``resume`` the newest numbered run that holds a checkpoint."""
    if cfg.OUTPUT_DIR:
        return cfg.OUTPUT_DIR
    stem = os.path.splitext(os.path.basename(config_file))[0] if config_file else "run"
    pattern = re.compile(rf"^{re.escape(stem)}_(\d+)$")
    runs = sorted(int(m.group(1)) for d in (os.listdir("output") if os.path.isdir("output") else [])
                  for m in [pattern.match(d)] if m)
    if resume:
        for n in reversed(runs):
            d = os.path.join("output", f"{stem}_{n}")
            if has_checkpoint(d):
                return d
    return os.path.join("output", f"{stem}_{(runs[-1] + 1) if runs else 0}")


def _save_config(cfg, logger: logging.Logger) -> None:
    """``config.yaml`` of a new run; a resumed run keeps its own, and a config that differs
    from it is saved as ``config_resume_<n>.yaml``."""
    path = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
    text = cfg.dump()
    if has_checkpoint(cfg.OUTPUT_DIR) and os.path.isfile(path):
        with open(path) as f:
            if f.read() == text:
                return
        n = 0
        while os.path.exists(os.path.join(cfg.OUTPUT_DIR, f"config_resume_{n}.yaml")):
            n += 1
        path = os.path.join(cfg.OUTPUT_DIR, f"config_resume_{n}.yaml")
        logger.warning(f"the config differs from the run's config.yaml (kept); this one is saved as {path}")
    atomic_write(path, lambda f: f.write(text), mode="w")
    logger.info(f"config saved to {path}")


def _known_stops(record: logging.LogRecord) -> bool:
    """Drops Detectron2's "Exception during training:" traceback for a stop on a signal or a
    divergence: :func:`run_main` reports those in one line (the traceback is in log.txt)."""
    from .preemption import TrainingInterrupted

    e = record.exc_info[1] if record.exc_info else None
    return not isinstance(e, (TrainingInterrupted, TrainingDiverged))


def seed_all_rng(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def available_device(name: str) -> str:
    """``name`` (MODEL.DEVICE), or ``"cpu"`` with a warning where it asks for a GPU and none
    is visible: the one CUDA -> CPU fallback of both pretraining and fine-tuning."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("scrl_d2").warning(f"MODEL.DEVICE is {name!r} but no GPU is visible: running on the CPU")
        return "cpu"
    return name


def resolve_device(cfg) -> torch.device:
    name = available_device(cfg.MODEL.DEVICE)
    if name.startswith("cuda"):
        return torch.device("cuda", comm.get_local_rank()) if comm.get_world_size() > 1 else torch.device(name)
    if name != "cpu":
        raise InputValueError(f"MODEL.DEVICE: unknown device {name!r}; use 'cuda' or 'cpu'")
    return torch.device("cpu")


def _run_seed(directory: str) -> Optional[int]:
    """The SEED a run with checkpoints in ``directory`` resolved at its first start
    (from its ``config.yaml``), or None."""
    path = os.path.join(directory, "config.yaml")
    if not has_checkpoint(directory) or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            seed = (yaml.safe_load(f) or {}).get("SEED")
    except (OSError, yaml.YAMLError):
        return None
    return seed if isinstance(seed, int) and seed >= 0 else None


def default_setup(cfg, args) -> None:
    """Resolve OUTPUT_DIR and SEED (the same on every process), set up logging, log the
    environment and the full config, and save the config as ``OUTPUT_DIR/config.yaml``.

    A run that resumes keeps what it resolved at its first start: with ``SEED -1`` it
    continues with the seed it drew then (so it ends as an uninterrupted run would), and
    its ``config.yaml`` is kept (a changed config is saved beside it)."""
    cfg.defrost()
    out = resolve_output_dir(cfg, getattr(args, "config_file", ""), getattr(args, "resume", False))
    cfg.OUTPUT_DIR = comm.broadcast_object(out)
    # --fresh once per job: a torchrun restart or a SLURM requeue reruns the same argv and resumes
    if getattr(args, "fresh", False) and comm.is_main_process() and not _restarted():
        moved = archive_run(cfg.OUTPUT_DIR)
        if moved:
            print(f"--fresh: the previous run of {cfg.OUTPUT_DIR} was moved to {moved}", file=sys.stderr)
    comm.synchronize()
    resumed_seed = _run_seed(cfg.LOAD_DIR or cfg.OUTPUT_DIR)
    if cfg.SEED < 0:
        seed = resumed_seed if resumed_seed is not None else int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        cfg.SEED = comm.broadcast_object(seed)
    cfg.freeze()
    rank = comm.get_rank()
    if comm.is_main_process():
        try:
            os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        except OSError as e:
            raise InputValueError(f"OUTPUT_DIR {cfg.OUTPUT_DIR}: cannot create it ({e.strerror or e}); "
                                  "choose a writable directory") from e
    comm.synchronize()
    logger = setup_logger(cfg.OUTPUT_DIR, distributed_rank=rank)
    # fvcore's checkpoint-loading reports (missing / unexpected keys) into log.txt too, as
    # Detectron2's default_setup does.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=rank, name="fvcore")
    from ..backend import detectron2_available

    # Detectron2's components (its event writers whenever it is installed, its modules
    # with that backend) log to its logger: the same console and log.txt.
    if detectron2_available():
        d2_logger = setup_logger(cfg.OUTPUT_DIR, distributed_rank=rank, name="detectron2")
        for h in d2_logger.handlers:
            h.addFilter(_known_stops)
    logger.info(f"rank {rank} of {comm.get_world_size()}; torch {torch.__version__}; "
                f"CUDA {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}")
    logger.info(f"command line: {' '.join(sys.argv)}")
    if getattr(args, "config_file", ""):
        logger.info(f"config file {args.config_file}")
    logger.debug(f"full config:\n{cfg.dump()}")
    if resumed_seed is not None and cfg.SEED == resumed_seed:
        logger.info(f"resuming run {cfg.LOAD_DIR or cfg.OUTPUT_DIR} with its seed {cfg.SEED}")
    if comm.is_main_process():
        _save_config(cfg, logger)
    from ..data.index import set_index_cache_dir

    # the dataset index is listed once per job, cached in OUTPUT_DIR/dataset_index/
    set_index_cache_dir(cfg.OUTPUT_DIR if cfg.DATASETS.get("INDEX_CACHE", True) else None)
    seed_all_rng(cfg.SEED + rank)
    torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
