"""Generated cluttered scenes for the small-scale transfer study (``tools/transfer.py --study``).

Each scene holds several objects of six shape classes (varied counts, scales from a few
pixels to a third of the image, random colours, aspect ratios and rotations, partial
occlusion) over a textured background with clutter strokes that belong to no class: object-
level and localisation-sensitive features matter, as in ImageNet -> COCO. One scene set
(a row of ``SCENE_SETS``) writes, from disjoint seeds:

- ``pretrain/``: unlabelled images (the pretraining data; no label is used);
- ``cls_{train,val}/<class>/``: scenes labelled by their largest visible object's class
  (linear probe and k-NN);
- ``det_{train,val}/`` + ``annotations/det_{train,val}.json``: COCO-format boxes of every
  annotated object (the box and area of its *visible* pixels, as COCO's), the detection split.

Written once per set, atomically (:func:`generate_once`).
"""
import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..utils.fs import generate_once
from . import catalog
from .render import background

__all__ = ["SCENE_CLASSES", "SceneSet", "SCENE_SETS", "scene_root", "ensure_scene_set", "render_scene",
           "scene_polygon"]

SCENE_CLASSES = ("disc", "square", "triangle", "cross", "star", "hexagon")
_VERSION = "1"


@dataclass(frozen=True)
class SceneSet:
    """Split sizes (images) and seeds of one scene set; the generator settings are shared."""

    pretrain: Tuple[int, int]
    cls_train: Tuple[int, int]
    cls_val: Tuple[int, int]
    det_train: Tuple[int, int]
    det_val: Tuple[int, int]

    def splits(self) -> Dict[str, Tuple[int, int]]:
        return {"pretrain": self.pretrain, "cls_train": self.cls_train, "cls_val": self.cls_val,
                "det_train": self.det_train, "det_val": self.det_val}


# (images, seed) per split; every seed differs, so no image is in two splits.
SCENE_SETS: Dict[str, SceneSet] = {
    "small": SceneSet(pretrain=(2048, 101), cls_train=(1024, 102), cls_val=(512, 103), det_train=(300, 104),
                      det_val=(400, 105)),
    "smoke": SceneSet(pretrain=(64, 201), cls_train=(48, 202), cls_val=(24, 203), det_train=(16, 204),
                      det_val=(12, 205)),
}

# generator settings (shared by every set and split)
IMAGE_W, IMAGE_H = (160, 225), (128, 193)  # integer ranges [lo, hi)
OBJECTS = (2, 8)  # objects per scene, [lo, hi)
RADIUS = (0.04, 0.4)  # object radius / min(w, h), log-uniform: small objects are common
MIN_VISIBLE = 0.5  # an object more hidden than this by later ones is not placed
CLUTTER = (3, 11)  # unannotated strokes and arcs per scene, [lo, hi)


def scene_root(name: str) -> str:
    return os.path.join(catalog.get_datasets_root(), f"scrl_scenes_{name}")


