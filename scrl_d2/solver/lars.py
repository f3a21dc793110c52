"""LARS (You et al.) over SGD with momentum, as BYOL and the SCRL release use it."""
from typing import Iterable, List

import torch
from torch.optim import Optimizer

__all__ = ["LARS"]


class LARS(Optimizer):
    """SGD with momentum whose per-tensor step is scaled by the trust ratio
    ``trust_coef * ||w|| / (||g|| + wd * ||w|| + eps)`` (1 where either norm is 0).

    A param group with ``lars_exclude=True`` (BYOL: normalisation parameters and
    biases) takes plain SGD steps without adaptation or weight decay. Weight decay is
    added to the gradient before the trust ratio, as in the release (torchlars).
    Uses the ``torch._foreach_*`` kernels: one launch per op for all tensors.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coef: float = 0.001, eps: float = 1e-8, nesterov: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum} or weight_decay={weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coef=trust_coef,
                        eps=eps, nesterov=nesterov, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: List[torch.Tensor] = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["lars_exclude"]:
                d_p = [g.clone() for g in grads]
            else:
                wd = group["weight_decay"]
                d_p = torch._foreach_add(grads, params, alpha=wd) if wd else [g.clone() for g in grads]
                w_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                ratio = group["trust_coef"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                torch._foreach_mul_(d_p, list(ratio.to(d_p[0].dtype).unbind(0)))
            momentum = group["momentum"]
            if momentum:
                bufs = []
                for p, d in zip(params, d_p):
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d.clone()
                        bufs.append(None)
                    else:
                        bufs.append(state["momentum_buffer"])
                old = [(b, d) for b, d in zip(bufs, d_p) if b is not None]
                if old:
                    torch._foreach_mul_([b for b, _ in old], momentum)
                    torch._foreach_add_([b for b, _ in old], [d for _, d in old])
                bufs = [self.state[p]["momentum_buffer"] for p in params]
                if group["nesterov"]:
                    torch._foreach_add_(d_p, bufs, alpha=momentum)
                else:
                    d_p = bufs
            torch._foreach_add_(params, d_p, alpha=-group["lr"])
        return loss
