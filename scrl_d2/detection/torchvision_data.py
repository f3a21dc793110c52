"""Detection data for the torchvision fine-tuner (every format whose module reads it:
COCO json, COCO keypoints, label-scarce COCO subsets, Pascal VOC): images as uint8
tensors, targets in torchvision's format (xyxy boxes, contiguous labels from 1, uint8
masks, (K, 17, 3) keypoints)."""
import logging
from typing import Dict, List, Tuple

import numpy as np
import torch
import torchvision.transforms.functional as F
from pycocotools import mask as mask_utils

from ..data.datasets import ImageReadError, read_image
from ..utils.errors import InputValueError
from .catalog import check_dataset_files, get_dataset
from .torchvision_model import PolygonMasks

__all__ = ["CocoDetectionDataset", "collate", "build_detection_dataset"]

logger = logging.getLogger("scrl_d2.detection")


class CocoDetectionDataset(torch.utils.data.Dataset):
    def __init__(self, name: str, train: bool, with_masks: bool, flip: str = "horizontal",
                 filter_empty: bool = True, with_keypoints: bool = False, mask_format: str = "polygon",
                 min_keypoints: int = 0):
        self.name = name
        spec = get_dataset(name)  # not kept: its path functions do not pickle (spawned loader workers)
        self.kind, self.evaluator, self.split, self.year = spec.kind, spec.evaluator, spec.split, spec.year
        spec.format.require_torchvision(spec)
        self.coco, self.image_root = spec.format.coco_api(spec, check_dataset_files(name))
        self.cat_ids = sorted(self.coco.getCatIds())
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        ids = sorted(self.coco.getImgIds())
        if spec.keep is not None:  # a label-scarce subset: its fixed images
            ids = [ids[i] for i in spec.keep(len(ids))]
        if train and filter_empty:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns.get(i, []))]
        if train and with_keypoints and min_keypoints > 0:  # Detectron2's MIN_KEYPOINTS_PER_IMAGE
            ids = [i for i in ids if sum(sum(v > 0 for v in a.get("keypoints", [])[2::3])
                                         for a in self.coco.imgToAnns.get(i, [])) >= min_keypoints]
        if not ids:
            raise InputValueError(f"detection dataset {name!r} ({self.image_root}) has no usable images")
        if flip not in ("horizontal", "vertical", "none"):
            raise InputValueError(f"INPUT.RANDOM_FLIP: {flip!r} is not 'horizontal', 'vertical' or 'none'")
        if mask_format not in ("polygon", "bitmask"):
            raise InputValueError(f"INPUT.MASK_FORMAT: {mask_format!r} is not 'polygon' or 'bitmask'")
        self.ids, self.train, self.with_masks, self.flip = ids, train, with_masks, flip
        self.mask_format = mask_format
        # DATALOADER.ASPECT_RATIO_GROUPING's bucket per image, from the annotation's size as Detectron2
        self.buckets = [0 if self.coco.imgs[i]["width"] > self.coco.imgs[i]["height"] else 1 for i in ids]
        cat = self.coco.cats[self.cat_ids[0]]
        self.keypoint_names = cat.get("keypoints") if len(self.cat_ids) == 1 else None
        self.with_keypoints = with_keypoints
        self.keypoint_flip = _flip_order(tuple(self.keypoint_names)) if self.keypoint_names else None
        if with_keypoints and not self.keypoint_names:
            raise InputValueError(f"detection dataset {name!r}: MODEL.KEYPOINT_ON needs a COCO keypoints json "
                                  "(one category with 'keypoints'), e.g. keypoints_coco_2017_train")

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
            if self.mask_format == "polygon":
                if not all(isinstance(a["segmentation"], list) for a in anns):
                    raise InputValueError(f"dataset {self.name!r}, image {path}: a mask is RLE, not polygons; "
                                          "set INPUT.MASK_FORMAT bitmask (as Detectron2 requires)")
                target["masks"] = PolygonMasks([a["segmentation"] for a in anns])
            else:
                masks = [self._mask(a["segmentation"], h, w) for a in anns]
                target["masks"] = (torch.from_numpy(np.stack(masks)) if masks
                                   else torch.zeros((0, h, w), dtype=torch.uint8))
        if self.with_keypoints and self.train:
            # COCO keypoints are integer pixel indices; Detectron2 adds 0.5 to make them
            # continuous coordinates (and subtracts it again from predictions)
            k = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).reshape(
                len(anns), len(self.keypoint_names), 3)
            k[..., :2] += 0.5
            target["keypoints"] = k
        if self.train and self.flip != "none" and torch.rand(()) < 0.5:
            img, target = self._flipped(img, target, w, h)
        return img, target

    def _flipped(self, img: torch.Tensor, target: Dict, w: int, h: int) -> Tuple[torch.Tensor, Dict]:
        """Detectron2's RandomFlip: horizontal mirrors x and swaps left_* / right_*
        keypoints (COCO's flip map); vertical mirrors y."""
        b = target["boxes"]
        horizontal = self.flip == "horizontal"
        img = img.flip(-1 if horizontal else -2)
        target["boxes"] = (torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1) if horizontal
                           else torch.stack([b[:, 0], h - b[:, 3], b[:, 2], h - b[:, 1]], dim=1))
        m = target.get("masks")
        if isinstance(m, PolygonMasks):
            target["masks"] = m.flip(width=w) if horizontal else m.flip(height=h)
        elif m is not None:
            target["masks"] = m.flip(-1 if horizontal else -2)
        if "keypoints" in target:
            k = target["keypoints"].clone()
            if horizontal:
                k[..., 0] = w - k[..., 0]
                k = k[:, self.keypoint_flip]
            else:
                k[..., 1] = h - k[..., 1]
            target["keypoints"] = k
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


def _flip_order(names: Tuple[str, ...]) -> List[int]:
    swap = {n: n.replace("left_", "right_") if n.startswith("left_") else n.replace("right_", "left_")
            for n in names}
    return [names.index(swap[n]) if swap[n] in names else i for i, n in enumerate(names)]


def build_detection_dataset(names, train: bool, **kwargs) -> torch.utils.data.Dataset:
    """One dataset, or several concatenated (VOC07+12) when their classes agree."""
    parts = [CocoDetectionDataset(n, train=train, **kwargs) for n in names]
    for p in parts[1:]:
        if p.class_names != parts[0].class_names:
            raise InputValueError(f"DATASETS.TRAIN: {parts[0].name!r} and {p.name!r} have different classes")
    if len(parts) == 1:
        return parts[0]
    cat = torch.utils.data.ConcatDataset(parts)
    cat.class_names, cat.cat_to_label = parts[0].class_names, parts[0].cat_to_label
    cat.buckets = [b for p in parts for b in p.buckets]
    return cat


def collate(batch: List) -> Tuple[List[torch.Tensor], List[Dict]]:
    return [b[0] for b in batch], [b[1] for b in batch]
