"""Miniature datasets in each downstream benchmark's own on-disk format, under Detectron2's
layout and builtin names, so every transfer protocol runs on a CPU exactly as it runs on
the real data (only ``DATASETS.ROOT`` changes):

- ``coco/``: ``{train,val}2017/`` + ``annotations/instances_*2017.json`` and
  ``person_keypoints_*2017.json`` (17 COCO keypoints per object, mirror-consistent, so
  horizontal flips with COCO's flip map stay correct);
- ``VOC2007/``, ``VOC2012/``: ``JPEGImages``, ``Annotations/*.xml`` (1-based pixel
  corners, some ``difficult`` objects), ``ImageSets/Main/{trainval,test}.txt``;
- ``cityscapes/``: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and ``gtFine``'s
  ``*_polygons.json``, ``*_instanceIds.png``, ``*_labelIds.png`` (what Detectron2's loader
  and cityscapesscripts' evaluation read);
- ``lvis/lvis_v1_{train,val}.json`` over the ``coco/`` images (LVIS v1 category ids,
  frequencies, ``neg_category_ids`` / ``not_exhaustive_category_ids``).

The scenes are the built-in synthetic shapes (non-overlapping, so each polygon is its
object's exact visible mask); each format maps the four shapes to four of its classes.
"""
import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..utils.fs import generate_once
from ..utils.errors import InputValueError
from ..data.render import render_shapes_scene
from .voc import VOC_CLASSES

__all__ = ["FORMATS", "make_miniature", "COCO_PERSON_KEYPOINTS", "VOC_CLASSES"]

FORMATS = ("coco", "voc", "cityscapes", "lvis")
_VERSION = "2"
SPLITS = {"train": (24, 21), "val": (12, 22)}  # images, seed

COCO_PERSON_KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
                         "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
                         "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")
# shape index -> class of each format (shapes: disc, square, triangle, cross)
_VOC_OF_SHAPE = ("bird", "boat", "car", "person")
_CITYSCAPES_OF_SHAPE = (("person", 24), ("car", 26), ("truck", 27), ("bus", 28))
_LVIS_OF_SHAPE = ((1, "aerosol_can", "c"), (2, "air_conditioner", "f"), (3, "airplane", "f"), (4, "alarm_clock", "r"))


def _scenes(split: str) -> List[Tuple[Image.Image, Dict, List[Dict]]]:
    count, seed = SPLITS[split]
    rng = np.random.default_rng(seed)
    out, n_anns = [], 0
    for i in range(count):
        img, info, anns = render_shapes_scene(rng, i + 1, n_anns + 1)
        n_anns += len(anns)
        out.append((img, info, anns))
    return out


def _keypoints(ann: Dict) -> List[float]:
    """17 (x, y, v) triples inside the object's box; left_* and right_* are mirror images
    about the box centre (what a flip with COCO's flip map expects)."""
    x, y, w, h = ann["bbox"]
    cx, cy = x + w / 2, y + h / 2
    kps = []
    for k, name in enumerate(COCO_PERSON_KEYPOINTS):
        row = (k + 1) // 2  # pairs share a row
        dy = (row / 8.0 - 0.5) * 0.8 * h
        dx = 0.0 if name == "nose" else 0.3 * w * (1 + (row % 3)) / 3
        sign = -1 if name.startswith("left_") else 1
        kps += [round(cx + sign * dx, 2), round(cy + dy, 2), 2]
    return kps


