"""Pascal VOC: Detectron2 reads it with ``load_voc_instances`` and evaluates it with
``PascalVOCDetectionEvaluator``; without Detectron2, the XML annotations become an
in-memory COCO dataset (for the torchvision fine-tuner) and the VOC detection metric is
computed as Detectron2 reports it. The miniature writes ``VOC2007/`` and ``VOC2012/``.

Conventions kept from Detectron2 (``load_voc_instances`` / ``PascalVOCDetectionEvaluator``):
training boxes are ``(xmin - 1, ymin - 1, xmax, ymax)`` of the 1-based inclusive corners,
``difficult`` objects are trained on and ignored by the metric; the metric is the devkit's
(IoU with the +1 pixel convention, a detection of a difficult object counts neither way),
11-point AP for VOC2007 and area under the interpolated curve otherwise, averaged over
classes at IoU 0.50:0.05:0.95 ("AP"), and at 0.50 / 0.75. Predictions are rounded as
Detectron2 writes them (score to 3 decimals, corners to 0.1 px) so both give the same
numbers on the same detections (``tests/test_transfer.py`` checks it).
"""
import functools
import os
import xml.etree.ElementTree as ET
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ...utils.errors import InputFileNotFoundError, InputValueError
from . import DatasetFormat, register_format

__all__ = ["VOC_CLASSES", "read_voc_split", "voc_as_coco", "voc_detection_ap", "average_precision"]

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")  # Detectron2's order (its contiguous class ids)


@functools.lru_cache(maxsize=None)
def _parse(xml_path: str) -> Tuple[Tuple[int, int], Tuple[Tuple[str, Tuple[int, int, int, int], int], ...]]:
    """``((width, height), ((class, (xmin, ymin, xmax, ymax), difficult), ...))``."""
    root = ET.parse(xml_path).getroot()
    size = (int(root.find("size/width").text), int(root.find("size/height").text))
    objs = []
    for o in root.findall("object"):
        b = o.find("bndbox")
        d = o.find("difficult")
        objs.append((o.find("name").text, tuple(int(float(b.find(k).text)) for k in ("xmin", "ymin", "xmax", "ymax")),
                     int(d.text) if d is not None else 0))
    return size, tuple(objs)


def read_voc_split(dirname: str, split: str) -> List[str]:
    path = os.path.join(dirname, "ImageSets", "Main", split + ".txt")
    if not os.path.isfile(path):
        raise InputFileNotFoundError(f"Pascal VOC image set not found: {os.path.abspath(path)}")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def voc_as_coco(dirname: str, split: str, class_names: Sequence[str]) -> Dict:
    """A VOC split as a COCO dataset dict (images' ``file_name`` relative to ``dirname``,
    ``voc_id`` = the file id; categories ``1..20`` in ``class_names`` order)."""
    images, anns = [], []
    for i, fid in enumerate(read_voc_split(dirname, split), start=1):
        xml = os.path.join(dirname, "Annotations", fid + ".xml")
        if not os.path.isfile(xml):
            raise InputFileNotFoundError(f"Pascal VOC annotation not found: {os.path.abspath(xml)}")
        (w, h), objs = _parse(xml)
        images.append({"id": i, "file_name": os.path.join("JPEGImages", fid + ".jpg"), "width": w, "height": h,
                       "voc_id": fid})
        for name, (x0, y0, x1, y1), difficult in objs:
            if name not in class_names:
                raise InputValueError(f"{xml}: class {name!r} is not one of the {len(class_names)} VOC classes")
            x0, y0 = x0 - 1.0, y0 - 1.0
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": list(class_names).index(name) + 1,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                         "difficult": difficult})
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(class_names)]
    return {"images": images, "annotations": anns, "categories": cats}


def average_precision(rec: np.ndarray, prec: np.ndarray, eleven_point: bool) -> float:
    if eleven_point:  # VOC2007: mean of the best precision at recall >= 0, 0.1, ..., 1
        return float(sum((prec[rec >= t].max() if (rec >= t).any() else 0.0) for t in np.arange(0.0, 1.1, 0.1)) / 11)
    r = np.concatenate(([0.0], rec, [1.0]))
    p = np.concatenate(([0.0], prec, [0.0]))
    p = np.maximum.accumulate(p[::-1])[::-1]  # precision envelope
    steps = np.where(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def _class_ap(dets: List[Tuple[str, float, np.ndarray]], gt: Dict[str, Tuple[np.ndarray, np.ndarray]],
              iou: float, eleven_point: bool) -> float:
    npos = sum(int((~d).sum()) for _, d in gt.values())
    if not dets:  # as the devkit: no detections, AP 0
        return 0.0
    conf = np.array([s for _, s, _ in dets])
    order = np.argsort(-conf)
    taken = {k: np.zeros(len(b), bool) for k, (b, _) in gt.items()}
    tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
    for rank, j in enumerate(order):
        image, _, bb = dets[j]
        boxes, difficult = gt.get(image, (np.zeros((0, 4)), np.zeros(0, bool)))
        best = -np.inf
        if len(boxes):
            iw = np.maximum(np.minimum(boxes[:, 2], bb[2]) - np.maximum(boxes[:, 0], bb[0]) + 1.0, 0.0)
            ih = np.maximum(np.minimum(boxes[:, 3], bb[3]) - np.maximum(boxes[:, 1], bb[1]) + 1.0, 0.0)
            inter = iw * ih
            union = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                     + (boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0) - inter)
            overlaps = inter / union
            k, best = int(np.argmax(overlaps)), float(np.max(overlaps))
        if best > iou:
            if not difficult[k]:
                if taken[image][k]:
                    fp[rank] = 1.0
                else:
                    tp[rank], taken[image][k] = 1.0, True
        else:
            fp[rank] = 1.0
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / float(npos) if npos else np.full_like(tp, np.nan)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return average_precision(rec, prec, eleven_point)


