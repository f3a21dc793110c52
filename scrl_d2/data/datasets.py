"""Robust image reading, the two-view pretraining dataset and its seeded sampler."""
import functools
import io
import logging
import math
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from iopath.common.file_io import g_pathmgr
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import default_collate

from ..utils.errors import InputValueError
from .augment import TwoViewAugmentation
from .boxes import BoxPairGenerator

__all__ = ["ImageReadError", "read_image", "read_encoded", "sample_seed", "PretrainDataset", "PretrainCollate",
           "EvalDataset", "SeededSampler"]

logger = logging.getLogger("scrl_d2.data")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is skipped, not half-read
# Huge images are legitimate photographs here, not decompression bombs.
Image.MAX_IMAGE_PIXELS = None
_EXIF_ORIENTATION = 0x0112


class ImageReadError(OSError):
    """An image that cannot be decoded; the dataset skips and counts it."""


def read_image(path: str, draft: Optional[Callable[[int, int], Optional[Tuple[int, int]]]] = None,
               exif_transpose: bool = False) -> Image.Image:
    """Decode ``path`` to an RGB PIL image, converting grayscale, 16-bit, CMYK,
    palette and alpha images; raises :class:`ImageReadError` naming the file.

    ``draft(width, height)``, called with the image's size before decoding, may return
    a smaller size that is enough: a JPEG is then decoded at 1/2, 1/4 or 1/8 scale
    (libjpeg's DCT scaling, far cheaper than decoding and resizing).
    ``exif_transpose``: turn the image as its EXIF orientation says (what Detectron2's
    ``read_image`` does); off, the stored pixels as they are (the release, via PIL)."""
    try:
        with g_pathmgr.open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. palette-with-transparency notices
            img = Image.open(f)
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1) if exif_transpose else 1
            turned = orientation in (5, 6, 7, 8)  # width and height swap
            if draft is not None:
                w, h = img.size
                target = draft(h, w) if turned else draft(w, h)
                if target is not None and img.format == "JPEG":
                    img.draft("RGB", target[::-1] if turned else target)
            img.load()
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
    except Exception as e:  # PIL raises several types for bad data
        raise ImageReadError(f"cannot read image {path}: {e}") from e
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
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


def read_encoded(path: str) -> Tuple[torch.Tensor, Tuple[int, int], bool]:
    """The file's bytes (uint8), its ``(width, height)`` from the header and whether it
    is a baseline RGB JPEG the GPU can decode; other files come back decoded
    (``uint8 [3, H, W]``). Raises :class:`ImageReadError` naming the file."""
    try:
        with g_pathmgr.open(path, "rb") as f:
            data = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            size = img.size
            if img.format == "JPEG" and img.mode == "RGB":
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), size, True
            img.load()
    except Exception as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from e
    return TF.pil_to_tensor(to_rgb(img)), size, False


