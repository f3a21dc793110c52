"""SyncBN as the release uses it: global statistics across processes, also on CPU (gloo)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from scrl_d2.engine.launch import find_free_port
from scrl_d2.modeling.layers import SyncBatchNorm, cpu_capable_sync_bn, get_norm, get_norm1d

SIZES = (5, 3)  # rows per process: SCRL's heads see a different number of box pairs on each


def _inputs(dim: int):
    g = torch.Generator().manual_seed(0)
    shape = (sum(SIZES), 6) + ((4, 3) if dim == 4 else ())
    x = torch.randn(shape, generator=g) * 3 + 1
    w = torch.randn(shape, generator=g)  # loss = sum(y * w): a different gradient per element
    return x, w


def _worker(rank: int, port: int, dim: int, dtype, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    bn = SyncBatchNorm(6, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2, 6))
        bn.bias.copy_(torch.linspace(-1, 1, 6))
    x, w = _inputs(dim)
    lo = sum(SIZES[:rank])
    xs = x[lo:lo + SIZES[rank]].clone().to(dtype).requires_grad_(True)
    y = bn(xs)
    (y.float() * w[lo:lo + SIZES[rank]]).sum().backward()
    torch.save({"y": y.detach().float(), "grad": xs.grad.float(), "weight_grad": bn.weight.grad,
                "running_mean": bn.running_mean, "running_var": bn.running_var}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("dim,dtype", [(2, torch.float32), (4, torch.float32), (4, torch.bfloat16)])
def test_two_cpu_processes_normalise_with_the_global_batch(tmp_path, dim, dtype):
    out = str(tmp_path / "res")
    mp.start_processes(_worker, args=(find_free_port(), dim, dtype, out), nprocs=2, start_method="spawn")
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]

    # the reference: one process, plain BatchNorm on the concatenated batch
    ref = nn.BatchNorm1d(6, momentum=0.3) if dim == 2 else nn.BatchNorm2d(6, momentum=0.3)
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 2, 6))
        ref.bias.copy_(torch.linspace(-1, 1, 6))
    x, w = _inputs(dim)
    x = x.to(dtype).float().requires_grad_(True)
    y = ref(x)
    (y * w).sum().backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), **tol)
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), x.grad, **tol)
    # DDP averages parameter gradients; the per-process ones sum to the full batch's
    torch.testing.assert_close(ranks[0]["weight_grad"] + ranks[1]["weight_grad"], ref.weight.grad, **tol)
    for r in ranks:  # the same (global) running statistics on every process
        torch.testing.assert_close(r["running_mean"], ref.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["running_var"], ref.running_var, atol=1e-5, rtol=1e-5)
    assert torch.equal(ranks[0]["running_var"], ranks[1]["running_var"])


def test_single_process_and_eval_mode_behave_as_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 3, 3)
    sync, plain = SyncBatchNorm(4), nn.BatchNorm2d(4)
    torch.testing.assert_close(sync(x), plain(x))
    sync.eval(), plain.eval()
    torch.testing.assert_close(sync(x), plain(x))
    assert list(sync.state_dict()) == list(plain.state_dict())  # checkpoints do not change


def test_syncbn_names_build_the_cpu_capable_module():
    assert type(get_norm("SyncBN", 8)) is SyncBatchNorm
    head = get_norm1d("SyncBN", 8)
    assert isinstance(head, SyncBatchNorm) and head(torch.randn(4, 8)).shape == (4, 8)
    net = nn.Sequential(nn.SyncBatchNorm(3), nn.BatchNorm2d(3))  # e.g. from Detectron2's builders
    cpu_capable_sync_bn(net)
    assert type(net[0]) is SyncBatchNorm and type(net[1]) is nn.BatchNorm2d
    assert isinstance(net[0], nn.SyncBatchNorm)  # still what "SyncBN" means to Detectron2 and torch


@pytest.mark.skipif(not os.environ.get("SCRL_D2_BACKEND", "auto") in ("auto", "detectron2"), reason="backend forced")
def test_detectron2_syncbn_is_made_cpu_capable():
    from scrl_d2.backend import detectron2_available

    if not detectron2_available():
        pytest.skip("Detectron2 is not installed")
    from conftest import tiny_cfg
    from scrl_d2.modeling import build_model

    cfg = tiny_cfg("unused")
    cfg.MODEL.RESNETS.NORM, cfg.MODEL.BYOL.HEAD_NORM = "SyncBN", "SyncBN"
    model = build_model(cfg)
    syncs = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert syncs and all(isinstance(m, SyncBatchNorm) for m in syncs)
    assert "detectron2" in type(model.backbone).__module__
