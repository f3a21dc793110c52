"""The built-in detection data: generated images of shapes with boxes and polygon masks,
in COCO format (``annotations.json`` beside the images), so the fine-tuning and COCO
evaluation pipeline runs anywhere. Objects do not overlap, so each polygon is exactly
its object's visible mask."""
import json
import os

import numpy as np

from ..data import catalog
from ..data.demo import DEMO_CLASSES
from ..data.render import render_shapes_scene
from ..utils.fs import generate_once

__all__ = ["SYNTHETIC_SPLITS", "synthetic_root", "ensure_synthetic_detection"]

SYNTHETIC_SPLITS = {"train": (96, 11), "val": (32, 12)}  # images, seed
_VERSION = "1"


def synthetic_root() -> str:
    return os.path.join(catalog.get_datasets_root(), "scrl_demo_det")


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
                img, info, anns = render_shapes_scene(rng, i + 1, len(annotations) + 1)
                info["file_name"] = f"{i:05d}.jpg"
                img.save(os.path.join(tmp, split, info["file_name"]), quality=92)
                images.append(info)
                annotations.extend(anns)
            with open(os.path.join(tmp, "annotations", f"{split}.json"), "w") as f:
                json.dump({"images": images, "annotations": annotations, "categories": cats}, f)

    return generate_once(root or synthetic_root(), _VERSION, fill)
