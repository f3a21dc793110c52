"""Start 1..N processes per machine over 1..M machines.

Detectron2's ``launch`` does it when Detectron2 is the backend; otherwise an equivalent
over ``torch.multiprocessing``. Processes use NCCL on GPUs and gloo on CPUs, so the
multi-process path also runs (and is tested) on a machine without a GPU.
"""
import socket
from datetime import timedelta
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..utils import comm

__all__ = ["launch", "find_free_port", "resolve_dist_url"]

DEFAULT_TIMEOUT = timedelta(minutes=30)


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
        raise ValueError("--dist-url auto only works on the main machine (--machine-rank 0); pass the "
                         "tcp://HOST:PORT that machine printed")
    url = f"tcp://{_main_machine_address()}:{find_free_port()}"
    print(f"[scrl_d2] main machine listening at --dist-url {url}\n"
          f"[scrl_d2] start the other machines with: --num-machines {num_machines} "
          f"--machine-rank <1..{num_machines - 1}> --dist-url {url}", flush=True)
    return url


def launch(main_func: Callable, num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: Optional[str] = None, args: Tuple = (), timeout: timedelta = DEFAULT_TIMEOUT) -> None:
    """Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes on this machine."""
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        main_func(*args)
        return
    if torch.cuda.is_available() and num_gpus_per_machine > torch.cuda.device_count():
        raise ValueError(f"--num-gpus {num_gpus_per_machine} but only {torch.cuda.device_count()} GPUs are visible")
    url = resolve_dist_url(dist_url, num_machines, machine_rank)
    from ..backend import use_detectron2

    if use_detectron2():
        from detectron2.engine import launch as d2_launch

        print(f"[scrl_d2] starting {num_gpus_per_machine} processes with detectron2.engine.launch", flush=True)
        d2_launch(_run_then_tear_down, num_gpus_per_machine, num_machines=num_machines,
                  machine_rank=machine_rank, dist_url=url, args=(main_func, *args), timeout=timeout)
        return
    print(f"[scrl_d2] starting {num_gpus_per_machine} processes ({'nccl' if torch.cuda.is_available() else 'gloo'})",
          flush=True)
    mp.start_processes(
        _distributed_worker, nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, url, args, timeout),
        daemon=False, start_method="spawn",
    )


def _run_then_tear_down(main_func: Callable, *args) -> None:
    """Run, then close the process group once every process is done: left to
    interpreter exit (as Detectron2's launch does), gloo's threads can abort a process."""
    try:
        main_func(*args)
    finally:
        if dist.is_initialized():
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
