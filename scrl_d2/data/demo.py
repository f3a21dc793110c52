"""The built-in demo data: small generated photographs of shapes on textures.

Deterministic (fixed seeds), natural-looking enough to learn from (coloured objects
over smooth textured backgrounds, varied sizes and aspect ratios), and labelled by the
kind of scene (object shape and hue band, texture orientation), so a linear probe has
something to find.
Written once as JPEG files under ``<datasets root>/scrl_demo/{train,val}/<class>/`` so
the demo exercises the real file-reading path.
"""
import colorsys
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..utils.fs import generate_once
from . import catalog
from .render import SHAPES, background, draw_shape, photo_like

__all__ = ["DEMO_CLASSES", "DEMO_SPLITS", "demo_root", "ensure_demo_images", "render_demo_image",
           "write_synthetic_jpegs"]

DEMO_CLASSES = SHAPES  # a demo class is the shape of its scene's objects
DEMO_SPLITS = {"train": (512, 1), "val": (128, 2)}  # images, seed
_VERSION = "3"


def demo_root() -> str:
    return os.path.join(catalog.get_datasets_root(), "scrl_demo")


def render_demo_image(rng: np.random.Generator) -> "tuple[Image.Image, int]":
    """One image and its label. A class is a kind of scene: its objects' shape and the
    orientation of its background's texture (with random colours, sizes, positions)."""
    w, h = int(rng.integers(96, 176)), int(rng.integers(96, 160))
    label = int(rng.integers(len(DEMO_CLASSES)))
    angle = (label + rng.uniform(-0.2, 0.2)) * np.pi / len(DEMO_CLASSES) % np.pi
    img = background(rng, h, w, angle)
    draw = ImageDraw.Draw(img)
    n = int(rng.integers(1, 4))
    radii = sorted(rng.uniform(0.12, 0.3, size=n) * min(w, h), reverse=True)
    for i in reversed(range(n)):
        kind = DEMO_CLASSES[label]
        r = radii[i]
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        # each class has its own band of hues (and shape, and texture orientation)
        hue = (label / len(DEMO_CLASSES) + rng.uniform(0.0, 0.12)) % 1.0
        color = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)))
        outline = tuple(max(0, c - 60) for c in color)
        draw_shape(draw, kind, cx, cy, r, color, outline)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 0.8))))
    return img, label


def ensure_demo_images(root: str = "") -> str:
    """Generate the demo images once (atomically: a finished folder or nothing)."""
    def fill(tmp: str) -> None:
        for split, (count, seed) in DEMO_SPLITS.items():
            rng = np.random.default_rng(seed)
            for c in DEMO_CLASSES:
                os.makedirs(os.path.join(tmp, split, c), exist_ok=True)
            for i in range(count):
                img, label = render_demo_image(rng)
                img.save(os.path.join(tmp, split, DEMO_CLASSES[label], f"{i:05d}.jpg"), quality=90)

    return generate_once(root or demo_root(), _VERSION, fill)


def _write_jpeg_chunk(args) -> None:
    folder, start, stop, size, seed, quality = args
    rng = np.random.default_rng([seed, start])
    for i in range(start, stop):
        photo_like(rng, *size).save(os.path.join(folder, f"{i:06d}.jpg"), quality=quality)


def write_synthetic_jpegs(root: str, count: int, size=(500, 375), seed: int = 0, quality: int = 90) -> str:
    """A folder of ``count`` photograph-like JPEGs of ``size`` (default: an average
    ImageNet image) for throughput measurements (:func:`~scrl_d2.data.render.photo_like`:
    about 100 KB each at 500x375, as ImageNet's), so decode costs resemble real photographs'.
    Written once, atomically, by all cores (the same files whatever their number)."""
    from concurrent.futures import ProcessPoolExecutor

    def fill(tmp: str) -> None:
        chunks = [(tmp, s, min(s + 256, count), size, seed, quality) for s in range(0, count, 256)]
        workers = min(len(chunks), os.cpu_count() or 1)
        if workers <= 1:
            for c in chunks:
                _write_jpeg_chunk(c)
            return
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_jpeg_chunk, chunks))

    return generate_once(root, f"jpeg3-{size[0]}x{size[1]}-{seed}-{quality}", fill)
