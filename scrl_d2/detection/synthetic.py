"""The built-in detection data: generated images of shapes with boxes and polygon masks,
in COCO format (``annotations.json`` beside the images), so the fine-tuning and COCO
evaluation pipeline runs anywhere. Objects do not overlap, so each polygon is exactly
its object's visible mask."""
import json
import math
import os
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..data import catalog
from ..data.demo import DEMO_CLASSES, _background, generate_once

__all__ = ["SYNTHETIC_SPLITS", "synthetic_root", "ensure_synthetic_detection", "shape_polygon"]

SYNTHETIC_SPLITS = {"train": (96, 11), "val": (32, 12)}  # images, seed
_VERSION = "1"


def synthetic_root() -> str:
    return os.path.join(catalog.get_datasets_root(), "scrl_demo_det")


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


def _render(rng: np.random.Generator, image_id: int, ann_start: int) -> Tuple[Image.Image, Dict, List[Dict]]:
    w, h = int(rng.integers(160, 225)), int(rng.integers(128, 193))
    img = _background(rng, h, w)
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
        label = int(rng.integers(len(DEMO_CLASSES)))
        poly = shape_polygon(DEMO_CLASSES[label], cx, cy, r)
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


def ensure_synthetic_detection(root: str = "") -> str:
    """Generate ``{train,val}/`` images and ``annotations/{train,val}.json`` once (atomically)."""
    def fill(tmp: str) -> None:
        os.makedirs(os.path.join(tmp, "annotations"))
        cats = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(DEMO_CLASSES)]
        for split, (count, seed) in SYNTHETIC_SPLITS.items():
            rng = np.random.default_rng(seed)
            os.makedirs(os.path.join(tmp, split))
            images, annotations = [], []
            for i in range(count):
                img, info, anns = _render(rng, i + 1, len(annotations) + 1)
                info["file_name"] = f"{i:05d}.jpg"
                img.save(os.path.join(tmp, split, info["file_name"]), quality=92)
                images.append(info)
                annotations.extend(anns)
            with open(os.path.join(tmp, "annotations", f"{split}.json"), "w") as f:
                json.dump({"images": images, "annotations": annotations, "categories": cats}, f)

    return generate_once(root or synthetic_root(), _VERSION, fill)
