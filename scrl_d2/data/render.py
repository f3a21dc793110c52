"""The shared renderer of generated images: textured backgrounds and the four shapes.

The demo images (:mod:`.demo`), the built-in detection data
(:mod:`scrl_d2.detection.synthetic`) and the miniature benchmark datasets
(:mod:`scrl_d2.transfer.miniature`) draw their backgrounds and shapes with these
functions; the study's scenes (:mod:`.scenes`) draw their backgrounds with it and their own
rotated, stretched outlines (:func:`scrl_d2.data.scenes.scene_polygon`). Every function draws from the ``rng``
it is given, in a fixed order: the same seed gives the same pixels.
"""
import math
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["SHAPES", "background", "draw_shape", "shape_polygon", "render_shapes_scene", "photo_like"]

SHAPES = ("disc", "square", "triangle", "cross")


def background(rng: np.random.Generator, h: int, w: int, angle: float = -1.0) -> Image.Image:
    """A muted, smooth, striped texture (``angle`` < 0: a random stripe orientation)."""
    coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
    bg = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    arr = np.asarray(bg, dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    freq = rng.uniform(0.05, 0.3)
    angle = angle if angle >= 0 else rng.uniform(0, np.pi)
    stripes = np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)))[..., None]
    arr = 0.5 * arr + 0.5 * arr.mean(axis=2, keepdims=True)  # muted backgrounds, colourful objects
    arr = arr * 0.8 + 25 * stripes + rng.normal(0, 6, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, color, outline) -> None:
    if kind == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color, outline=outline, width=2)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color, outline=outline, width=2)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color, outline=outline)
    else:
        t = r / 3
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=color)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=color)


def shape_polygon(kind: str, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    if kind == "disc":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
    if kind == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    t = r / 3  # cross
    return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx + t, cy + t),
            (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]


def render_shapes_scene(rng: np.random.Generator, image_id: int, ann_start: int) -> Tuple[Image.Image, Dict, List[Dict]]:
    """1-4 non-overlapping shapes on a texture, with COCO annotations (category ``k + 1`` =
    ``SHAPES[k]``; each polygon is its object's exact visible mask)."""
    w, h = int(rng.integers(160, 225)), int(rng.integers(128, 193))
    img = background(rng, h, w)
    draw = ImageDraw.Draw(img)
    anns, placed = [], []
    for _ in range(int(rng.integers(1, 5))):
        for _try in range(20):
            r = float(rng.uniform(0.08, 0.22) * min(w, h))
            cx, cy = float(rng.uniform(r + 1, w - r - 1)), float(rng.uniform(r + 1, h - r - 1))
            if all(math.hypot(cx - x, cy - y) > (r + q) * 1.45 for x, y, q in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        label = int(rng.integers(len(SHAPES)))
        poly = shape_polygon(SHAPES[label], cx, cy, r)
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.polygon(poly, fill=color)
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
        flat = [float(round(v, 2)) for p in poly for v in p]
        area = 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))
        anns.append({"id": ann_start + len(anns), "image_id": image_id, "category_id": label + 1,
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area, "iscrowd": 0, "segmentation": [flat]})
    img = img.filter(ImageFilter.GaussianBlur(radius=0.4))
    return img, {"id": image_id, "width": w, "height": h}, anns


def photo_like(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """An image with a photograph's statistics, for throughput measurements: a 1/f^a
    spectrum (natural images' power law) in luminance and, smoother, in chroma, a few
    sharp-edged objects, a slight blur and sensor noise. At 500x375 and JPEG quality 90 the
    files average about 100 KB, as ImageNet's: decode costs resemble real photographs'."""

    def field(alpha: float) -> np.ndarray:
        fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
        f = np.sqrt(fx ** 2 + fy ** 2)
        f[0, 0] = 1.0
        spec = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** alpha
        spec[0, 0] = 0
        x = np.fft.irfft2(spec, s=(h, w))
        return x / (x.std() + 1e-8)

    lum = field(rng.uniform(0.65, 0.9))
    chroma = np.stack([field(rng.uniform(1.2, 1.6)) for _ in range(2)], -1)
    arr = (rng.uniform(60, 190, size=3)[None, None, :] + 44 * lum[..., None]
           + np.einsum("hwk,ck->hwc", chroma, rng.normal(size=(3, 2)) * 12))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        r = rng.uniform(0.05, 0.3) * min(w, h)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for a in rng.uniform(0, 2 * math.pi, 5)],
                         fill=color)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.6)))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 3.5, size=(h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
