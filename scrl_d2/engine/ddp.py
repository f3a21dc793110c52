"""DistributedDataParallel as scrl_d2 uses it (Detectron2's ``create_ddp_model`` role)."""
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..modeling.layers import SyncBatchNorm
from ..utils import comm

__all__ = ["create_ddp_model"]


class _DistributedDataParallel(DistributedDataParallel):
    """DDP that keeps SyncBatchNorm layers on CPU processes. torch refuses any SyncBatchNorm
    in a CPU module because its kernels are GPU-only; scrl_d2's ``SyncBatchNorm``
    synchronises CPU processes itself (over gloo), so only torch's own class is refused."""

    def _passing_sync_batchnorm_handle(self, module: nn.Module) -> None:
        if self.device_type == "cpu" and all(isinstance(m, SyncBatchNorm) for m in module.modules()
                                             if isinstance(m, nn.SyncBatchNorm)):
            return
        super()._passing_sync_batchnorm_handle(module)


def create_ddp_model(model: nn.Module, device: torch.device, **kwargs) -> nn.Module:
    """``model`` wrapped in DDP when several processes run, else ``model`` itself.
    ``broadcast_buffers`` defaults to False, as in the release and Detectron2's trainer:
    SyncBN's running statistics are already global, and per-process BN keeps its own."""
    if comm.get_world_size() == 1:
        return model
    kwargs.setdefault("broadcast_buffers", False)
    return _DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **kwargs)
