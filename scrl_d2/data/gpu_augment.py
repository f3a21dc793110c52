"""The two-view augmentation rendered on the training device, a batch at a time
(INPUT.AUGMENT_DEVICE ``device``: decode and every operation; ``split``: the colour
operations of views the workers cropped, resized and flipped).

When CPU cores cannot decode and augment fast enough to feed the GPU, the loader
workers only read the files and draw every random parameter (crops, flips, jitter
order and factors, grayscale, blur, solarize: :meth:`ViewAugmentation.sample`, the
same draws as the CPU path), and draw the box pairs. Here the batch is decoded with
nvJPEG (``torchvision.io.decode_jpeg`` on the device) and rendered with per-sample
parameters: crop + resize + flip in one ``roi_align`` (exact crop rectangle, area
averaging when shrinking), then each photometric op on the rows that drew it. Host
decisions (which rows get which op) are read from the CPU parameter tensors, so
nothing waits on the device.
"""
import io
import logging
import warnings
from typing import Dict, List

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align
from torchvision.transforms import _functional_tensor as TFT

from .augment import (
    JITTER_IDENTITY,
    P_BLUR,
    P_FACTORS,
    P_FLIP,
    P_GRAY,
    P_JITTER,
    P_ORDER,
    P_SOLARIZE,
    TwoViewAugmentation,
    ViewAugmentation,
)
from .datasets import to_rgb

__all__ = ["BatchedAugmentation"]

logger = logging.getLogger("scrl_d2.data")


def _decode_jpeg(data, device):
    with warnings.catch_warnings():  # torchvision 0.29 points to torchcodec; nvJPEG here is what we want
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma with PIL's weights (``convert("L")``, as the CPU path renders it)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _quantize(x: torch.Tensor) -> torch.Tensor:
    """Back to 8-bit levels after each op, as the PIL path is."""
    return x.mul(255.0).round_().clamp_(0.0, 255.0).div_(255.0)


def _brightness(x, f):
    return x * f


def _contrast(x, f):
    return f * x + (1 - f) * _gray(x).mean(dim=(1, 2, 3), keepdim=True)


def _saturation(x, f):
    return f * x + (1 - f) * _gray(x)


def _hue(x, f):
    hsv = TFT._rgb2hsv(x.clamp(0.0, 1.0))
    h = torch.remainder(hsv[:, 0:1] + f, 1.0)
    return TFT._hsv2rgb(torch.cat([h, hsv[:, 1:]], dim=1))


_OPS = (_brightness, _contrast, _saturation, _hue)