def coco_categories() -> List[Dict]:
    """COCO's 80 thing categories with their real (gapped) ids, from torchvision's metadata."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    names = FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]  # index = COCO id
    return [{"id": i, "name": n, "supercategory": ""} for i, n in enumerate(names) if n not in ("__background__",
                                                                                                "N/A")]


_COCO_OF_SHAPE = ("sports ball", "tv", "kite", "clock")


def _write_coco(tmp: str, scenes: Dict[str, list]) -> None:
    cats = coco_categories()  # all 80, as the real json: configs keep NUM_CLASSES 80
    cat_id = {c["name"]: c["id"] for c in cats}
    person = {"id": 1, "name": "person", "supercategory": "person", "keypoints": list(COCO_PERSON_KEYPOINTS),
              "skeleton": [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8],
                           [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]}
    os.makedirs(os.path.join(tmp, "coco", "annotations"))
    for split, items in scenes.items():
        folder = os.path.join(tmp, "coco", f"{split}2017")
        os.makedirs(folder)
        images, anns, kp_anns = [], [], []
        for img, info, objs in items:
            info = dict(info, file_name=f"{info['id']:012d}.jpg")
            img.save(os.path.join(folder, info["file_name"]), quality=92)
            images.append(info)
            anns += [dict(a, category_id=cat_id[_COCO_OF_SHAPE[a["category_id"] - 1]]) for a in objs]
            kp_anns += [dict(a, category_id=1, keypoints=_keypoints(a), num_keypoints=17) for a in objs]
        for fname, data in ((f"instances_{split}2017.json", {"images": images, "annotations": anns,
                                                             "categories": cats}),
                            (f"person_keypoints_{split}2017.json", {"images": images, "annotations": kp_anns,
                                                                    "categories": [person]})):
            with open(os.path.join(tmp, "coco", "annotations", fname), "w") as f:
                json.dump(data, f)


def _voc_xml(info: Dict, objs: List[Dict], rng: np.random.Generator) -> str:
    parts = [f"<annotation><folder>VOC</folder><filename>{info['file_name']}</filename>",
             f"<size><width>{info['width']}</width><height>{info['height']}</height><depth>3</depth></size>"]
    for a in objs:
        x, y, w, h = a["bbox"]
        # VOC corners are 1-based inclusive pixel indices
        x0, y0 = int(round(x)) + 1, int(round(y)) + 1
        x1, y1 = int(round(x + w)), int(round(y + h))
        difficult = int(rng.random() < 0.15)
        parts.append(f"<object><name>{_VOC_OF_SHAPE[a['category_id'] - 1]}</name><pose>Unspecified</pose>"
                     f"<truncated>0</truncated><difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin>"
                     f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>\n"


def _write_voc(tmp: str, scenes: Dict[str, list]) -> None:
    rng = np.random.default_rng(7)
    # VOC2007: trainval = train scenes, test = val scenes; VOC2012: trainval = the train scenes
    # rendered again under other ids (its own images).
    layout = {"VOC2007": (("trainval", "train", "2007_"), ("test", "val", "2007t_")),
              "VOC2012": (("trainval", "train", "2012_"),)}
    for year, splits in layout.items():
        base = os.path.join(tmp, year)
        for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
            os.makedirs(os.path.join(base, sub), exist_ok=True)
        for split, source, prefix in splits:
            ids = []
            items = scenes[source] if year == "VOC2007" else scenes[source][::-1]
            for k, (img, info, objs) in enumerate(items):
                stem = f"{prefix}{k:06d}"
                ids.append(stem)
                info = dict(info, file_name=stem + ".jpg")
                out = img.transpose(Image.FLIP_LEFT_RIGHT) if year == "VOC2012" else img
                if year == "VOC2012":  # the mirrored scene: mirror the boxes too
                    objs = [dict(a, bbox=[info["width"] - a["bbox"][0] - a["bbox"][2]] + a["bbox"][1:]) for a in objs]
                out.save(os.path.join(base, "JPEGImages", stem + ".jpg"), quality=92)
                with open(os.path.join(base, "Annotations", stem + ".xml"), "w") as f:
                    f.write(_voc_xml(info, objs, rng))
            with open(os.path.join(base, "ImageSets", "Main", split + ".txt"), "w") as f:
                f.write("\n".join(ids) + "\n")


def _write_cityscapes(tmp: str, scenes: Dict[str, list]) -> None:
    for split, items in scenes.items():
        city = "minicity"
        img_dir = os.path.join(tmp, "cityscapes", "leftImg8bit", split, city)
        gt_dir = os.path.join(tmp, "cityscapes", "gtFine", split, city)
        os.makedirs(img_dir)
        os.makedirs(gt_dir)
        for k, (img, info, objs) in enumerate(items):
            stem = f"{city}_{k:06d}_000019"
            img.save(os.path.join(img_dir, stem + "_leftImg8bit.png"))
            w, h = info["width"], info["height"]
            label_ids = Image.new("I", (w, h), 7)  # 7 = road: every pixel has a (stuff) label
            instance_ids = Image.new("I", (w, h), 7)
            ld, idraw = ImageDraw.Draw(label_ids), ImageDraw.Draw(instance_ids)
            polygons = []
            for n, a in enumerate(objs):
                name, label_id = _CITYSCAPES_OF_SHAPE[a["category_id"] - 1]
                seg = a["segmentation"][0]
                poly = [(seg[i], seg[i + 1]) for i in range(0, len(seg), 2)]
                ld.polygon(poly, fill=label_id)
                idraw.polygon(poly, fill=label_id * 1000 + n)
                polygons.append({"label": name, "polygon": [[round(x, 2), round(y, 2)] for x, y in poly]})
            label_ids.convert("L").save(os.path.join(gt_dir, stem + "_gtFine_labelIds.png"))  # 8-bit, as Cityscapes
            Image.fromarray(np.asarray(instance_ids, dtype=np.uint16)).save(  # 16-bit
                os.path.join(gt_dir, stem + "_gtFine_instanceIds.png"))
            with open(os.path.join(gt_dir, stem + "_gtFine_polygons.json"), "w") as f:
                json.dump({"imgHeight": h, "imgWidth": w,
                           "objects": [{"label": "road", "polygon": [[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]}]
                           + polygons}, f)


def _write_lvis(tmp: str, scenes: Dict[str, list]) -> None:
    os.makedirs(os.path.join(tmp, "lvis"))
    cats = [{"id": cid, "name": name, "synonyms": [name], "def": name, "synset": f"{name}.n.01",
             "frequency": freq, "image_count": 0, "instance_count": 0} for cid, name, freq in _LVIS_OF_SHAPE]
    for split, items in scenes.items():
        images, anns = [], []
        for img, info, objs in items:
            present = sorted({_LVIS_OF_SHAPE[a["category_id"] - 1][0] for a in objs})
            absent = [c["id"] for c in cats if c["id"] not in present]
            images.append({"id": info["id"], "width": info["width"], "height": info["height"],
                           "coco_url": f"http://images.cocodataset.org/{split}2017/{info['id']:012d}.jpg",
                           "neg_category_ids": absent[:1], "not_exhaustive_category_ids": present[-1:]})
            anns += [{"id": a["id"], "image_id": a["image_id"], "bbox": a["bbox"], "area": a["area"],
                      "segmentation": a["segmentation"], "category_id": _LVIS_OF_SHAPE[a["category_id"] - 1][0]}
                     for a in objs]
        for c in cats:
            c["instance_count"] = sum(a["category_id"] == c["id"] for a in anns)
            c["image_count"] = len({a["image_id"] for a in anns if a["category_id"] == c["id"]})
        with open(os.path.join(tmp, "lvis", f"lvis_v1_{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": cats}, f)


def make_miniature(root: str, formats: Sequence[str] = FORMATS) -> str:
    """Write the miniature datasets of ``formats`` under ``root`` (once; atomically per
    format: a finished folder or none). Returns ``root``, to use as ``DATASETS.ROOT``."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise InputValueError(f"miniature dataset formats {unknown} unknown; available: {list(FORMATS)}")
    writers = {"coco": _write_coco, "voc": _write_voc, "cityscapes": _write_cityscapes, "lvis": _write_lvis}
    needs = {"lvis": ("coco",)}  # LVIS's images are COCO's
    order = []
    for f in formats:
        order += [d for d in needs.get(f, ()) if d not in order] + ([f] if f not in order else [])
    os.makedirs(root, exist_ok=True)
    for fmt in order:
        def fill(tmp: str, fmt=fmt) -> None:
            writers[fmt](tmp, {s: _scenes(s) for s in SPLITS})

        staged = generate_once(os.path.join(root, f".miniature-{fmt}"), _VERSION, fill)
        for entry in os.listdir(staged):  # move each top-level folder into place once
            if entry.startswith(".complete"):
                continue
            dst = os.path.join(root, entry)
            if not os.path.exists(dst):
                os.symlink(os.path.join(f".miniature-{fmt}", entry), dst)
    return root
