"""Process-group helpers (the subset of Detectron2's ``utils.comm`` the loop needs)."""
import functools
import os
from datetime import timedelta
from typing import Any, List

import torch
import torch.distributed as dist

_LOCAL_PROCESS_GROUP = None
DIST_TIMEOUT_ENV = "SCRL_D2_DIST_TIMEOUT"  # set by ``launch`` from --dist-timeout, for every worker


def dist_timeout_s() -> float:
    """The run's ``--dist-timeout`` in seconds (600 when no launcher set it)."""
    return float(os.environ.get(DIST_TIMEOUT_ENV, 600))


def dist_timeout() -> timedelta:
    """What every process group of the run is created with: a collective whose peer died
    or hangs fails after this long, not after torch's default of 30 minutes."""
    return timedelta(seconds=dist_timeout_s())


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_local_rank() -> int:
    if not is_dist() or _LOCAL_PROCESS_GROUP is None:
        return 0
    return dist.get_rank(group=_LOCAL_PROCESS_GROUP)


def get_local_size() -> int:
    if not is_dist() or _LOCAL_PROCESS_GROUP is None:
        return 1
    return dist.get_world_size(group=_LOCAL_PROCESS_GROUP)


def is_main_process() -> bool:
    return get_rank() == 0


def create_local_process_group(num_workers_per_machine: int) -> None:
    """Every process joins the group of the processes on its own machine."""
    global _LOCAL_PROCESS_GROUP
    world, rank = get_world_size(), get_rank()
    num_machines = world // num_workers_per_machine
    for m in range(num_machines):
        ranks = list(range(m * num_workers_per_machine, (m + 1) * num_workers_per_machine))
        pg = dist.new_group(ranks, timeout=dist_timeout())
        if rank in ranks:
            _LOCAL_PROCESS_GROUP = pg


def synchronize() -> None:
    if get_world_size() > 1:
        if dist.get_backend() == dist.Backend.NCCL and torch.cuda.is_available():
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@functools.lru_cache()
def _cpu_group():
    """A gloo group for small CPU-side exchanges that must not sync the GPU, with the
    run's ``--dist-timeout`` (a lost peer must stop these waits as it stops NCCL's)."""
    if dist.get_backend() == "nccl":
        return dist.new_group(backend="gloo", timeout=dist_timeout())
    return dist.group.WORLD


def all_gather(obj: Any) -> List[Any]:
    if get_world_size() == 1:
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj, group=_cpu_group())
    return out


def all_reduce_cpu_sum(value: float) -> float:
    """Sum a Python number over processes without touching the GPU."""
    if get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=_cpu_group())
    return float(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_cpu_group())
    return box[0]


def _use_detectron2_comm() -> None:
    """With the Detectron2 backend, processes are started by its ``launch``, which keeps
    the per-machine process group in ``detectron2.utils.comm``: use its functions."""
    from ..backend import use_detectron2

    if not use_detectron2(quiet=True):  # at import: a bad SCRL_D2_BACKEND is the command line's to report
        return
    from detectron2.utils import comm as d2

    g = globals()
    for name in ("get_world_size", "get_rank", "get_local_rank", "get_local_size", "is_main_process",
                 "synchronize", "all_gather", "create_local_process_group"):
        g[name] = getattr(d2, name)
    # Detectron2's all_gather / gather (ours above, its evaluators') exchange over its own
    # gloo side group, made without a timeout (torch's 30 minutes): make it ours, which is
    # the same group (gloo beside NCCL, else WORLD) created with the run's --dist-timeout.
    if hasattr(d2, "_get_global_gloo_group"):
        d2._get_global_gloo_group = _cpu_group


_use_detectron2_comm()
