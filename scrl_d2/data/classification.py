"""Single-view classification data for linear evaluation: RandomResizedCrop + flip for
training (seeded per sample, so a resumed run sees the same data), and the
deterministic resize + centre crop of :class:`EvalDataset` for evaluation."""
from typing import List, Tuple

import numpy as np
import torch
import torchvision.transforms.functional as F
from torchvision.transforms import InterpolationMode

from .augment import random_resized_crop_params
from .datasets import _RobustReader

__all__ = ["LinearTrainDataset"]


class LinearTrainDataset(torch.utils.data.Dataset):
    def __init__(self, dicts: List[dict], size: int, scale: Tuple[float, float], interpolation: str = "bicubic",
                 exif_transpose: bool = False):
        self.reader = _RobustReader(dicts, exif_transpose)
        self.size, self.scale, self.interp = size, tuple(scale), InterpolationMode(interpolation)

    def __len__(self) -> int:
        return len(self.reader.dicts)

    def __getitem__(self, key: Tuple[int, int]) -> dict:
        index, seed = key
        g = torch.Generator().manual_seed(seed)
        img, d, skipped = self.reader.read(index, np.random.default_rng(seed))
        top, left, h, w = random_resized_crop_params(img.width, img.height, self.scale, (3 / 4, 4 / 3), g)
        img = F.resized_crop(img, top, left, h, w, [self.size, self.size], self.interp)
        if torch.rand((), generator=g).item() < 0.5:
            img = F.hflip(img)
        return {"image": F.pil_to_tensor(img), "label": d.get("label", -1), "skipped": skipped}
