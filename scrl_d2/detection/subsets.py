"""COCO train2017 with 1% / 10% of the labels: fixed image lists, so every user trains on
the same images.

Subset ``(pct, seed)`` is the first ``round(N * pct / 100)`` entries of a seeded
permutation of the N images, sorted by image id (for train2017, N = 118,287: 1,183 and
11,829 images). The 1% subset of a seed lies inside its 10% subset. For train2017 the
lists are shipped (``coco_train2017_subsets.json``: indices into the image ids sorted
ascending, as Detectron2's ``load_coco_json`` orders them), so they do not depend on
NumPy's generator; any other dataset (the miniature ones) uses the same generator.
"""
import functools
import json
import os
from typing import List

import numpy as np

from ..utils.errors import InputValueError

__all__ = ["SUBSETS", "SEEDS", "COCO_TRAIN2017_IMAGES", "subset_size", "subset_indices", "permutation"]

SUBSETS = (1, 10)  # percent of the images
SEEDS = (1, 2, 3, 4, 5)
COCO_TRAIN2017_IMAGES = 118287
SHIPPED = os.path.join(os.path.dirname(__file__), "coco_train2017_subsets.json")


def subset_size(num_images: int, pct: int) -> int:
    return max(1, int(round(num_images * pct / 100)))


def permutation(num_images: int, seed: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(seed)).permutation(num_images)


@functools.lru_cache(maxsize=None)
def _shipped() -> dict:
    with open(SHIPPED) as f:
        return json.load(f)


def subset_indices(num_images: int, pct: int, seed: int) -> List[int]:
    """Indices (into the image ids sorted ascending) of subset ``(pct, seed)``."""
    if pct not in SUBSETS or seed not in SEEDS:
        raise InputValueError(f"COCO subset {pct}% seed {seed}: available {list(SUBSETS)}% x seeds {list(SEEDS)}")
    k = subset_size(num_images, pct)
    if num_images == COCO_TRAIN2017_IMAGES:
        order = _shipped()["seeds"][str(seed)]
    else:
        order = permutation(num_images, seed)[:k].tolist()
    return sorted(order[:k])
