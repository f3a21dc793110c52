"""Every fine-tuning family of the torchvision path (Faster R-CNN on COCO-format and on
Pascal VOC data, Mask R-CNN, Keypoint R-CNN, RetinaNet) as users run it: two processes
(gloo), a loader worker each, under each autocast dtype this CPU has; and its boxes stay
exact under autocast.

The exactness check is structural, as pretraining's (scrl_d2/modeling/audit.py): a loss
tolerance cannot see a box rounded to a few pixels or pooled from the neighbouring image,
so one training and one inference forward under autocast record the boxes at each stage
(the transformed ground truth, the anchors, every box-coder decode / encode, the
proposals, what each RoI pooler receives and what its RoIAlign kernel receives, the
boxes the mask / keypoint targets are cut from, the detections) and each must be float32
and bit-equal to the float32 computation from the same inputs, and belong to its own
image: a proposal is one of its image's decoded anchors, a pooled box one of its image's
proposals or ground-truth boxes, a kernel RoI carries its box's image index, and the
pooled values of a feature map that encodes each image's index are that image's.
"""
import contextlib
import json
import math
import os
import subprocess
import sys
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest
import torch
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.transform import resize_boxes, resize_keypoints
from torchvision.ops import boxes as box_ops

from conftest import ROOT, remove_unless_failed

# the in-process checks run once in CI, in the plain pass (plain_pass_only); the 2-process CLI
# runs once, in the full pass (the torchvision path is forced there: the same code, with
# Detectron2's EventStorage)

FAMILIES = {"faster_rcnn": "coco_faster_rcnn_R50_FPN_1x", "voc_faster_rcnn": "voc0712_faster_rcnn_R50_FPN",
            "mask_rcnn": "coco_mask_rcnn_R50_FPN_1x", "keypoint_rcnn": "coco_keypoint_rcnn_R50_FPN_1x",
            "retinanet": "coco_retinanet_R50_FPN_1x"}
# The protocols' miniature runs (ResNet-18) made smaller where only time is at stake: fp16
# convolution backward has no fast CPU kernel (~20x fp32 here), so tiny images, narrow heads.
SMALL = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
         "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96", "MODEL.FPN.OUT_CHANNELS", "64",
         "MODEL.ROI_BOX_HEAD.FC_DIM", "128", "MODEL.ROI_MASK_HEAD.CONV_DIM", "64", "TEST.PRECISE_BN.NUM_ITER", "1",
         "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(100,)", "DATALOADER.NUM_WORKERS", "1"]
F32 = torch.float32


def _autocasts(dtype: torch.dtype) -> bool:
    with torch.autocast("cpu", dtype=dtype):
        return torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2)).dtype == dtype


CPU_DTYPES = [d for d in (torch.bfloat16, torch.float16) if _autocasts(d)]
DTYPE_KEY = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


@pytest.fixture(scope="module")
def mini(tmp_path_factory, request):
    from scrl_d2.transfer.miniature import make_miniature

    d = tmp_path_factory.mktemp("mini_scale")
    yield make_miniature(str(d), formats=("coco", "voc"))
    remove_unless_failed(request, d)


@pytest.fixture(autouse=True)
def torchvision_backend(monkeypatch):
    monkeypatch.setenv("SCRL_D2_BACKEND", "torchvision")


def family_cfg(family: str, mini: str, *opts):
    from scrl_d2.config import config_from_args
    from scrl_d2.transfer.miniature import miniature_overrides
    from scrl_d2.transfer.protocols import get_protocol

    p = get_protocol(FAMILIES[family])
    return config_from_args(p.config_path, miniature_overrides(p, mini) + SMALL + list(opts))


