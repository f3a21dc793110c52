"""The BYOL two-view augmentation, with each view's geometry recorded.

Each view records ``(top, left, height, width, flipped)``: its crop rectangle in the
original image's pixels and whether it was mirrored, which is all the box-pair
generator needs. Every random draw comes from an explicit ``torch.Generator`` so a
sample is a pure function of its seed (exact resume, worker-count independence).
Image operations are torchvision's functional ops on PIL images.
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import pil_modes_mapping

from ..utils.errors import InputValueError

__all__ = ["ViewAugmentation", "TwoViewAugmentation", "random_resized_crop_params", "NUM_PARAMS",
           "JITTER_IDENTITY"]


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _bernoulli(g: torch.Generator, p: float) -> bool:
    return p > 0 and torch.rand((), generator=g).item() < p


def random_resized_crop_params(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float], g: torch.Generator
) -> Tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` algorithm, drawing from ``g``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(g, scale[0], scale[1])
        aspect = math.exp(_uniform(g, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (), generator=g))
            j = int(torch.randint(0, width - w + 1, (), generator=g))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# A view's random parameters, one float vector per view so that a batch of them is a
# plain tensor (the GPU path applies them batched). Indices:
P_TOP, P_LEFT, P_HEIGHT, P_WIDTH, P_FLIP = 0, 1, 2, 3, 4  # the geometry, original pixels
P_JITTER = 5  # colour jitter applied (0/1)
P_ORDER = slice(6, 10)  # jitter ops in application order: 0 brightness 1 contrast 2 saturation 3 hue
P_FACTORS = slice(10, 14)  # each op's factor, indexed by op (identity when the strength is 0)
P_GRAY, P_BLUR, P_SOLARIZE = 14, 15, 16  # grayscale (0/1); blur (0: none, else factor/sigma); solarize
NUM_PARAMS = 17
JITTER_IDENTITY = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation, hue: no change


def _box(p: torch.Tensor, scale: Tuple[float, float]) -> Tuple[float, float, float, float]:
    """A view's crop ``(left, top, right, bottom)`` in the pixels of an image decoded at
    ``scale`` original pixels per pixel (JPEG draft decoding)."""
    top, left, h, w = (float(v) for v in p[:4])
    sx, sy = scale
    return left / sx, top / sy, (left + w) / sx, (top + h) / sy


@dataclass
class ViewAugmentation:
    """One view's recipe (crop, flip, colour jitter, grayscale, blur, solarize).

    ``sample`` draws a view's parameters (all randomness); ``apply`` renders them on a
    PIL image on the CPU; :mod:`scrl_d2.data.gpu_augment` renders the same parameters
    for a whole batch on the GPU."""

    size: int = 224
    scale: Tuple[float, float] = (0.2, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: str = "bicubic"
    flip_prob: float = 0.5
    color_jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 1.0
    blur_type: str = "resize"
    resize_blur_factors: Tuple[float, ...] = (1.1, 1.2, 1.5)
    gaussian_kernel_fraction: float = 0.1
    gaussian_sigma: Tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0
    solarize_threshold: int = 128
    _interp: InterpolationMode = field(init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self._interp = InterpolationMode(self.interpolation.lower())
        except ValueError as e:
            raise InputValueError(
                f"INPUT.INTERPOLATION: unknown interpolation {self.interpolation!r}; "
                f"choose one of {[m.value for m in InterpolationMode]}"
            ) from e
        if self.blur_type not in ("resize", "gaussian"):
            raise InputValueError(f"INPUT.BLUR_TYPE: {self.blur_type!r} is not 'resize' or 'gaussian'")

    @property
    def pil_resample(self) -> int:
        return pil_modes_mapping[self._interp]

    def crop_params(self, width: int, height: int, g: torch.Generator) -> Tuple[int, int, int, int]:
        return random_resized_crop_params(width, height, self.scale, self.ratio, g)

    def sample(self, crop: Tuple[int, int, int, int], g: torch.Generator) -> torch.Tensor:
        """The view's parameter vector ``[NUM_PARAMS]`` for a drawn ``crop`` (built as a list:
        per-element tensor writes cost more than the draws themselves)."""
        p = [0.0] * NUM_PARAMS
        p[P_TOP], p[P_LEFT], p[P_HEIGHT], p[P_WIDTH] = (float(v) for v in crop)
        p[P_FLIP] = float(_bernoulli(g, self.flip_prob))
        p[P_ORDER] = [0.0, 1.0, 2.0, 3.0]
        factors = list(JITTER_IDENTITY)
        if _bernoulli(g, self.color_jitter_prob):
            p[P_JITTER] = 1.0
            order = torch.randperm(4, generator=g).tolist()  # random order, as torchvision's ColorJitter
            p[P_ORDER] = [float(i) for i in order]
            b, c, s, hue = self.color_jitter
            ranges = ((max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-hue, hue))
            for i in order:
                if (b, c, s, hue)[i] > 0:
                    factors[i] = _uniform(g, *ranges[i])
        p[P_FACTORS] = factors
        p[P_GRAY] = float(_bernoulli(g, self.grayscale_prob))
        if _bernoulli(g, self.blur_prob):
            if self.blur_type == "resize":
                values = self.resize_blur_factors
                p[P_BLUR] = float(values[int(torch.randint(len(values), (), generator=g))])
            else:
                p[P_BLUR] = _uniform(g, *self.gaussian_sigma)
        p[P_SOLARIZE] = float(_bernoulli(g, self.solarize_prob))
        return torch.tensor(p, dtype=torch.float64)

    def apply(self, img: Image.Image, p: torch.Tensor, scale: Tuple[float, float] = (1.0, 1.0),
              photometric: bool = True) -> torch.Tensor:
        """Render parameters ``p`` on ``img`` -> ``uint8 [3, size, size]``. ``scale``:
        original pixels per pixel of ``img`` (a JPEG decoded at reduced size).
        ``photometric`` False: the geometry only (crop, resize, flip), the rest replayed
        on the device from ``p`` (INPUT.AUGMENT_DEVICE split)."""
        out = img.resize((self.size, self.size), self.pil_resample, box=_box(p, scale))
        if p[P_FLIP] > 0.5:
            out = F.hflip(out)
        if photometric:
            out = self._photometric(out, p)
        return F.pil_to_tensor(out)

    def apply_geometry(self, img: Image.Image, hwc: Optional[torch.Tensor], p: torch.Tensor,
                       scale: Tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        """The view's crop, resize and flip only -> ``uint8 [3, size, size]`` (INPUT.AUGMENT_DEVICE
        split: the colour operations are replayed on the device). ``hwc``: ``img``'s pixels
        as a ``uint8 [H, W, 3]`` tensor, resized with torch's antialiased uint8 kernel (the
        same filter as PIL's, vectorised: ~0.03 grey levels apart on average, up to ~10 at the
        crop's borders, where PIL reads pixels beyond the box and torch stops at the crop, as
        the release's crop-then-resize does) when the crop falls on whole pixels and the
        interpolation is bilinear or bicubic; otherwise (e.g. most crops of a JPEG decoded at
        reduced size) PIL renders it, as :meth:`apply`."""
        box = _box(p, scale)
        mode = self.interpolation.lower()
        if hwc is None or mode not in ("bilinear", "bicubic") or any(b != int(b) for b in box):
            return self.apply(img, p, scale, photometric=False)
        x0, y0, x1, y1 = (int(b) for b in box)
        crop = hwc[y0:y1, x0:x1].permute(2, 0, 1).unsqueeze(0)  # channels innermost, as torch's uint8 kernel likes
        out = torch.nn.functional.interpolate(crop, size=(self.size, self.size), mode=mode,
                                              antialias=True, align_corners=False)[0]
        if p[P_FLIP] > 0.5:
            out = out.flip(-1)
        return out.contiguous()

    def _photometric(self, out: Image.Image, p: torch.Tensor) -> Image.Image:
        if p[P_JITTER] > 0.5:
            ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
            for i in p[P_ORDER].long().tolist():
                factor = float(p[P_FACTORS.start + i])
                if factor != JITTER_IDENTITY[i]:
                    out = ops[i](out, factor)
        if p[P_GRAY] > 0.5:
            out = F.rgb_to_grayscale(out, num_output_channels=3)
        if p[P_BLUR] > 0:
            out = self._blur(out, float(p[P_BLUR]))
        if p[P_SOLARIZE] > 0.5:
            out = F.solarize(out, self.solarize_threshold)
        return out

    def blur_kernel_size(self) -> int:
        return 2 * (int(self.gaussian_kernel_fraction * self.size) // 2) + 1

    def _blur(self, img: Image.Image, value: float) -> Image.Image:
        if self.blur_type == "resize":
            # The release's cheap blur: bicubic down-scale by a random factor, then back.
            w, h = img.size
            small = F.resize(img, [max(1, int(h // value)), max(1, int(w // value))], self._interp)
            return F.resize(small, [h, w], self._interp)
        k = self.blur_kernel_size()
        return F.gaussian_blur(img, [k, k], [value, value]) if k > 1 else img


@dataclass
class TwoViewAugmentation:
    """View 1 and view 2 of the BYOL recipe (they differ in blur and solarize)."""

    views: List[ViewAugmentation]

    @classmethod
    def from_config(cls, cfg) -> "TwoViewAugmentation":
        i = cfg.INPUT
        common = dict(
            size=i.CROP_SIZE, scale=tuple(i.CROP_SCALE), ratio=tuple(i.CROP_RATIO),
            interpolation=i.INTERPOLATION, flip_prob=i.FLIP_PROB,
            color_jitter=tuple(i.COLOR_JITTER), color_jitter_prob=i.COLOR_JITTER_PROB,
            grayscale_prob=i.GRAYSCALE_PROB, blur_type=i.BLUR_TYPE,
            resize_blur_factors=tuple(i.RESIZE_BLUR_FACTORS),
            gaussian_kernel_fraction=i.GAUSSIAN_BLUR_KERNEL_FRACTION,
            gaussian_sigma=tuple(i.GAUSSIAN_BLUR_SIGMA), solarize_threshold=i.SOLARIZE_THRESHOLD,
        )
        for key in ("BLUR_PROB", "SOLARIZE_PROB"):
            if len(i[key]) != 2:
                raise InputValueError(f"INPUT.{key} must hold two values (view 1, view 2), got {i[key]}")
        return cls([
            ViewAugmentation(blur_prob=i.BLUR_PROB[v], solarize_prob=i.SOLARIZE_PROB[v], **common)
            for v in (0, 1)
        ])
