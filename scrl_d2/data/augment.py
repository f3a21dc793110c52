"""The BYOL two-view augmentation, with each view's geometry recorded.

Each view records ``(top, left, height, width, flipped)``: its crop rectangle in the
decoded image's pixels and whether it was mirrored, which is all the box-pair
generator needs. Every random draw comes from an explicit ``torch.Generator`` so a
sample is a pure function of its seed (exact resume, worker-count independence).
Image operations are torchvision's functional ops on PIL images.
"""
import math
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

__all__ = ["ViewAugmentation", "TwoViewAugmentation", "random_resized_crop_params"]

Geometry = Tuple[float, float, float, float, float]


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


@dataclass
class ViewAugmentation:
    """One view's recipe (crop, flip, colour jitter, grayscale, blur, solarize)."""

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
            raise ValueError(
                f"INPUT.INTERPOLATION: unknown interpolation {self.interpolation!r}; "
                f"choose one of {[m.value for m in InterpolationMode]}"
            ) from e
        if self.blur_type not in ("resize", "gaussian"):
            raise ValueError(f"INPUT.BLUR_TYPE: {self.blur_type!r} is not 'resize' or 'gaussian'")

    def crop_params(self, img: Image.Image, g: torch.Generator) -> Tuple[int, int, int, int]:
        return random_resized_crop_params(img.width, img.height, self.scale, self.ratio, g)

    def __call__(self, img: Image.Image, g: torch.Generator, crop=None) -> Tuple[torch.Tensor, Geometry]:
        """Returns a ``uint8 [3, size, size]`` view and its geometry."""
        top, left, h, w = crop if crop is not None else self.crop_params(img, g)
        out = F.resized_crop(img, top, left, h, w, [self.size, self.size], self._interp)
        flipped = _bernoulli(g, self.flip_prob)
        if flipped:
            out = F.hflip(out)
        if _bernoulli(g, self.color_jitter_prob):
            out = self._jitter(out, g)
        if _bernoulli(g, self.grayscale_prob):
            out = F.rgb_to_grayscale(out, num_output_channels=3)
        if _bernoulli(g, self.blur_prob):
            out = self._blur(out, g)
        if _bernoulli(g, self.solarize_prob):
            out = F.solarize(out, self.solarize_threshold)
        return F.pil_to_tensor(out), (float(top), float(left), float(h), float(w), float(flipped))

    def _jitter(self, img: Image.Image, g: torch.Generator) -> Image.Image:
        b, c, s, hue = self.color_jitter
        ops = [
            (lambda x, f: F.adjust_brightness(x, f), (max(0.0, 1 - b), 1 + b), b),
            (lambda x, f: F.adjust_contrast(x, f), (max(0.0, 1 - c), 1 + c), c),
            (lambda x, f: F.adjust_saturation(x, f), (max(0.0, 1 - s), 1 + s), s),
            (lambda x, f: F.adjust_hue(x, f), (-hue, hue), hue),
        ]
        for i in torch.randperm(4, generator=g).tolist():  # random order, as torchvision's
            fn, (lo, hi), strength = ops[i]
            if strength > 0:
                img = fn(img, _uniform(g, lo, hi))
        return img

    def _blur(self, img: Image.Image, g: torch.Generator) -> Image.Image:
        if self.blur_type == "resize":
            # The release's cheap blur: bicubic down-scale by a random factor, then back.
            f = self.resize_blur_factors[int(torch.randint(len(self.resize_blur_factors), (), generator=g))]
            w, h = img.size
            small = F.resize(img, [max(1, int(h // f)), max(1, int(w // f))], self._interp)
            return F.resize(small, [h, w], self._interp)
        radius = int(self.gaussian_kernel_fraction * self.size) // 2
        sigma = _uniform(g, *self.gaussian_sigma)
        return F.gaussian_blur(img, [2 * radius + 1] * 2, [sigma, sigma]) if radius > 0 else img


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
                raise ValueError(f"INPUT.{key} must hold two values (view 1, view 2), got {i[key]}")
        return cls([
            ViewAugmentation(blur_prob=i.BLUR_PROB[v], solarize_prob=i.SOLARIZE_PROB[v], **common)
            for v in (0, 1)
        ])