def training_batch(cfg, n: int = 2):
    """The first ``n`` training images as the fine-tuner's loader gives them (uint8 read
    from disk by torchvision_data, targets in torchvision's format), scaled as its step does."""
    from scrl_d2.data.catalog import set_datasets_root
    from scrl_d2.detection.torchvision_data import build_detection_dataset

    set_datasets_root(cfg.DATASETS.ROOT)
    try:
        ds = build_detection_dataset(cfg.DATASETS.TRAIN, train=True, with_masks=cfg.MODEL.MASK_ON,
                                     with_keypoints=cfg.MODEL.KEYPOINT_ON, flip=cfg.INPUT.RANDOM_FLIP,
                                     filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
                                     mask_format=cfg.INPUT.MASK_FORMAT,
                                     min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE)
    finally:
        set_datasets_root("")  # the environment's default again (the dataset keeps its paths)
    items = [ds[i] for i in range(n)]
    return [im.float() / 255.0 for im, _ in items], [t for _, t in items]


# ---------------------------------------------------------------------------- the audit
@dataclass
class BoxAudit:
    problems: List[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.problems

    def bad(self, msg: str) -> None:
        if len(self.problems) < 40:
            self.problems.append(msg)


def _rows_in(rows: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Which rows of ``rows`` occur bit for bit among the rows of ``pool``."""
    rows, pool = rows.reshape(len(rows), -1), pool.reshape(len(pool), -1)
    if len(rows) == 0 or len(pool) == 0:
        return torch.zeros(len(rows), dtype=torch.bool)
    return (rows[:, None, :] == pool[None, :, :]).all(-1).any(1)


def _encode(feature: torch.Tensor) -> torch.Tensor:
    """Same shape and dtype; channel 0 = the image's index + 1 (exact in bf16 and fp16)."""
    out = torch.zeros_like(feature)
    out[:, 0] = (torch.arange(feature.shape[0]) + 1).to(feature.dtype).view(-1, 1, 1)
    return out


class _Patches:
    """Temporary attributes (instance methods, module functions), restored on exit."""

    def __init__(self):
        self.saved = []

    def set(self, obj, name: str, value) -> None:
        self.saved.append((obj, name, name in vars(obj), getattr(obj, name)))
        setattr(obj, name, value)

    def restore(self) -> None:
        for obj, name, own, old in reversed(self.saved):
            if own:
                setattr(obj, name, old)
            else:
                delattr(obj, name)


def _clone(x):
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clone(v) for v in x]
    return x


@torch.no_grad()
def audit_boxes(model: torch.nn.Module, images: List[torch.Tensor], targets: Optional[List[Dict]],
                dtype: Optional[torch.dtype]) -> BoxAudit:
    """One forward of ``model`` (training with ``targets``, else inference) under autocast
    of ``dtype``; where every box came from and whether it is float32 and exact. The
    model's weights and buffers are left as they were."""
    from scrl_d2.detection import torchvision_model as tvm
    from scrl_d2.modeling.audit import _RoiAlignRecorder

    training = targets is not None
    rcnn = hasattr(model, "rpn")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    rec: Dict[str, list] = {k: [] for k in ("transform", "anchors", "decode", "encode", "iou", "rpn", "pool",
                                            "mask_targets", "kp_targets", "dets", "post")}
    kernel = _RoiAlignRecorder()
    patches, hooks = _Patches(), []
    encode_split: List[Optional[List[int]]] = [None]

    def record_transform(m, args, out):
        image_list, tgts = out
        rec["transform"].append((list(image_list.image_sizes), _clone(tgts)))

    def record_anchors(m, args, out):
        image_list, maps = args
        rec["anchors"].append((image_list, [f.shape for f in maps], _clone(out)))

    def wrap_coder(name, coder):
        decode_single, encode_single, encode = coder.decode_single, coder.encode_single, coder.encode

        def dec(rel, boxes):
            out = decode_single(rel, boxes)
            rec["decode"].append((name, _clone(rel), _clone(boxes), _clone(out)))
            return out

        def enc_single(ref, props):
            out = encode_single(ref, props)
            rec["encode"].append((name, _clone(ref), _clone(props), _clone(out), encode_split[0]))
            return out

        def enc(refs, props):
            encode_split[0] = [len(r) for r in refs]
            try:
                return encode(refs, props)
            finally:
                encode_split[0] = None

        patches.set(coder, "decode_single", dec)
        patches.set(coder, "encode_single", enc_single)
        patches.set(coder, "encode", enc)

    def iou(name, fn):
        def f(a, b):
            rec["iou"].append((name, _clone(a), _clone(b)))
            return fn(a, b)
        return f

    def pool_pre(name):
        def hook(m, args):
            x, boxes, shapes = args
            encoded = OrderedDict((k, _encode(v)) for k, v in x.items())
            rec["pool"].append({"name": name, "module": m, "boxes": _clone(boxes), "shapes": list(shapes),
                                "x": OrderedDict((k, v.float()) for k, v in encoded.items()),
                                "start": len(kernel.calls)})
            return encoded, boxes, shapes
        return hook

    def pool_post(m, args, out):
        rec["pool"][-1].update(end=len(kernel.calls), out=_clone(out))

    mask_targets, kp_heatmap = tvm._mask_targets, tv_roi_heads.keypoints_to_heatmap

    def record_mask_targets(gt_masks, boxes, matched_idxs, size):
        rec["mask_targets"].append(_clone(boxes))
        return mask_targets(gt_masks, boxes, matched_idxs, size)

    def record_kp_targets(keypoints, rois, size):
        rec["kp_targets"].append((_clone(keypoints), _clone(rois)))
        return kp_heatmap(keypoints, rois, size)

    try:
        hooks.append(model.transform.register_forward_hook(record_transform))
        if rcnn:
            hooks.append(model.rpn.anchor_generator.register_forward_hook(record_anchors))
            wrap_coder("rpn", model.rpn.box_coder)
            wrap_coder("roi_heads", model.roi_heads.box_coder)
            patches.set(model.rpn, "box_similarity", iou("rpn", model.rpn.box_similarity))
            patches.set(box_ops, "box_iou", iou("roi_heads", box_ops.box_iou))
            hooks.append(model.rpn.register_forward_hook(lambda m, a, out: rec["rpn"].append(_clone(out[0]))))
            hooks.append(model.roi_heads.register_forward_hook(lambda m, a, out: rec["dets"].append(_clone(out[0]))))
            rh = model.roi_heads
            for name in ("box_roi_pool", "mask_roi_pool", "keypoint_roi_pool"):
                pooler = getattr(rh, name, None)
                if pooler is not None:
                    hooks.append(pooler.register_forward_pre_hook(pool_pre(name)))
                    hooks.append(pooler.register_forward_hook(pool_post))
            patches.set(tvm, "_mask_targets", record_mask_targets)
            patches.set(tv_roi_heads, "keypoints_to_heatmap", record_kp_targets)
        else:
            hooks.append(model.anchor_generator.register_forward_hook(record_anchors))
            wrap_coder("retinanet", model.box_coder)
            if model.head.regression_head.box_coder is not model.box_coder:
                wrap_coder("retinanet_head", model.head.regression_head.box_coder)
            patches.set(box_ops, "box_iou", iou("retinanet", box_ops.box_iou))
            postprocess = model.postprocess_detections

            def record_post(head_outputs, anchors, shapes):
                start = len(rec["decode"])
                out = postprocess(head_outputs, anchors, shapes)
                rec["post"].append((start, len(rec["decode"]), len(anchors[0])))
                rec["dets"].append(_clone(out))
                return out

            patches.set(model, "postprocess_detections", record_post)
        model.train(training)
        autocast = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with autocast, kernel:
            outputs = model([im.clone() for im in images], _clone(targets) if training else None)
    finally:
        for h in hooks:
            h.remove()
        patches.restore()
        model.load_state_dict(saved)
        model.train(was_training)
    return _check(model, images, targets, outputs, rec, kernel)


def _check(model, images, targets, outputs, rec, kernel) -> BoxAudit:
    """The checks of :func:`audit_boxes` on what one forward recorded."""
    a = BoxAudit()
    training, rcnn, n = targets is not None, hasattr(model, "rpn"), len(images)
    originals = [tuple(im.shape[-2:]) for im in images]

    def exact(what: str, got: torch.Tensor, want: torch.Tensor) -> bool:
        if got.dtype != F32:
            a.bad(f"{what}: {got.dtype}, not float32")
            return False
        if got.shape != want.shape or not torch.equal(got, want.to(F32)):
            a.bad(f"{what}: differs from the float32 computation")
            return False
        return True

    def within(what: str, rows: torch.Tensor, pool: torch.Tensor) -> bool:
        if rows.dtype != F32:
            a.bad(f"{what}: {rows.dtype}, not float32")
            return False
        missing = int((~_rows_in(rows, pool)).sum())
        if missing:
            a.bad(f"{what}: {missing} of {len(rows)} are none of their image's")
        return not missing

    # the transformed ground truth: the float32 resize of the dataset's boxes / keypoints
    (sizes, tgts), = rec["transform"]
    gt, gt_kp = [], []
    for i in range(n if training else 0):
        exact(f"image {i} ground-truth boxes", tgts[i]["boxes"],
              resize_boxes(targets[i]["boxes"].float(), originals[i], sizes[i]))
        gt.append(tgts[i]["boxes"])
        a.counts["gt"] += len(gt[-1])
        if "keypoints" in targets[i]:
            exact(f"image {i} ground-truth keypoints", tgts[i]["keypoints"],
                  resize_keypoints(targets[i]["keypoints"].float(), originals[i], sizes[i]))
            gt_kp.append(tgts[i]["keypoints"])

    # anchors: float32 and equal to the generator's output for float32 maps of those shapes
    (image_list, shapes, anchors), = rec["anchors"]
    generator = model.rpn.anchor_generator if rcnn else model.anchor_generator
    reference = generator(image_list, [torch.zeros(s) for s in shapes])
    for i in range(n):
        exact(f"image {i} anchors", anchors[i], reference[i])
        a.counts["anchors"] += len(anchors[i])

    # every decode / encode: float32 in and out, bit-equal to torchvision's coder in float32
    owners = ({"rpn": model.rpn.box_coder, "roi_heads": model.roi_heads.box_coder} if rcnn
              else {"retinanet": model.box_coder, "retinanet_head": model.head.regression_head.box_coder})
    coders = {name: BoxCoder(c.weights, c.bbox_xform_clip) for name, c in owners.items()}
    for k, (name, rel, boxes, out) in enumerate(rec["decode"]):
        if boxes.dtype != F32:
            a.bad(f"{name} decode {k}: its reference boxes are {boxes.dtype}")
        exact(f"{name} decode {k}", out, coders[name].decode_single(rel.float(), boxes.float()))
        a.counts["decoded"] += len(out)
    for k, (name, ref, props, out, split) in enumerate(rec["encode"]):
        if ref.dtype != F32 or props.dtype != F32:
            a.bad(f"{name} encode {k}: boxes {ref.dtype} / {props.dtype}")
        exact(f"{name} encode {k}", out, coders[name].encode_single(ref.float(), props.float()))
        a.counts["encoded"] += len(out)

    def encodes(name):
        """Per image (matched ground truth, the boxes encoded against it)."""
        recs = [r for r in rec["encode"] if r[0] == name]
        if rcnn:  # one encode of every image's boxes
            recs = [r for r in recs if r[4] is not None]
            if len(recs) != 1:
                a.bad(f"{name}: {len(recs)} encodes of the batch, not 1")
                return []
            _, ref, props, _, split = recs[0]
            return list(zip(ref.split(split), props.split(split)))
        return [(r[1], r[2]) for r in recs]

    def ious(name, others):
        """Matching: ground truth of image i against image i's anchors / proposals."""
        calls = [r for r in rec["iou"] if r[0] == name]
        if len(calls) != n:
            a.bad(f"{name}: {len(calls)} matchings for {n} images")
        for i, (_, g, o) in enumerate(calls[:n]):
            exact(f"{name} image {i} matching ground truth", g, gt[i])
            exact(f"{name} image {i} matched boxes", o, others[i])
            a.counts["matched"] += 1

    if rcnn:
        rpn_decodes = [r for r in rec["decode"] if r[0] == "rpn"]
        (proposals,) = rec["rpn"]
        if len(rpn_decodes) != 1:
            a.bad(f"RPN: {len(rpn_decodes)} decodes, not 1")
        else:
            _, _, reference_boxes, decoded = rpn_decodes[0]
            exact("RPN decode reference boxes", reference_boxes, torch.cat(anchors))
            decoded = decoded.reshape(n, -1, 4)
            for i in range(n):
                within(f"image {i} proposals", proposals[i],
                       box_ops.clip_boxes_to_image(decoded[i], sizes[i]))
                a.counts["proposals"] += len(proposals[i])
        if training:
            ious("rpn", anchors)
            for i, (ref, props) in enumerate(encodes("rpn")):
                within(f"RPN image {i} matched ground truth", ref, gt[i])
                exact(f"RPN image {i} encoded anchors", props, anchors[i])
        pools = {p["name"]: p for p in rec["pool"]}
        box_pool = pools["box_roi_pool"]
        if training:
            ious("roi_heads", [torch.cat([proposals[i], gt[i]]) for i in range(n)])
            for i, (ref, props) in enumerate(encodes("roi_heads")):
                within(f"box head image {i} matched ground truth", ref, gt[i])
                exact(f"box head image {i} encoded proposals", props, box_pool["boxes"][i])
            for i in range(n):
                within(f"image {i} boxes pooled by the box head", box_pool["boxes"][i],
                       torch.cat([proposals[i], gt[i]]))
        else:
            for i in range(n):
                exact(f"image {i} boxes pooled by the box head", box_pool["boxes"][i], proposals[i])
        (dets,) = rec["dets"]  # (inference) before they are resized to the input images
        for head in ("mask_roi_pool", "keypoint_roi_pool"):  # training: positives; inference: detections
            for i in range(n if head in pools else 0):
                boxes = pools[head]["boxes"][i]
                if training:
                    within(f"image {i} boxes pooled by {head}", boxes, box_pool["boxes"][i])
                else:
                    exact(f"image {i} boxes pooled by {head}", boxes, dets[i]["boxes"])
        if training and "mask_roi_pool" in pools:
            if len(rec["mask_targets"]) != n:
                a.bad(f"mask targets cut for {len(rec['mask_targets'])} of {n} images")
            for i, boxes in enumerate(rec["mask_targets"][:n]):
                exact(f"image {i} mask target boxes", boxes, pools["mask_roi_pool"]["boxes"][i])
                a.counts["mask_targets"] += len(boxes)
        if training and "keypoint_roi_pool" in pools:
            if len(rec["kp_targets"]) != n:
                a.bad(f"keypoint targets made for {len(rec['kp_targets'])} of {n} images")
            for i, (kp, rois) in enumerate(rec["kp_targets"][:n]):
                exact(f"image {i} keypoint target boxes", rois, pools["keypoint_roi_pool"]["boxes"][i])
                within(f"image {i} keypoint targets", kp, gt_kp[i])
                a.counts["keypoint_targets"] += len(kp)
        if not training:  # detections: their image's decoded proposals
            dec = [r for r in rec["decode"] if r[0] == "roi_heads"]
            if len(dec) != 1:
                a.bad(f"box head: {len(dec)} decodes, not 1")
            else:
                exact("box head decode reference boxes", dec[0][2], torch.cat(box_pool["boxes"]))
                per_image = dec[0][3].split([len(b) for b in box_pool["boxes"]])
                for i in range(n):
                    pool = box_ops.clip_boxes_to_image(per_image[i].reshape(-1, 4), sizes[i])
                    within(f"image {i} detections", dets[i]["boxes"], pool)
                    a.counts["detections"] += len(dets[i]["boxes"])
        for p in rec["pool"]:
            _check_pooler(a, p, kernel)
    else:
        if training:
            ious("retinanet", anchors)
            pairs = encodes("retinanet") + encodes("retinanet_head")
            if len(pairs) != n:
                a.bad(f"RetinaNet: {len(pairs)} encodes for {n} images")
            for i, (ref, props) in enumerate(pairs[:n]):
                within(f"RetinaNet image {i} matched ground truth", ref, gt[i])
                within(f"RetinaNet image {i} encoded anchors", props, anchors[i])
        else:
            (start, end, levels), = rec["post"]
            (dets,) = rec["dets"]
            calls = rec["decode"][start:end]
            if len(calls) != n * levels:
                a.bad(f"RetinaNet: {len(calls)} decodes for {n} images x {levels} levels")
            for i in range(n):
                mine = calls[i * levels:(i + 1) * levels]
                for _, _, boxes, _ in mine:
                    within(f"image {i} decoded anchors", boxes, anchors[i])
                pool = torch.cat([box_ops.clip_boxes_to_image(out.float(), sizes[i]) for *_, out in mine])
                within(f"image {i} detections", dets[i]["boxes"], pool)
                a.counts["detections"] += len(dets[i]["boxes"])
    if not training:  # what the model returns: the detections resized to the input images, in float32
        for i in range(n):
            exact(f"image {i} output boxes", outputs[i]["boxes"], resize_boxes(dets[i]["boxes"].float(), sizes[i],
                                                                                 originals[i]))
            if "keypoints" in dets[i]:
                exact(f"image {i} output keypoints", outputs[i]["keypoints"],
                      resize_keypoints(dets[i]["keypoints"].float(), sizes[i], originals[i]))
    return a


def _check_pooler(a: BoxAudit, p: Dict, kernel) -> None:
    """What the RoIAlign kernel received (per level: each RoI's image index and float32
    rectangle), and the pooled values of the encoded map (each RoI's own image's)."""
    name, boxes, module = p["name"], p["boxes"], p["module"]
    if any(b.dtype != F32 for b in boxes):
        a.bad(f"{name}: boxes {[b.dtype for b in boxes]}, not float32")
        return
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    calls = kernel.calls[p["start"]:p["end"]]
    if len(calls) != len(module.scales):  # one per feature level
        a.bad(f"{name}: {len(calls)} kernel calls for {len(module.scales)} levels")
        return
    levels = module.map_levels(boxes) if len(calls) > 1 else torch.zeros(len(rois), dtype=torch.int64)
    for lvl, got in enumerate(calls):
        want = rois[levels == lvl]
        a.counts["kernel_rois"] += len(got)
        if got.dtype != F32:
            a.bad(f"{name} level {lvl}: the kernel got {got.dtype} RoIs")
        elif got.shape != want.shape:
            a.bad(f"{name} level {lvl}: the kernel got {len(got)} RoIs, not {len(want)}")
        else:
            wrong_image = int((got[:, 0] != want[:, 0]).sum())
            wrong_rect = int((got[:, 1:] != want[:, 1:]).any(1).sum())
            if wrong_image or wrong_rect:
                a.bad(f"{name} level {lvl}: {wrong_image} RoIs from another image, {wrong_rect} other rectangles")
    out = p["out"]
    reference = module(p["x"], boxes, p["shapes"])  # float32, outside autocast
    wrong = (out.float() != reference.to(out.dtype).float()).flatten(1).any(1)
    if wrong.any():
        a.bad(f"{name}: {int(wrong.sum())} of {len(out)} pooled RoIs are not their image's")
    intended = rois[:, 0] + 1
    readable = (reference[:, 0].flatten(1) - intended[:, None]).abs().amax(1) < 1e-3
    a.counts["pooled"] += len(out)
    a.counts["pooled_readable"] += int(readable.sum())


# ---------------------------------------------------------------------------- in process
def _audited(model, images, targets, dtype) -> BoxAudit:
    audit = audit_boxes(model, images, targets, dtype)
    assert audit.ok, (audit.problems, dict(audit.counts))
    return audit


@pytest.mark.plain
@pytest.mark.plain_pass_only
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=lambda d: DTYPE_KEY[d])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_boxes_stay_float32_exact_and_in_their_image_under_autocast(mini, family, dtype):
    """A training and an inference forward of the family's protocol model on two of its
    images (read from disk by torchvision_data), under autocast: every box, float32 and exact."""
    from scrl_d2.detection.torchvision_model import build_torchvision_detector

    cfg = family_cfg(family, mini)
    images, targets = training_batch(cfg)
    assert images[0].shape != images[1].shape  # padding differs between the images
    torch.manual_seed(0)
    model = build_torchvision_detector(cfg)
    train = _audited(model, images, targets, dtype)
    c = train.counts
    assert c["gt"] > 0 and c["anchors"] > 0 and c["encoded"] > 0, dict(c)
    assert c["matched"] == (2 if family == "retinanet" else 4), dict(c)  # RPN + box head: 2 images each
    if family != "retinanet":
        assert c["proposals"] > 0 and c["kernel_rois"] > 0, dict(c)
        assert c["pooled_readable"] > 0.5 * c["pooled"], dict(c)  # the value check is not vacuous
        if family == "mask_rcnn":
            assert c["mask_targets"] > 0, dict(c)
        if family == "keypoint_rcnn":
            assert c["keypoint_targets"] > 0, dict(c)
    infer = _audited(model, images, None, dtype)
    assert infer.counts["detections"] > 0 and infer.counts["decoded"] > 0, dict(infer.counts)
    if family in ("mask_rcnn", "keypoint_rcnn"):  # the mask / keypoint head pooled the detections
        assert infer.counts["pooled"] > infer.counts["proposals"], dict(infer.counts)