def _hwc(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image's pixels as a ``uint8 [H, W, 3]`` tensor (one copy; read only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # numpy's view of PIL's buffer is not writable: never written
        return torch.from_numpy(np.asarray(img))


def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation, fixed by (run seed, epoch, index)."""
    return int(np.random.SeedSequence([base_seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class _RobustReader:
    """Reads ``dicts[i]``; on a bad file warns (once per file and worker), counts it and
    reads another image drawn from the sample's own seed, so batches keep their size."""

    max_substitutes = 32

    def __init__(self, dicts: List[dict], exif_transpose: bool = False) -> None:
        if not dicts:
            raise InputValueError("the dataset is empty")
        self.dicts = dicts
        self.exif_transpose = exif_transpose
        self._warned = set()

    def read(self, index: int, rng: np.random.Generator, fn: Optional[Callable] = None):
        """``(fn(file_name), record, number of files skipped)``; ``fn`` defaults to
        :func:`read_image` (with this reader's ``exif_transpose``)."""
        fn = fn or functools.partial(read_image, exif_transpose=self.exif_transpose)
        bad = []
        for _ in range(self.max_substitutes):
            d = self.dicts[index]
            try:
                return fn(d["file_name"]), d, len(bad)
            except ImageReadError as e:
                bad.append(d["file_name"])
                if d["file_name"] not in self._warned:
                    self._warned.add(d["file_name"])
                    logger.warning(f"skipping unreadable image: {e}")
                index = int(rng.integers(len(self.dicts)))
        raise RuntimeError(f"{len(bad)} images in a row could not be read, e.g. {bad[:3]}; "
                           "is the dataset path right?")


class PretrainDataset(torch.utils.data.Dataset):
    """Two augmented views of an image and their geometry; box pairs are drawn per
    batch by :class:`PretrainCollate`.

    Indexed by ``(index, seed)`` pairs from :class:`SeededSampler`. A sample is a dict:
    ``view1``, ``view2`` (uint8 ``[3, S, S]``), ``geom1``, ``geom2`` (``[5]``),
    ``label`` (-1 when unlabelled), ``skipped`` (unreadable files replaced) and
    ``seed``. With ``decode_on_device`` the views are not rendered: the sample holds
    the encoded file (``data``, ``is_jpeg``, ``file_name``) and each view's parameters (``params1``,
    ``params2``) for :class:`~scrl_d2.data.gpu_augment.BatchedAugmentation`. With
    ``photometric_on_device`` the views are cropped, resized and flipped here and carry
    their parameters: the device applies the colour operations (INPUT.AUGMENT_DEVICE split).
    ``jpeg_draft``: decode a JPEG at the smallest 1/2^k scale that still gives both
    crops at least the output resolution.
    """

    def __init__(self, dicts: List[dict], augmentation: TwoViewAugmentation,
                 box_generator: Optional[BoxPairGenerator] = None, require_overlap: bool = False,
                 max_crop_tries: int = 10, jpeg_draft: bool = True, decode_on_device: bool = False,
                 exif_transpose: bool = False, photometric_on_device: bool = False) -> None:
        if exif_transpose and decode_on_device:
            raise InputValueError("INPUT.EXIF_TRANSPOSE True is not available with INPUT.AUGMENT_DEVICE device (the "
                                  "device decodes the stored orientation); use INPUT.AUGMENT_DEVICE cpu or split")
        self.reader = _RobustReader(dicts, exif_transpose)
        self.augmentation = augmentation
        self.box_generator = box_generator
        self.require_overlap = require_overlap and box_generator is not None
        self.max_crop_tries = max_crop_tries
        self.jpeg_draft = jpeg_draft
        self.decode_on_device = decode_on_device
        self.photometric_on_device = photometric_on_device and not decode_on_device

    def __len__(self) -> int:
        return len(self.reader.dicts)

    def _crops(self, width: int, height: int, g: torch.Generator):
        aug1, aug2 = self.augmentation.views
        crop1 = aug1.crop_params(width, height, g)
        crop2 = aug2.crop_params(width, height, g)
        if self.require_overlap:
            for _ in range(self.max_crop_tries):
                if self.box_generator.views_overlap((*crop1, 0), (*crop2, 0)):
                    break
                crop2 = aug2.crop_params(width, height, g)
        return crop1, crop2

    def __getitem__(self, key: Tuple[int, int]) -> dict:
        index, seed = key
        g = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        aug1, aug2 = self.augmentation.views
        out = {"seed": seed}
        if self.decode_on_device:
            (data, size, is_jpeg), d, skipped = self.reader.read(index, rng, read_encoded)
            crop1, crop2 = self._crops(*size, g)
            out.update(data=data, is_jpeg=is_jpeg, file_name=d["file_name"])  # named if the device cannot decode it
        else:
            crops, stored = [], []

            def plan(width: int, height: int):  # crops are drawn from the stored size
                crops[:], stored[:] = self._crops(width, height, g), (width, height)
                return self._draft_size(width, height, crops) if self.jpeg_draft else None

            img, d, skipped = self.reader.read(index, rng,
                                               lambda path: read_image(path, plan, self.reader.exif_transpose))
            crop1, crop2 = crops
        p1, p2 = aug1.sample(crop1, g), aug2.sample(crop2, g)
        if not self.decode_on_device:
            scale = (stored[0] / img.width, stored[1] / img.height)  # > 1 after a draft decode
            if self.photometric_on_device:
                hwc = _hwc(img)
                out.update(view1=aug1.apply_geometry(img, hwc, p1, scale),
                           view2=aug2.apply_geometry(img, hwc, p2, scale))
            else:
                out.update(view1=aug1.apply(img, p1, scale), view2=aug2.apply(img, p2, scale))
        if self.decode_on_device or self.photometric_on_device:
            out.update(params1=p1, params2=p2)
        out.update(geom1=p1[:5].clone(), geom2=p2[:5].clone(), label=d.get("label", -1), skipped=skipped)
        return out

    def _draft_size(self, width: int, height: int, crops) -> Optional[Tuple[int, int]]:
        S = self.augmentation.views[0].size
        smallest = min(min(h, w) for _, _, h, w in crops)
        r = 1
        while r < 8 and smallest / (2 * r) >= S:
            r *= 2
        return (math.ceil(width / r), math.ceil(height / r)) if r > 1 else None


class PretrainCollate:
    """Stacks a batch and draws its box pairs in one vectorised call, in the loader's
    worker: the training thread gets ready boxes and the indices of the valid pairs
    (``pair_index``, computed here so the model never waits on a device->host read).

    The batch's generator is seeded by its samples' seeds: a batch, and so a resumed
    run, is reproducible whatever the number of workers."""

    def __init__(self, box_generator: Optional[BoxPairGenerator] = None) -> None:
        self.box_generator = box_generator

    def __call__(self, samples: List[dict]) -> Dict[str, torch.Tensor]:
        ragged = {k: [s.pop(k) for s in samples] for k in ("data", "is_jpeg", "file_name") if k in samples[0]}
        batch = default_collate(samples)
        if ragged:
            batch["data"] = ragged["data"]  # encoded files differ in length: a list
            batch["is_jpeg"] = torch.tensor(ragged["is_jpeg"])
            batch["file_name"] = ragged["file_name"]
        if self.box_generator is not None:
            rng = np.random.default_rng([int(s) for s in batch["seed"]])
            b1, b2, valid = self.box_generator(batch["geom1"].numpy(), batch["geom2"].numpy(), rng)
            batch.update(boxes1=torch.from_numpy(b1), boxes2=torch.from_numpy(b2),
                         box_valid=torch.from_numpy(valid),
                         pair_index=torch.from_numpy(np.flatnonzero(valid.reshape(-1))))
        return batch


class EvalDataset(torch.utils.data.Dataset):
    """Deterministic evaluation view: resize (short side) then centre crop, uint8."""

    def __init__(self, dicts: List[dict], crop_size: int, resize_size: int, interpolation: str = "bicubic",
                 exif_transpose: bool = False):
        from torchvision.transforms import InterpolationMode

        self.reader = _RobustReader(dicts, exif_transpose)
        # Plain attributes only: loader workers of spawned processes pickle the dataset.
        self._interp = InterpolationMode(interpolation)
        self.crop_size, self.resize_size = crop_size, resize_size

    def __len__(self) -> int:
        return len(self.reader.dicts)

    def __getitem__(self, index: int) -> dict:
        img, d, skipped = self.reader.read(index, np.random.default_rng(index))
        img = TF.center_crop(TF.resize(img, self.resize_size, self._interp), self.crop_size)
        return {"image": TF.pil_to_tensor(img), "label": d.get("label", -1), "skipped": skipped}


class SeededSampler(torch.utils.data.Sampler):
    """Per-epoch shuffling shared by all processes, each taking its own shard, that
    yields ``(index, seed)`` so each sample's augmentation is fixed by the run seed,
    the epoch and the index: a resumed run sees exactly the data it would have seen.

    Incomplete global batches are dropped (every process runs the same step count).
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        if seed < 0:
            raise ValueError(f"SeededSampler: seed must be >= 0, got {seed} (a negative SEED is replaced by a "
                             "random one in default_setup; set SEED when building a trainer by hand)")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch = 0
        self.start_batch = 0
        self.iters_per_epoch = size // (batch_size * world_size)
        if self.iters_per_epoch == 0:
            raise InputValueError(
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

