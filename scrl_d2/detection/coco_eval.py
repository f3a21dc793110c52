"""COCO evaluation with pycocotools, reported in the shape of Detectron2's COCOEvaluator:
``{"bbox": {"AP": .., "AP50": .., "AP75": .., "APs": .., "APm": .., "APl": .., "AP-<class>": ..},
"segm": {...}}`` (percentages)."""
import contextlib
import io
import json
import logging
import os
from typing import Dict, List

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from ..utils import comm
from ..utils.errors import InputValueError
from ..utils.fs import atomic_write

__all__ = ["predictions_to_coco", "evaluate_predictions", "print_results", "METRICS"]

logger = logging.getLogger("scrl_d2.detection")
METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
# COCOeval.stats order per IoU type, as Detectron2's COCOEvaluator names them
STATS = {"bbox": METRICS, "segm": METRICS, "keypoints": ["AP", "AP50", "AP75", "APm", "APl"]}


def predictions_to_coco(outputs: List[Dict], image_ids: List[int], label_to_cat: Dict[int, int]) -> List[Dict]:
    """torchvision detector outputs (original-image pixels) -> COCO result records."""
    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores, labels = out["scores"].float().cpu().tolist(), out["labels"].cpu().tolist()
        masks = None
        if "masks" in out:
            binary = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
            masks = [mask_utils.encode(np.asfortranarray(m)) for m in binary]
            for m in masks:
                m["counts"] = m["counts"].decode("ascii")
        kps = None
        if "keypoints" in out:  # back to COCO's integer-pixel convention, as Detectron2's evaluator
            kps = out["keypoints"].float().cpu().clone()
            kps[..., :2] -= 0.5
        for k in range(len(scores)):
            r = {"image_id": int(image_id), "category_id": label_to_cat[labels[k]], "bbox": xywh[k],
                 "score": scores[k]}
            if masks is not None:
                r["segmentation"] = masks[k]
            if kps is not None:
                r["keypoints"] = kps[k].flatten().tolist()
            results.append(r)
    return results


def evaluate_predictions(coco_gt, results: List[Dict], iou_types: List[str], class_names: List[str],
                         output_dir: str = "", kpt_oks_sigmas=()) -> Dict[str, Dict[str, float]]:
    """COCOeval per IoU type; NaN where there is nothing to evaluate, as Detectron2.
    ``kpt_oks_sigmas`` (TEST.KEYPOINT_OKS_SIGMAS): keypoint OKS sigmas, COCO's when empty."""
    if output_dir and comm.is_main_process():
        atomic_write(os.path.join(output_dir, "coco_instances_results.json"), lambda f: f.write(json.dumps(results)),
                     mode="w")
    out: Dict[str, Dict[str, float]] = {}
    for iou_type in iou_types:
        names = STATS[iou_type]
        if not results:
            logger.warning("no predictions from the model: AP is NaN")
            out[iou_type] = {m: float("nan") for m in names}
            continue
        with contextlib.redirect_stdout(io.StringIO()) as buf:
            dt = coco_gt.loadRes(results)
            ev = COCOeval(coco_gt, dt, iou_type)
            if iou_type == "keypoints" and len(kpt_oks_sigmas):
                n = next((len(a["keypoints"]) // 3 for a in coco_gt.dataset["annotations"] if "keypoints" in a), 0)
                if len(kpt_oks_sigmas) != n:
                    raise InputValueError(f"TEST.KEYPOINT_OKS_SIGMAS has {len(kpt_oks_sigmas)} values; the dataset's "
                                          f"keypoints number {n}")
                ev.params.kpt_oks_sigmas = np.array(kpt_oks_sigmas)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        logger.info(f"COCO {iou_type} evaluation:\n{buf.getvalue()}")
        stats = {m: float(ev.stats[i] * 100) if ev.stats[i] >= 0 else float("nan") for i, m in enumerate(names)}
        precisions = ev.eval["precision"]  # [iou, recall, class, area, maxdets]
        for k, name in enumerate(class_names):
            p = precisions[:, :, k, 0, -1]
            p = p[p > -1]
            stats[f"AP-{name}"] = float(np.mean(p) * 100) if p.size else float("nan")
        out[iou_type] = stats
    return out


def print_results(results: Dict) -> None:
    """A Detectron2-style table: one row per IoU type."""
    from tabulate import tabulate

    rows = [[t] + [f"{r.get(m, float('nan')):.2f}" for m in METRICS] for t, r in results.items() if isinstance(r, dict)]
    if rows:
        print(tabulate(rows, headers=["task"] + METRICS, tablefmt="pipe"), flush=True)
