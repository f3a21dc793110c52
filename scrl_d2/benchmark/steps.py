"""The optimisation step alone, on batches already on the device: its throughput
(``model``) and each speed option against the plain path (``parity``)."""
import statistics
import time
from typing import Dict, List, Optional

import torch

from ..engine.step import amp_dtype, build_forward, build_grad_scaler, optimization_step
from ..modeling import build_model
from ..modeling.audit import pooling_check
from ..solver import build_optimizer
from .common import bench_device, settings, sync, synthetic_batch

__all__ = ["run_steps", "bench_model", "PARITY_VARIANTS", "default_parity_variants", "bench_parity"]


def run_steps(cfg, batches, warmup: int = 0, state: Optional[Dict[str, torch.Tensor]] = None):
    """The trainer's optimisation step (forward, backward, LARS, EMA) on ready batches,
    synchronised per step: per-step seconds after ``warmup``, losses and the peak
    memory. ``state``: start from these weights."""
    device = bench_device()
    torch.manual_seed(0)
    model = build_model(cfg).to(device)  # no classes given: no probe (it costs ~nothing anyway)
    if state is not None:
        model.load_state_dict(state)
    if cfg.MODEL.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    forward = build_forward(cfg, model)
    opt = build_optimizer(cfg, model)
    dtype = amp_dtype(cfg, device)
    scaler = build_grad_scaler(dtype, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i, data in enumerate(batches):
        sync()
        t = time.perf_counter()
        out = optimization_step(forward, model, opt, scaler, data, dtype, device, momentum=0.99)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
        losses.append(float(sum(v.detach() for k, v in out.items() if k.startswith("loss"))))
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    return times, losses, peak


def bench_model(cfg, iters: int, warmup: int) -> List[dict]:
    """Images/s and the median step of :func:`run_steps` on one synthetic batch."""
    data = synthetic_batch(cfg, bench_device())
    times, _, peak = run_steps(cfg, [data] * (warmup + iters), warmup)
    step = statistics.median(times)
    row = {"mode": "model", "settings": settings(cfg), "img_per_s": cfg.SOLVER.IMS_PER_GPU / step,
           "step_ms_median": step * 1e3}
    if peak is not None:
        row["peak_mem_gib"] = peak
    return [row]


# name: (config overrides over the plain path, relative loss tolerance)
PARITY_VARIANTS = {
    "channels_last": (["MODEL.CHANNELS_LAST", "True"], 1e-3),
    "bf16": (["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "bfloat16"], 5e-2),
    "fp16": (["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "float16"], 5e-2),
    "bf16+channels_last": (["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "bfloat16",
                            "MODEL.CHANNELS_LAST", "True"], 5e-2),
    "bf16+channels_last+compile": (["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", "bfloat16",
                                    "MODEL.CHANNELS_LAST", "True", "MODEL.COMPILE.ENABLED", "True"], 5e-2),
}


def default_parity_variants() -> List[str]:
    """All of :data:`PARITY_VARIANTS`; without a GPU all but fp16 and compile."""
    return [v for v in PARITY_VARIANTS
            if torch.cuda.is_available() or v in ("channels_last", "bf16", "bf16+channels_last")]


def bench_parity(cfg, steps: int, variants) -> List[dict]:
    """Each speed option against the plain path (fp32, NCHW, eager) from the same weights
    on the same batches: the per-step losses must agree within the option's tolerance,
    and every box must be pooled from its image and rectangle at the option's dtype and
    memory format (:func:`scrl_d2.modeling.audit.pooling_check`)."""
    device = bench_device()
    plain = cfg.clone()
    plain.merge_from_list(["SOLVER.AMP.ENABLED", "False", "MODEL.CHANNELS_LAST", "False",
                           "MODEL.COMPILE.ENABLED", "False"])
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in build_model(plain).state_dict().items()}
    batches = [synthetic_batch(cfg, device, seed=s) for s in range(steps)]

    def pooling(c) -> dict:
        return pooling_check(c, batches[0], state, amp_dtype(c, device), device).as_dict()

    _, ref, _ = run_steps(plain, batches, state=state)
    rows = [{"mode": "parity", "settings": {"variant": "plain", **settings(plain)}, "losses": ref, "max_rel_diff": 0.0,
             "pooling": pooling(plain)}]
    for name in variants:
        opts, tol = PARITY_VARIANTS[name]
        c = plain.clone()
        c.merge_from_list(opts)
        _, got, _ = run_steps(c, batches, state=state)
        diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got, ref))
        rows.append({"mode": "parity", "settings": {"variant": name, **settings(c)}, "losses": got,
                     "max_rel_diff": diff, "tolerance": tol, "same_loss": diff <= tol,
                     "pooling": pooling(c)})
    return rows