class BatchedAugmentation:
    """Decodes and renders a batch from :class:`PretrainDataset` built with
    ``decode_on_device=True``; adds ``view1``, ``view2`` (uint8 on ``device``)."""

    def __init__(self, augmentation: TwoViewAugmentation, device: torch.device, chunk: int = 64):
        self.views: List[ViewAugmentation] = augmentation.views
        self.device = torch.device(device)
        self.chunk = chunk  # images padded together (a 64 x 3 x 500 x 500 float32 chunk is 190 MB)

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> "BatchedAugmentation":
        return cls(TwoViewAugmentation.from_config(cfg), device)

    # ------------------------------------------------------------------ decode
    def decode(self, batch: Dict) -> List[torch.Tensor]:
        """``uint8 [3, H, W]`` per sample, on the device. A file nvJPEG rejects is
        decoded by PIL; one nothing can decode takes another sample's place (its
        parameters and boxes too) and is counted in ``batch["skipped"]``."""
        data, is_jpeg, names = batch["data"], batch["is_jpeg"].tolist(), batch["file_name"]
        images: List = [None] * len(data)
        jpeg = [i for i, j in enumerate(is_jpeg) if j]
        if jpeg:
            try:
                out = _decode_jpeg([data[i] for i in jpeg], self.device)
                for i, img in zip(jpeg, out):
                    images[i] = img
            except RuntimeError:
                for i in jpeg:
                    images[i] = self._decode_one(data[i], names[i])
        for i, j in enumerate(is_jpeg):
            if not j:
                images[i] = data[i].to(self.device, non_blocking=True)
        bad = [i for i, img in enumerate(images) if img is None]
        if bad:
            good = [i for i, img in enumerate(images) if img is not None]
            if not good:
                raise RuntimeError(f"no image of the batch could be decoded, e.g. {names[:3]}")
            for n, i in enumerate(bad):
                self._replace(batch, i, good[n % len(good)])
                images[i] = images[good[n % len(good)]]
        return images

    def _decode_one(self, data: torch.Tensor, name: str):
        try:
            return _decode_jpeg(data, self.device)
        except RuntimeError:
            pass
        try:
            img = Image.open(io.BytesIO(data.numpy().tobytes()))
            img.load()
        except Exception as e:
            logger.warning(f"skipping {name}: neither nvJPEG nor PIL can decode it ({e})")
            return None
        return TF.pil_to_tensor(to_rgb(img)).to(self.device)

    @staticmethod
    def _replace(batch: Dict, i: int, j: int) -> None:
        for k in ("params1", "params2", "geom1", "geom2", "boxes1", "boxes2", "box_valid", "label"):
            if k in batch:
                batch[k][i] = batch[k][j]
        if "box_valid" in batch:
            batch["pair_index"] = batch["box_valid"].reshape(-1).nonzero().squeeze(1)
        if "skipped" in batch:
            batch["skipped"][i] += 1

    # ------------------------------------------------------------------ render
    def __call__(self, batch: Dict) -> Dict:
        # float32 whatever the caller's autocast: crop rectangles (and the batch index of
        # each crop) must stay exact, and pixels must match the CPU path.
        with torch.autocast(self.device.type, enabled=False):
            return self._render(batch)

    def _render(self, batch: Dict) -> Dict:
        if "data" not in batch:  # INPUT.AUGMENT_DEVICE split: views cropped on the CPU, colours here
            return self._colours(batch)
        images = self.decode(batch)
        params = (batch["params1"], batch["params2"])
        views = ([], [])
        for s in range(0, len(images), self.chunk):
            chunk = self._pad(images[s:s + self.chunk])
            for v, p in enumerate(params):
                views[v].append(self._geometry(chunk, p[s:s + self.chunk], self.views[v].size))
        for v, p in enumerate(params):
            x = torch.cat(views[v]).float().div_(255.0)
            x = self._photometric(x, p, self.views[v])
            batch[f"view{v + 1}"] = x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
        for k in ("data", "is_jpeg", "file_name", "params1", "params2"):
            batch.pop(k, None)
        return batch

    def _colours(self, batch: Dict) -> Dict:
        """The photometric operations of each view's parameters on views that the workers
        cropped, resized and flipped (uint8 on the host, pinned by the loader)."""
        for v, p in enumerate((batch.pop("params1"), batch.pop("params2"))):
            x = batch[f"view{v + 1}"].to(self.device, non_blocking=True).float().div_(255.0)
            x = self._photometric(x, p, self.views[v])
            batch[f"view{v + 1}"] = x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
        return batch

    def _pad(self, images: List[torch.Tensor]) -> torch.Tensor:
        H = max(img.shape[1] for img in images)
        W = max(img.shape[2] for img in images)
        padded = torch.zeros((len(images), 3, H, W), dtype=torch.float32, device=self.device)
        for i, img in enumerate(images):
            padded[i, :, :img.shape[1], :img.shape[2]] = img
        return padded

    def _geometry(self, padded: torch.Tensor, p: torch.Tensor, size: int) -> torch.Tensor:
        """Crop rectangle -> ``size x size`` (area-averaged bilinear), then the flip.
        float32 throughout: crop coordinates must stay exact to a fraction of a pixel."""
        top, left, h, w = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
        rois = torch.stack([torch.arange(len(p), dtype=torch.float64), left, top, left + w, top + h], 1)
        # aligned=True: pixel i spans [i, i + 1], as PIL's resize box; sampling adapts to
        # ceil(crop / size) points per output pixel, an area average when shrinking.
        out = roi_align(padded, rois.to(self.device, torch.float32), (size, size), 1.0, -1, True)
        flip = p[:, P_FLIP] > 0.5
        if flip.any():
            idx = flip.nonzero().squeeze(1).to(self.device)
            out[idx] = out[idx].flip(-1)
        return out.clamp_(0.0, 255.0).round_()

    def _photometric(self, x: torch.Tensor, p: torch.Tensor, aug: ViewAugmentation) -> torch.Tensor:
        def rows(mask: torch.Tensor):
            return mask.nonzero().squeeze(1).to(self.device, non_blocking=True) if mask.any() else None

        def factor(values: torch.Tensor, idx_host: torch.Tensor) -> torch.Tensor:
            return values[idx_host].to(self.device, torch.float32).view(-1, 1, 1, 1)

        jitter = p[:, P_JITTER] > 0.5
        order = p[:, P_ORDER].long()
        factors = p[:, P_FACTORS]
        for pos in range(4):
            for op in range(4):
                mask = jitter & (order[:, pos] == op) & (factors[:, op] != JITTER_IDENTITY[op])
                if mask.any():
                    idx = rows(mask)
                    x[idx] = _quantize(_OPS[op](x[idx], factor(factors[:, op], mask)).clamp_(0.0, 1.0))
        gray = rows(p[:, P_GRAY] > 0.5)
        if gray is not None:
            x[gray] = _quantize(_gray(x[gray]).expand(-1, 3, -1, -1))
        blur = p[:, P_BLUR]
        if aug.blur_type == "resize":  # one group per down-scale factor
            for value in sorted(set(blur[blur > 0].tolist())):
                idx = rows(blur == value)
                x[idx] = _quantize(self._resize_blur(x[idx], value, aug).clamp_(0.0, 1.0))
        elif (blur > 0).any():  # one grouped convolution, a kernel per row
            idx = rows(blur > 0)
            sigma = factor(blur, blur > 0).view(-1)
            x[idx] = _quantize(self._gaussian_blur(x[idx], sigma, aug.blur_kernel_size()).clamp_(0.0, 1.0))
        sol = rows(p[:, P_SOLARIZE] > 0.5)
        if sol is not None:
            t = aug.solarize_threshold / 255.0
            x[sol] = torch.where(x[sol] >= t, 1.0 - x[sol], x[sol])
        return x

    @staticmethod
    def _resize_blur(x: torch.Tensor, value: float, aug: ViewAugmentation) -> torch.Tensor:
        """Down by ``value`` and back up (the release's cheap blur)."""
        S = x.shape[-1]
        mode = "bicubic" if aug.interpolation == "bicubic" else "bilinear"
        small = F.interpolate(x, size=(max(1, int(S // value)),) * 2, mode=mode, antialias=True, align_corners=False)
        return F.interpolate(small, size=(S, S), mode=mode, antialias=True, align_corners=False)

    @staticmethod
    def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
        """Separable Gaussian of size ``k`` with a sigma per row, reflect padding (as
        torchvision's ``gaussian_blur``)."""
        if k <= 1:
            return x
        S = x.shape[-1]
        r = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
        kern = torch.exp(-0.5 * (r[None] / sigma[:, None]) ** 2)
        kern = (kern / kern.sum(dim=1, keepdim=True)).repeat_interleave(3, dim=0)  # [3m, k]
        n = x.shape[0] * 3
        y = F.pad(x.reshape(1, n, S, S), (k // 2,) * 4, mode="reflect")
        y = F.conv2d(y, kern.view(n, 1, 1, k), groups=n)
        y = F.conv2d(y, kern.view(n, 1, k, 1), groups=n)
        return y.reshape(x.shape)