@pytest.mark.plain
@pytest.mark.plain_pass_only
@pytest.mark.parametrize("defect", ["anchors", "rpn_decode", "retinanet_decode", "other_image", "rectangle"])
def test_the_audit_sees_degraded_boxes(mini, monkeypatch, defect):
    """The audit fails on each way boxes have gone wrong under autocast: torchvision's own
    anchor generator (anchors in the maps' dtype) or box coder (decodes in the deltas'
    dtype) on the RPN or RetinaNet, a RoI pooled from the other image, or half a pixel off."""
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import roi_align

    from scrl_d2.detection import torchvision_model as tvm

    family = "retinanet" if defect == "retinanet_decode" else "faster_rcnn"
    cfg = family_cfg(family, mini)
    images, targets = training_batch(cfg)
    torch.manual_seed(0)
    model = tvm.build_torchvision_detector(cfg)
    assert audit_boxes(model, images, targets if defect != "retinanet_decode" else None, torch.bfloat16).ok
    if defect == "anchors":
        ag = model.rpn.anchor_generator
        model.rpn.anchor_generator = AnchorGenerator(ag.sizes, ag.aspect_ratios)
    elif defect == "rpn_decode":
        model.rpn.box_coder = BoxCoder(model.rpn.box_coder.weights)
    elif defect == "retinanet_decode":
        model.box_coder = model.head.regression_head.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    else:
        tampered = []

        def misread(features, rois, *args, **kwargs):
            if not tampered and (rois[:, 0] == 1).any():  # the first level with a RoI of image 1
                rois = rois.clone()
                k = int(torch.nonzero(rois[:, 0] == 1)[0])
                if defect == "other_image":
                    rois[k, 0] = 0
                else:
                    rois[k, 1:] += 0.5
                tampered.append(k)
            return roi_align(features, rois, *args, **kwargs)

        monkeypatch.setattr(tvm, "roi_align", misread)
    bad = audit_boxes(model, images, None if defect == "retinanet_decode" else targets, torch.bfloat16)
    assert not bad.ok
    text = "\n".join(bad.problems)
    expected = {"anchors": "image 0 anchors: torch.bfloat16, not float32",
                "rpn_decode": "rpn decode 0: torch.bfloat16, not float32",
                "retinanet_decode": "image 0 detections: torch.bfloat16, not float32",
                "other_image": "1 RoIs from another image, 0 other rectangles",
                "rectangle": "0 RoIs from another image, 1 other rectangles"}[defect]
    assert expected in text, text
    if defect == "rpn_decode":  # the box head then matched bf16 ground truth against bf16 proposals
        assert "roi_heads image 0 matching ground truth: torch.bfloat16" in text, text
    if defect == "other_image":  # and the pooled values are the other image's
        assert "1 of 128 pooled RoIs are not their image's" in text, text


