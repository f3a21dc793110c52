"""Cityscapes fine instance segmentation (Detectron2 only): Detectron2's
``load_cityscapes_instances`` (from the polygon jsons) and ``CityscapesInstanceEvaluator``
(cityscapesscripts), with the work-arounds of :mod:`scrl_d2.detection.d2_compat`. The
miniature writes ``leftImg8bit/`` and ``gtFine``'s polygons, instance and label ids.
"""
import json
import os

import numpy as np

from . import DatasetFormat, register_format

_CITYSCAPES_OF_SHAPE = (("person", 24), ("car", 26), ("truck", 27), ("bus", 28))  # miniature: shape -> class


class CityscapesFormat(DatasetFormat):
    name = "cityscapes"
    evaluator_type = "cityscapes_instance"
    needs = ("cityscapesscripts",)

    def prepare_detectron2(self):
        from ..d2_compat import alias_cityscapesscripts, numpy_compat

        numpy_compat()
        alias_cityscapesscripts()

    def detectron2_loader(self, ds, paths, metadata, resolve):
        from detectron2.data.datasets.cityscapes import load_cityscapes_instances

        from ..d2_compat import alias_cityscapesscripts

        alias_cityscapesscripts()

        return lambda x=paths["image_dir"], y=paths["gt_dir"]: load_cityscapes_instances(
            x, y, from_json=True, to_polygons=True)

    def build_evaluator(self, dataset_name, output_dir):
        from detectron2.evaluation import CityscapesInstanceEvaluator

        return CityscapesInstanceEvaluator(dataset_name)

    def write_miniature(self, tmp, scenes):
        from PIL import Image, ImageDraw

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
                label_ids.convert("L").save(os.path.join(gt_dir, stem + "_gtFine_labelIds.png"))  # 8-bit
                Image.fromarray(np.asarray(instance_ids, dtype=np.uint16)).save(  # 16-bit
                    os.path.join(gt_dir, stem + "_gtFine_instanceIds.png"))
                with open(os.path.join(gt_dir, stem + "_gtFine_polygons.json"), "w") as f:
                    json.dump({"imgHeight": h, "imgWidth": w,
                               "objects": [{"label": "road", "polygon": [[0, 0], [w - 1, 0], [w - 1, h - 1],
                                                                         [0, h - 1]]}] + polygons}, f)


register_format(CityscapesFormat())
