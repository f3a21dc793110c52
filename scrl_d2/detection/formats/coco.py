"""COCO json (instances and person keypoints; also every COCO-format set: the label-scarce
subsets, the demo's and the study's generated sets, any registered json + image folder).

Detectron2 reads it with its ``load_coco_json`` (its class lists and metadata), kept to a
subset's images where the dataset has ``keep``; it evaluates with ``COCOEvaluator``. The
torchvision path reads the json with pycocotools and scores with pycocotools' COCOeval
(:mod:`scrl_d2.detection.coco_eval`). The miniature writes ``coco/{train,val}2017/`` with
``instances_*`` (the 80 real category ids) and ``person_keypoints_*`` (17 keypoints per
object, mirror-consistent, so flips with COCO's flip map stay correct).
"""
import contextlib
import io
import json
import os
from typing import Dict, List

from . import DatasetFormat, register_format

__all__ = ["COCO_PERSON_KEYPOINTS", "coco_categories"]

COCO_PERSON_KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
                         "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
                         "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")
_COCO_OF_SHAPE = ("sports ball", "tv", "kite", "clock")  # miniature: shape index -> COCO class


def coco_categories() -> List[Dict]:
    """COCO's 80 thing categories with their real (gapped) ids, from torchvision's metadata."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    names = FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]  # index = COCO id
    return [{"id": i, "name": n, "supercategory": ""} for i, n in enumerate(names) if n not in ("__background__",
                                                                                                "N/A")]


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


def _load_detectron2(resolve):
    from detectron2.data.datasets import load_coco_json

    ds, paths = resolve()  # the registration now, not when Detectron2 registered the name
    dicts = load_coco_json(paths["json_file"], paths["image_root"], ds.name)
    if ds.keep is not None:
        ids = sorted(d["image_id"] for d in dicts)
        kept = {ids[i] for i in ds.keep(len(ids))}
        dicts = [d for d in dicts if d["image_id"] in kept]
    return dicts


class COCOFormat(DatasetFormat):
    name = "coco"
    evaluator_type = "coco"
    torchvision = True

    def detectron2_loader(self, ds, paths, metadata, resolve):
        # class lists come from the json again (load_coco_json sets them)
        for k in [k for k in metadata if k.startswith("thing_")]:
            del metadata[k]
        return lambda: _load_detectron2(resolve)

    def build_evaluator(self, dataset_name, output_dir):
        from detectron2.evaluation import COCOEvaluator

        return COCOEvaluator(dataset_name, output_dir=output_dir)

    def coco_api(self, ds, paths):
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            return COCO(paths["json_file"]), paths["image_root"]

    def score(self, ds, predictions, out_dir, cfg):
        from ..coco_eval import evaluate_predictions

        iou_types = ["bbox"] + (["segm"] if cfg.MODEL.MASK_ON else []) + (["keypoints"] if cfg.MODEL.KEYPOINT_ON
                                                                          else [])
        return evaluate_predictions(ds.coco, predictions, iou_types, ds.class_names, out_dir,
                                    kpt_oks_sigmas=cfg.TEST.KEYPOINT_OKS_SIGMAS)

    def write_miniature(self, tmp, scenes):
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


register_format(COCOFormat())
