"""Robust image reading, the two-view pretraining dataset and its seeded sampler."""
import logging
import warnings
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from iopath.common.file_io import g_pathmgr
from PIL import Image, ImageFile

from .augment import TwoViewAugmentation
from .boxes import BoxPairGenerator

__all__ = ["ImageReadError", "read_image", "sample_seed", "PretrainDataset", "EvalDataset", "SeededSampler"]

logger = logging.getLogger("scrl_d2.data")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is skipped, not half-read
# Huge images are legitimate photographs here, not decompression bombs.
Image.MAX_IMAGE_PIXELS = None


class ImageReadError(OSError):
    """An image that cannot be decoded; the dataset skips and counts it."""


def read_image(path: str) -> Image.Image:
    """Decode ``path`` to an RGB PIL image, converting grayscale, 16-bit, CMYK,
    palette and alpha images; raises :class:`ImageReadError` naming the file."""
    try:
        with g_pathmgr.open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. palette-with-transparency notices
            img = Image.open(f)
            img.load()
    except Exception as e:  # PIL raises several types for bad data
        raise ImageReadError(f"cannot read image {path}: {e}") from e
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))  # transparent -> white
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation, fixed by (run seed, epoch, index)."""
    return int(np.random.SeedSequence([base_seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class _RobustReader:
    """Reads ``dicts[i]``; on a bad file warns (once per file and worker), counts it and
    reads another image drawn from the sample's own seed, so batches keep their size."""

    max_substitutes = 32

    def __init__(self, dicts: List[dict]) -> None:
        if not dicts:
            raise ValueError("the dataset is empty")
        self.dicts = dicts
        self._warned = set()

    def read(self, index: int, rng: np.random.Generator) -> Tuple[Image.Image, dict, int]:
        bad = []
        for _ in range(self.max_substitutes):
            d = self.dicts[index]
            try:
                return read_image(d["file_name"]), d, len(bad)
            except ImageReadError as e:
                bad.append(d["file_name"])
                if d["file_name"] not in self._warned:
                    self._warned.add(d["file_name"])
                    logger.warning(f"skipping unreadable image: {e}")
                index = int(rng.integers(len(self.dicts)))
        raise RuntimeError(f"{len(bad)} images in a row could not be read, e.g. {bad[:3]}; "
                           "is the dataset path right?")


class PretrainDataset(torch.utils.data.Dataset):
    """Two augmented views of an image, their geometry and (SCRL) box pairs.

    Indexed by ``(index, seed)`` pairs from :class:`SeededSampler`. A sample is a dict:
    ``view1``, ``view2`` (uint8 ``[3, S, S]``), ``geom1``, ``geom2`` (``[5]``),
    ``label`` (-1 when unlabelled), ``skipped`` (unreadable files replaced) and, when a
    box generator is given, ``boxes1``, ``boxes2`` (``[K, 4]``) and ``box_valid`` (``[K]``).
    """

    def __init__(self, dicts: List[dict], augmentation: TwoViewAugmentation,
                 box_generator: Optional[BoxPairGenerator] = None, require_overlap: bool = False,
                 max_crop_tries: int = 10) -> None:
        self.reader = _RobustReader(dicts)
        self.augmentation = augmentation
        self.box_generator = box_generator
        self.require_overlap = require_overlap and box_generator is not None
        self.max_crop_tries = max_crop_tries

    def __len__(self) -> int:
        return len(self.reader.dicts)

    def __getitem__(self, key: Tuple[int, int]) -> dict:
        index, seed = key
        g = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        img, d, skipped = self.reader.read(index, rng)
        aug1, aug2 = self.augmentation.views
        crop1 = aug1.crop_params(img, g)
        crop2 = aug2.crop_params(img, g)
        if self.require_overlap:
            for _ in range(self.max_crop_tries):
                if self.box_generator.views_overlap((*crop1, 0), (*crop2, 0)):
                    break
                crop2 = aug2.crop_params(img, g)
        v1, geom1 = aug1(img, g, crop=crop1)
        v2, geom2 = aug2(img, g, crop=crop2)
        out = {
            "view1": v1, "view2": v2,
            "geom1": torch.tensor(geom1, dtype=torch.float64),
            "geom2": torch.tensor(geom2, dtype=torch.float64),
            "label": d.get("label", -1), "skipped": skipped,
        }
        if self.box_generator is not None:
            b1, b2, valid = self.box_generator(np.array([geom1]), np.array([geom2]), rng)
            out.update(boxes1=torch.from_numpy(b1[0]), boxes2=torch.from_numpy(b2[0]),
                       box_valid=torch.from_numpy(valid[0]))
        return out


class EvalDataset(torch.utils.data.Dataset):
    """Deterministic evaluation view: resize (short side) then centre crop, uint8."""

    def __init__(self, dicts: List[dict], crop_size: int, resize_size: int, interpolation: str = "bicubic"):
        import torchvision.transforms.functional as F
        from torchvision.transforms import InterpolationMode

        self.reader = _RobustReader(dicts)
        self._F, self._interp = F, InterpolationMode(interpolation)
        self.crop_size, self.resize_size = crop_size, resize_size

    def __len__(self) -> int:
        return len(self.reader.dicts)

    def __getitem__(self, index: int) -> dict:
        F = self._F
        img, d, skipped = self.reader.read(index, np.random.default_rng(index))
        img = F.center_crop(F.resize(img, self.resize_size, self._interp), self.crop_size)
        return {"image": F.pil_to_tensor(img), "label": d.get("label", -1), "skipped": skipped}


class SeededSampler(torch.utils.data.Sampler):
    """Per-epoch shuffling shared by all processes, each taking its own shard, that
    yields ``(index, seed)`` so each sample's augmentation is fixed by the run seed,
    the epoch and the index: a resumed run sees exactly the data it would have seen.

    Incomplete global batches are dropped (every process runs the same step count).
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch = 0
        self.start_batch = 0
        self.iters_per_epoch = size // (batch_size * world_size)
        if self.iters_per_epoch == 0:
            raise ValueError(
                f"the dataset has {size} images, fewer than one global batch "
                f"({batch_size} per process x {world_size} processes); lower SOLVER.IMS_PER_GPU"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate ``epoch`` from its ``start_batch``-th batch (mid-epoch resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.iters_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1 & 0xFFFFFFFF))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        n = self.iters_per_epoch * self.batch_size * self.world_size
        for i in order[:n][self.rank::self.world_size][self.start_batch * self.batch_size:]:
            yield i, sample_seed(self.seed, self.epoch, i)

