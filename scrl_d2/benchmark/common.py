"""What every benchmark shares: the machine, the settings a row reports, device
synchronisation, view geometries and a synthetic batch as the loader delivers it."""
import os
import platform

import numpy as np
import torch

from ..data.augment import random_resized_crop_params
from ..data.boxes import BoxPairGenerator
from ..engine.step import amp_dtype

__all__ = ["machine", "bench_device", "sync", "settings", "release_geometries", "synthetic_batch"]


def machine() -> str:
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} / {cpu}"
    return f"CPU only ({cpu}, {torch.get_num_threads()} torch threads)"


def bench_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def settings(cfg, **extra) -> dict:
    """The settings a row reports (``extra`` appended)."""
    return {"arch": cfg.MODEL.META_ARCHITECTURE, "depth": cfg.MODEL.RESNETS.DEPTH, "batch": cfg.SOLVER.IMS_PER_GPU,
            "input": cfg.INPUT.CROP_SIZE, "amp": str(amp_dtype(cfg, bench_device())).replace("torch.", ""),
            "channels_last": cfg.MODEL.CHANNELS_LAST, "compile": cfg.MODEL.COMPILE.ENABLED,
            "workers": cfg.DATALOADER.NUM_WORKERS, "augment_device": cfg.INPUT.AUGMENT_DEVICE, **extra}


def release_geometries(n: int, cfg, seed: int = 0, size=(500, 375)):
    """View pairs as the data path draws them: RandomResizedCrop of a 500x375 image."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(2 * n):
        t, left, h, w = random_resized_crop_params(size[0], size[1], cfg.INPUT.CROP_SCALE, cfg.INPUT.CROP_RATIO, g)
        rows.append([t, left, h, w, float(torch.rand((), generator=g) < 0.5)])
    a = np.array(rows, dtype=np.float64)
    return a[:n], a[n:]


def synthetic_batch(cfg, device: torch.device, seed: int = 0) -> dict:
    """A batch as the loader delivers it (uint8 views, box pairs, pair indices), on the device."""
    batch = cfg.SOLVER.IMS_PER_GPU
    S = cfg.INPUT.CROP_SIZE
    g = torch.Generator().manual_seed(seed)
    g1, g2 = release_geometries(batch, cfg, seed)
    b1, b2, valid = BoxPairGenerator.from_config(cfg)(g1, g2, np.random.default_rng(seed))
    data = {"view1": torch.randint(0, 255, (batch, 3, S, S), dtype=torch.uint8, generator=g),
            "view2": torch.randint(0, 255, (batch, 3, S, S), dtype=torch.uint8, generator=g),
            "boxes1": torch.from_numpy(b1), "boxes2": torch.from_numpy(b2), "box_valid": torch.from_numpy(valid),
            "label": torch.zeros(batch, dtype=torch.long),
            "pair_index": torch.from_numpy(np.flatnonzero(valid.reshape(-1)))}
    return {k: v.to(device) for k, v in data.items()}