def voc_detection_ap(predictions: List[Dict], dirname: str, split: str, year: int,
                     class_names: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """``predictions``: ``{"voc_id", "class" (0-based), "score", "box" (xyxy, pixels)}``.
    Returns ``{"bbox": {"AP", "AP50", "AP75"}}`` in percent, as Detectron2's evaluator."""
    ids = read_voc_split(dirname, split)
    objs = {fid: _parse(os.path.join(dirname, "Annotations", fid + ".xml"))[1] for fid in ids}
    per_class: Dict[int, List] = {c: [] for c in range(len(class_names))}
    for p in predictions:
        x0, y0, x1, y1 = (float(v) for v in p["box"])
        box = np.array([round(x0 + 1, 1), round(y0 + 1, 1), round(x1, 1), round(y1, 1)])  # as written by Detectron2
        per_class[int(p["class"])].append((p["voc_id"], round(float(p["score"]), 3), box))
    aps: Dict[int, List[float]] = {t: [] for t in range(50, 100, 5)}
    for c, name in enumerate(class_names):
        gt = {}
        for fid in ids:
            mine = [(b, d) for n, b, d in objs[fid] if n == name]
            gt[fid] = (np.array([b for b, _ in mine], dtype=float).reshape(-1, 4),
                       np.array([d for _, d in mine], dtype=bool))
        for t in aps:
            aps[t].append(_class_ap(per_class[c], gt, t / 100.0, year == 2007) * 100)
    means = {t: float(np.mean(v)) for t, v in aps.items()}
    return {"bbox": {"AP": float(np.mean(list(means.values()))), "AP50": means[50], "AP75": means[75]}}


_VOC_OF_SHAPE = ("bird", "boat", "car", "person")  # miniature: shape index -> VOC class


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


class VOCFormat(DatasetFormat):
    name = "voc"
    evaluator_type = "pascal_voc"
    torchvision = True

    def detectron2_loader(self, ds, paths, metadata, resolve):
        from detectron2.data.datasets.pascal_voc import load_voc_instances

        classes = metadata.pop("thing_classes", list(VOC_CLASSES))
        metadata["thing_classes"] = classes
        return lambda d=paths["dirname"], s=ds.split, c=classes: load_voc_instances(d, s, c)

    def build_evaluator(self, dataset_name, output_dir):
        from detectron2.evaluation import PascalVOCDetectionEvaluator

        return PascalVOCDetectionEvaluator(dataset_name)

    def coco_api(self, ds, paths):
        from pycocotools.coco import COCO

        coco = COCO()
        coco.dataset = voc_as_coco(paths["dirname"], ds.split, VOC_CLASSES)
        coco.createIndex()
        return coco, paths["dirname"]

    def score(self, ds, predictions, out_dir, cfg):
        voc_id = {i: ds.coco.imgs[i]["voc_id"] for i in ds.coco.imgs}
        return voc_detection_ap([{"voc_id": voc_id[p["image_id"]], "class": p["category_id"] - 1,
                                  "score": p["score"], "box": [p["bbox"][0], p["bbox"][1],
                                                               p["bbox"][0] + p["bbox"][2],
                                                               p["bbox"][1] + p["bbox"][3]]} for p in predictions],
                                ds.image_root, ds.split, ds.year, VOC_CLASSES)

    def write_miniature(self, tmp, scenes):
        from PIL import Image

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
                        objs = [dict(a, bbox=[info["width"] - a["bbox"][0] - a["bbox"][2]] + a["bbox"][1:])
                                for a in objs]
                    out.save(os.path.join(base, "JPEGImages", stem + ".jpg"), quality=92)
                    with open(os.path.join(base, "Annotations", stem + ".xml"), "w") as f:
                        f.write(_voc_xml(info, objs, rng))
                with open(os.path.join(base, "ImageSets", "Main", split + ".txt"), "w") as f:
                    f.write("\n".join(ids) + "\n")


register_format(VOCFormat())
