"""LVIS v1 (Detectron2 only): Detectron2's ``load_lvis_json`` over the COCO images and its
``LVISEvaluator`` (the ``lvis`` package). The miniature writes ``lvis/lvis_v1_*.json`` over
the miniature's ``coco/`` images (LVIS v1 category ids, frequencies, ``neg_category_ids``
and ``not_exhaustive_category_ids``).
"""
import json
import os

from . import DatasetFormat, register_format

# miniature: shape index -> (LVIS v1 id, name, frequency)
_LVIS_OF_SHAPE = ((1, "aerosol_can", "c"), (2, "air_conditioner", "f"), (3, "airplane", "f"), (4, "alarm_clock", "r"))


class LVISFormat(DatasetFormat):
    name = "lvis"
    evaluator_type = "lvis"
    needs = ("lvis",)
    miniature_needs = ("coco",)  # LVIS's images are COCO's

    def prepare_detectron2(self):
        from ..d2_compat import numpy_compat

        numpy_compat()

    def detectron2_loader(self, ds, paths, metadata, resolve):
        from detectron2.data.datasets.lvis import load_lvis_json

        # load_lvis_json joins image_root and the coco_url's folder as strings
        root = os.path.join(paths["image_root"], "")
        return lambda j=paths["json_file"], r=root, n=ds.name: load_lvis_json(j, r, n)

    def build_evaluator(self, dataset_name, output_dir):
        from detectron2.evaluation import LVISEvaluator

        return LVISEvaluator(dataset_name, output_dir=output_dir)

    def write_miniature(self, tmp, scenes):
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


register_format(LVISFormat())