def scene_polygon(kind: str, cx: float, cy: float, rx: float, ry: float, angle: float) -> List[Tuple[float, float]]:
    """The outline of a shape of class ``kind``, scaled by (rx, ry) and rotated by ``angle``."""
    if kind == "disc":
        pts = [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 28, endpoint=False)]
    elif kind == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif kind == "triangle":
        pts = [(0, -1), (1, 1), (-1, 1)]
    elif kind == "cross":
        t = 1 / 3
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t),
               (-t, -t)]
    elif kind == "star":
        pts = [((1 if k % 2 == 0 else 0.45) * math.sin(k * math.pi / 5), -(1 if k % 2 == 0 else 0.45)
                * math.cos(k * math.pi / 5)) for k in range(10)]
    elif kind == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(6) * math.pi / 3]
    else:
        raise ValueError(f"unknown shape {kind!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + rx * x * c - ry * y * s, cy + rx * x * s + ry * y * c) for x, y in pts]


def _mask(poly, w: int, h: int) -> np.ndarray:
    m = Image.new("L", (w, h), 0)
    ImageDraw.Draw(m).polygon(poly, fill=1)
    return np.asarray(m, dtype=bool)


def render_scene(rng: np.random.Generator) -> Tuple[Image.Image, List[Dict]]:
    """One scene and its objects: ``{"label", "box" (x0, y0, x1, y1 of the visible pixels,
    exclusive ends), "area" (visible pixels), "mask" (visible, bool HxW)}``, in drawing order."""
    w, h = int(rng.integers(*IMAGE_W)), int(rng.integers(*IMAGE_H))
    img = background(rng, h, w)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(*CLUTTER))):  # clutter: strokes and arcs of no class, under the objects
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        x0, y0 = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        if rng.random() < 0.5:
            draw.line([(x0, y0), (x0 + float(rng.normal(0, 30)), y0 + float(rng.normal(0, 30)))], fill=color,
                      width=int(rng.integers(1, 4)))
        else:
            r = float(rng.uniform(6, 30))
            start = float(rng.uniform(0, 360))
            draw.arc([x0 - r, y0 - r, x0 + r, y0 + r], start, start + float(rng.uniform(40, 200)), fill=color,
                     width=int(rng.integers(1, 3)))
    objects: List[Dict] = []
    lo, hi = math.log(RADIUS[0]), math.log(RADIUS[1])
    for _ in range(int(rng.integers(*OBJECTS))):
        for _try in range(15):
            r = math.exp(rng.uniform(lo, hi)) * min(w, h)
            aspect = float(rng.uniform(0.75, 1.33))
            rx, ry = r * math.sqrt(aspect), r / math.sqrt(aspect)
            cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))
            label = int(rng.integers(len(SCENE_CLASSES)))
            poly = scene_polygon(SCENE_CLASSES[label], cx, cy, rx, ry, float(rng.uniform(-0.4, 0.4)))
            full = _mask(poly, w, h)
            xs, ys = [q[0] for q in poly], [q[1] for q in poly]
            area = 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))
            if full.sum() < 0.6 * area:  # mostly outside the image
                continue
            if all((o["mask"] & ~full).sum() >= MIN_VISIBLE * o["full_area"] for o in objects):
                break
        else:
            continue
        for o in objects:
            o["mask"] = o["mask"] & ~full
        hue_rgb = tuple(int(c) for c in rng.integers(0, 256, size=3))
        outline = tuple(max(0, c - 70) for c in hue_rgb)
        draw.polygon(poly, fill=hue_rgb, outline=outline)
        objects.append({"label": label, "mask": full, "full_area": int(full.sum())})
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.2, 0.7))))
    for o in objects:
        ys, xs = np.nonzero(o["mask"])
        o["box"] = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        o["area"] = int(o["mask"].sum())
        del o["full_area"]
    return img, objects


def scene_label(objects: List[Dict]) -> int:
    """A scene's class: its largest visible object's."""
    return max(objects, key=lambda o: o["area"])["label"]


def _write_split(tmp: str, split: str, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder = os.path.join(tmp, split)
    os.makedirs(folder)
    if split.startswith("cls_"):
        for c in SCENE_CLASSES:
            os.makedirs(os.path.join(folder, c))
    images, anns = [], []
    for i in range(count):
        img, objects = render_scene(rng)
        name = f"{i:05d}.jpg"
        if split.startswith("cls_"):
            img.save(os.path.join(folder, SCENE_CLASSES[scene_label(objects)], name), quality=90)
            continue
        img.save(os.path.join(folder, name), quality=90)
        if split.startswith("det_"):
            images.append({"id": i + 1, "file_name": name, "width": img.width, "height": img.height})
            for o in objects:
                x0, y0, x1, y1 = o["box"]
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": o["label"] + 1,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": o["area"], "iscrowd": 0})
    if split.startswith("det_"):
        cats = [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(SCENE_CLASSES)]
        os.makedirs(os.path.join(tmp, "annotations"), exist_ok=True)
        with open(os.path.join(tmp, "annotations", f"{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": cats}, f)


def ensure_scene_set(name: str, root: str = "") -> str:
    """Generate scene set ``name`` once (atomically: a finished folder or none)."""
    spec = SCENE_SETS[name]

    def fill(tmp: str) -> None:
        for split, (count, seed) in spec.splits().items():
            _write_split(tmp, split, count, seed)

    return generate_once(root or scene_root(name), _VERSION, fill)
