"""Start 1..N processes per machine over 1..M machines, or join a group another tool
started.

Under torchrun (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``: submitit's ``TorchDistributedEnvironment`` for SLURM), this process is
one worker: it initialises from ``env://`` and starts no processes. Otherwise
Detectron2's ``launch`` starts them when Detectron2 is the backend, else an equivalent
over ``torch.multiprocessing``. Processes use NCCL on GPUs and gloo on CPUs, so the
multi-process path also runs (and is tested) on a machine without a GPU. ``timeout``
bounds every collective: a process whose peer died stops with a clear message within
it instead of hanging.
"""
import multiprocessing
import os
import signal
import socket
import threading
from datetime import timedelta
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..utils import comm
from ..utils.errors import InputValueError

__all__ = ["launch", "find_free_port", "resolve_dist_url", "env_rendezvous", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = timedelta(minutes=10)
_ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env_rendezvous() -> bool:
    """Whether a launcher (torchrun, submitit) already made this process one worker of a
    group: the variables of PyTorch's ``env://`` initialisation are set."""
    return all(k in os.environ for k in _ENV_KEYS)


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _main_machine_address() -> str:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outward interface
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def resolve_dist_url(dist_url: Optional[str], num_machines: int, machine_rank: int) -> str:
    """``auto``: a free port on this (main) machine; prints what the others must pass."""
    if dist_url and dist_url != "auto":
        return dist_url
    if num_machines == 1:
        return f"tcp://127.0.0.1:{find_free_port()}"
    if machine_rank != 0:
        raise InputValueError("--dist-url auto only works on the main machine (--machine-rank 0); pass the "
                              "tcp://HOST:PORT that machine printed")
    url = f"tcp://{_main_machine_address()}:{find_free_port()}"
    print(f"[scrl_d2] main machine listening at --dist-url {url}\n"
          f"[scrl_d2] start the other machines with: --num-machines {num_machines} "
          f"--machine-rank <1..{num_machines - 1}> --dist-url {url}", flush=True)
    return url


def launch(main_func: Callable, num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: Optional[str] = None, args: Tuple = (), timeout: timedelta = DEFAULT_TIMEOUT) -> None:
    """Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes on this machine (or,
    under torchrun / submitit, in this process, one worker of their group)."""
    # every worker's groups (the gloo side group included) and messages use it
    os.environ[comm.DIST_TIMEOUT_ENV] = f"{timeout.total_seconds():g}"
    if threading.current_thread() is threading.main_thread():
        from .preemption import start_resource_tracker

        start_resource_tracker()  # before any process that would start it: it must outlive SIGUSR2
    if env_rendezvous():
        _env_worker(main_func, args, timeout, num_gpus_per_machine * num_machines)
        return
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        main_func(*args)
        return
    if torch.cuda.is_available() and num_gpus_per_machine > torch.cuda.device_count():
        raise InputValueError(f"--num-gpus {num_gpus_per_machine} but only {torch.cuda.device_count()} GPUs are "
                              "visible")
    url = resolve_dist_url(dist_url, num_machines, machine_rank)
    from ..backend import use_detectron2

    if use_detectron2():
        from detectron2.engine import launch as d2_launch

        print(f"[scrl_d2] starting {num_gpus_per_machine} processes with detectron2.engine.launch", flush=True)
        with _forward_stop_signals():
            d2_launch(_run_then_tear_down, num_gpus_per_machine, num_machines=num_machines,
                      machine_rank=machine_rank, dist_url=url, args=(main_func, *args), timeout=timeout)
        return
    print(f"[scrl_d2] starting {num_gpus_per_machine} processes ({'nccl' if torch.cuda.is_available() else 'gloo'})",
          flush=True)
    context = mp.start_processes(
        _distributed_worker, nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, url, args, timeout),
        daemon=False, start_method="spawn", join=False,
    )
    with _forward_stop_signals():
        while not context.join():
            pass


class _forward_stop_signals:
    """While the workers run, a SIGTERM / SIGUSR1 / SIGUSR2 sent to this (parent)
    process reaches them: they stop after their step with a checkpoint."""

    def __init__(self):
        from .preemption import STOP_SIGNALS

        self.signals, self.previous = STOP_SIGNALS, {}

    def _forward(self, signum, frame) -> None:
        for p in multiprocessing.active_children():
            try:
                os.kill(p.pid, signum)
            except ProcessLookupError:
                pass

    def __enter__(self):
        for s in self.signals:
            self.previous[s] = signal.signal(s, self._forward)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def _env_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """``env://``'s store, under a prefix of its own for each torchrun restart: torchrun's
    agent keeps one store across restarts, so the addresses the killed workers published
    would otherwise be read by the new ones (PyTorch's plain ``env://`` then fails with
    "connectFullMesh failed ... Connection refused" or hangs)."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent and rank == 0, timeout=timeout)
    return dist.PrefixStore(f"scrl_d2/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _env_worker(main_func: Callable, args: Tuple, timeout: timedelta, asked: int) -> None:
    """One worker of a group started by torchrun / submitit: ``env://``."""
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    local_rank = int(os.environ.get("LOCAL_RANK", rank % local_size))
    if rank == 0:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "the environment (env://)"
        note = f"; --num-gpus/--num-machines ({asked} processes) ignored" if asked > 1 else ""
        print(f"[scrl_d2] {world_size} processes started by {launcher}, {local_size} per machine, rendezvous at "
              f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}{note}", flush=True)
    if world_size == 1:
        main_func(*args)
        return
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=_env_store(rank, world_size, timeout),
                                rank=rank, world_size=world_size, timeout=timeout,
                                **({"device_id": torch.device("cuda", local_rank)} if use_cuda else {}))
    except Exception as e:
        raise RuntimeError(f"process group initialisation failed at env:// ({os.environ['MASTER_ADDR']}:"
                           f"{os.environ['MASTER_PORT']}): {e}") from e
    comm.create_local_process_group(local_size)
    comm.synchronize()
    _run_then_tear_down(main_func, *args)


def _run_then_tear_down(main_func: Callable, *args) -> None:
    """Run, then close the process group once every process is done: left to
    interpreter exit (as Detectron2's launch does), gloo's threads can abort a process."""
    finished = False
    try:
        main_func(*args)
        finished = True
    finally:
        if dist.is_initialized():
            if finished:  # after a failure a peer may be gone: no barrier to wait in
                comm.synchronize()
            dist.destroy_process_group()


def _distributed_worker(local_rank: int, main_func: Callable, world_size: int, num_gpus_per_machine: int,
                        machine_rank: int, dist_url: str, args: Tuple, timeout: timedelta) -> None:
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    try:
        dist.init_process_group(backend=backend, init_method=dist_url, world_size=world_size, rank=global_rank,
                                timeout=timeout, **({"device_id": torch.device("cuda", local_rank)} if use_cuda else {}))
    except Exception as e:
        raise RuntimeError(f"process group initialisation failed at {dist_url}: {e}") from e
    comm.create_local_process_group(num_gpus_per_machine)
    comm.synchronize()
    _run_then_tear_down(main_func, *args)
