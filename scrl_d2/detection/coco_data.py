"""COCO-format data for the torchvision fine-tuner: images as uint8 tensors, targets in
torchvision's format (xyxy boxes, contiguous labels from 1, uint8 masks)."""
import logging
from typing import Dict, List, Tuple

import numpy as np
import torch
import torchvision.transforms.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ..data.datasets import ImageReadError, read_image
from .datasets import get_coco_json

__all__ = ["CocoDetectionDataset", "collate"]

logger = logging.getLogger("scrl_d2.detection")


class CocoDetectionDataset(torch.utils.data.Dataset):
    def __init__(self, name: str, train: bool, with_masks: bool, flip: bool = True,
                 filter_empty: bool = True):
        import contextlib
        import io

        self.name = name
        self.json_file, self.image_root = get_coco_json(name)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO(self.json_file)
        self.cat_ids = sorted(self.coco.getCatIds())
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        ids = sorted(self.coco.getImgIds())
        if train and filter_empty:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns.get(i, []))]
        if not ids:
            raise ValueError(f"detection dataset {name!r} ({self.json_file}) has no usable images")
        self.ids, self.train, self.with_masks, self.flip = ids, train, with_masks, flip

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict]:
        import os

        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = os.path.join(self.image_root, info["file_name"])
        try:
            img = F.pil_to_tensor(read_image(path, exif_transpose=True))  # as Detectron2's read_image
        except ImageReadError as e:
            raise ImageReadError(f"dataset {self.name!r}: {e}") from e
        h, w = img.shape[1:]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)
                and a["bbox"][2] > 0 and a["bbox"][3] > 0]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        target = {"boxes": boxes, "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns],
                                                         dtype=torch.int64),
                  "image_id": image_id}
        if self.with_masks and self.train:
            masks = [self._mask(a["segmentation"], h, w) for a in anns]
            target["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8)
        if self.train and self.flip and torch.rand(()) < 0.5:
            img = img.flip(-1)
            b = target["boxes"]
            target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return img, target

    @staticmethod
    def _mask(segm, h: int, w: int) -> np.ndarray:
        if isinstance(segm, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
        elif isinstance(segm["counts"], list):
            rle = mask_utils.frPyObjects(segm, h, w)
        else:
            rle = segm
        return mask_utils.decode(rle).astype(np.uint8)


def collate(batch: List) -> Tuple[List[torch.Tensor], List[Dict]]:
    return [b[0] for b in batch], [b[1] for b in batch]