# ---------------------------------------------------------------------------- two processes
def _save_each_process_final_weights() -> None:
    """In the processes ``python tests/test_finetune_scale.py <tools/train_net.py arguments>`` starts:
    each one's final weights, written after training (``replica_iter<N>_rank<R>.pth``),
    so the test compares what every process ended with."""
    from scrl_d2.detection.torchvision_finetune import TorchvisionDetectionTrainer
    from scrl_d2.utils import comm

    train = TorchvisionDetectionTrainer.train

    def train_then_save(self):
        results = train(self)
        path = os.path.join(self.cfg.OUTPUT_DIR, f"replica_iter{self.iter}_rank{comm.get_rank()}.pth")
        torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, path)
        return results

    TorchvisionDetectionTrainer.train = train_then_save


# what each family's training step sums (Detectron2's names; metrics.json has each)
RPN_LOSSES = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
LOSSES = {"faster_rcnn": RPN_LOSSES, "voc_faster_rcnn": RPN_LOSSES, "mask_rcnn": RPN_LOSSES | {"loss_mask"},
          "keypoint_rcnn": RPN_LOSSES | {"loss_keypoint"}, "retinanet": {"loss_cls", "loss_box_reg"}}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_fine_tunes_with_two_processes_under_each_autocast_dtype(mini, tmp_path, family):
    """The family's protocol config as users run it: ``tools/train_net.py --num-gpus 2``
    (two CPU processes over gloo, SyncBN synchronised, precise BN), a loader worker each,
    two images per process; one iteration and the final evaluation under bf16, then the
    command with ``--resume`` continues under fp16 (each dtype of CPU_DTYPES in turn) for
    one more iteration and evaluates again. Each run: exit 0, every head's loss in the step,
    results.json with the family's metrics, and both processes end with exactly the
    weights and buffers of model_final.pth (what the final evaluation ran on both)."""
    from scrl_d2.transfer.miniature import miniature_overrides
    from scrl_d2.transfer.protocols import get_protocol

    assert torch.bfloat16 in CPU_DTYPES  # CPU autocast has had bf16 since torch 1.10
    p = get_protocol(FAMILIES[family])
    out = str(tmp_path / family)
    env = dict(os.environ, SCRL_D2_BACKEND="torchvision", OMP_NUM_THREADS="1")
    for k, dtype in enumerate(CPU_DTYPES, start=1):
        cmd = [sys.executable, os.path.abspath(__file__), "--num-gpus", "2", *(["--resume"] if k > 1 else []),
               "--config-file", p.config_path, *miniature_overrides(p, mini), *SMALL, "OUTPUT_DIR", out,
               "SOLVER.MAX_ITER", str(k), "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.DTYPE", DTYPE_KEY[dtype]]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
        log = r.stdout + r.stderr
        assert r.returncode == 0, log[-4000:]
        assert "2 process(es)" in log and f"mixed precision {dtype}" in log, log[-4000:]
        if k > 1:
            assert f"resumed at iteration {k - 1}" in log, log[-4000:]
        with open(os.path.join(out, "metrics.json")) as f:
            step = [r for r in map(json.loads, f) if r.get("iteration") == k - 1 and "total_loss" in r][-1]
        assert {m for m in step if m.startswith("loss")} == LOSSES[family], step
        assert math.isfinite(step["total_loss"]) and step["total_loss"] > 0, step
        with open(os.path.join(out, "results.json")) as f:
            results = json.load(f)
        for m in p.metrics:
            task, metric = m.split("/")
            value = results[task][metric]
            assert value is None or math.isfinite(value), (m, results)
        final = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=True)["model"]
        replicas = [torch.load(os.path.join(out, f"replica_iter{k}_rank{rank}.pth"), weights_only=True)
                    for rank in (0, 1)]
        assert final.keys() == replicas[0].keys() == replicas[1].keys()
        for name, v in final.items():
            assert torch.equal(replicas[0][name], v) and torch.equal(replicas[1][name], v), (dtype, name)


if __name__ in ("__main__", "__mp_main__"):  # the command line, and the processes it starts
    _save_each_process_final_weights()
    if __name__ == "__main__":  # what tools/train_net.py runs (in-process: spawned workers re-run this file)
        from scrl_d2.cli.train_net import cli

        cli()
