"""Faster / Mask / Keypoint R-CNN and RetinaNet with a ResNet-FPN backbone from
torchvision, built from the same Detectron2 config keys (norms per layer, 2fc or conv+fc
box head, anchors, RPN/ROI sampling, RetinaNet matching and test thresholds, pixel
mean/std in 0-255 RGB). R50-C4 (``Res5ROIHeads*``) has no torchvision counterpart: those
protocols run with Detectron2."""
import logging
from typing import Callable, List, Optional

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, KeypointRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ..checkpoint import LayoutError, d2_to_torchvision, extract_encoder, load_checkpoint_file
from ..modeling.layers import SyncBatchNorm

__all__ = ["build_torchvision_detector", "norm_layer", "load_detector_weights", "DETECTION_ARCHITECTURES"]

DETECTION_ARCHITECTURES = ("GeneralizedRCNN", "RetinaNet")

logger = logging.getLogger("scrl_d2.detection")


def norm_layer(norm: str, key: str) -> Optional[Callable[[int], nn.Module]]:
    """Detectron2 norm names as torchvision ``norm_layer`` factories."""
    table = {"": None, "BN": nn.BatchNorm2d, "SyncBN": SyncBatchNorm, "FrozenBN": FrozenBatchNorm2d,
             "GN": lambda c: nn.GroupNorm(32, c), "naiveSyncBN": SyncBatchNorm, "naiveSyncBN_N": SyncBatchNorm}
    if norm not in table:
        raise ValueError(f"{key}: unknown norm {norm!r}; use one of {sorted(k for k in table if k)} or ''")
    return table[norm]


class Float32AnchorGenerator(AnchorGenerator):
    """torchvision makes anchors in the feature maps' dtype: under bf16 autocast an
    anchor's corners (up to ~1333 px) would round to 4-8 px. Always float32."""

    def set_cell_anchors(self, dtype: torch.dtype, device: torch.device) -> None:
        super().set_cell_anchors(torch.float32, device)


class Float32BoxCoder(BoxCoder):
    """torchvision decodes boxes in the deltas' dtype (bf16 / fp16 under autocast), so
    proposals and detections would lose whole pixels; decode in float32 as Detectron2's
    ``Box2BoxTransform`` does."""

    def decode(self, rel_codes: torch.Tensor, boxes: List[torch.Tensor]) -> torch.Tensor:
        return super().decode(rel_codes.float(), [b.float() for b in boxes])


def _exact_boxes(model: nn.Module) -> nn.Module:
    """Box coordinates in float32 whatever the autocast dtype (anchors, proposals, detections)."""
    if isinstance(model, RetinaNet):
        c = model.box_coder
        model.box_coder = Float32BoxCoder(c.weights, c.bbox_xform_clip)
        model.head.regression_head.box_coder = model.box_coder
        model.anchor_generator.__class__ = Float32AnchorGenerator
        return model
    for coder_owner in (model.rpn, model.roi_heads):
        c = coder_owner.box_coder
        coder_owner.box_coder = Float32BoxCoder(c.weights, c.bbox_xform_clip)
    model.rpn.anchor_generator.__class__ = Float32AnchorGenerator
    return model


class RetinaNetFromOne(RetinaNet):
    """torchvision's RetinaNet indexes its class logits by label (0..C-1); the datasets give
    R-CNN labels 1..C (0 = background). Shift in and out, so outputs match the R-CNNs'."""

    def forward(self, images, targets=None):
        if targets is not None:
            targets = [dict(t, labels=t["labels"] - 1) for t in targets]
        out = super().forward(images, targets)
        if not self.training:
            for o in out:
                o["labels"] = o["labels"] + 1
        return out


def _resnet_fpn(cfg, retinanet: bool = False) -> BackboneWithFPN:
    r = cfg.MODEL.RESNETS
    depth = r.DEPTH
    if depth not in (18, 34, 50, 101, 152):
        raise ValueError(f"MODEL.RESNETS.DEPTH: {depth} is not 18/34/50/101/152")
    if r.STRIDE_IN_1X1:
        raise ValueError("MODEL.RESNETS.STRIDE_IN_1X1 True (Caffe2-style ResNet) is not available in torchvision; "
                         "use False (torchvision / ResNet v1.5, what SCRL pretrains)")
    body = getattr(torchvision.models, f"resnet{depth}")(weights=None,
                                                          norm_layer=norm_layer(r.NORM, "MODEL.RESNETS.NORM") or nn.Identity)
    freeze_at = cfg.MODEL.BACKBONE.FREEZE_AT  # Detectron2: 1 = stem, 2 = stem + res2, ...
    stages = [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    for names in stages[:freeze_at]:
        for n in names:
            for p in getattr(body, n).parameters():
                p.requires_grad_(False)
    in_features = cfg.MODEL.FPN.IN_FEATURES
    return_layers = {f"layer{int(f[3]) - 1}": str(i) for i, f in enumerate(in_features)}
    width = 64 if depth < 50 else 256
    in_channels = [width * 2 ** (int(f[3]) - 2) for f in in_features]
    # RetinaNet: P6 from C5 and P7 from P6, as Detectron2's retinanet backbone
    extra = LastLevelP6P7(in_channels[-1], cfg.MODEL.FPN.OUT_CHANNELS) if retinanet else LastLevelMaxPool()
    return BackboneWithFPN(body, return_layers, in_channels, cfg.MODEL.FPN.OUT_CHANNELS,
                           extra_blocks=extra, norm_layer=norm_layer(cfg.MODEL.FPN.NORM, "MODEL.FPN.NORM"))


def _retinanet(cfg) -> nn.Module:
    r, ag, i = cfg.MODEL.RETINANET, cfg.MODEL.ANCHOR_GENERATOR, cfg.INPUT
    for key, value, ok, expected in (
            ("NUM_CONVS", r.NUM_CONVS, r.NUM_CONVS == 4, "4 (torchvision's head)"),
            ("PRIOR_PROB", r.PRIOR_PROB, r.PRIOR_PROB == 0.01, "0.01 (torchvision's head)"),
            ("SMOOTH_L1_LOSS_BETA", r.SMOOTH_L1_LOSS_BETA, r.BBOX_REG_LOSS_TYPE == "smooth_l1"
             and r.SMOOTH_L1_LOSS_BETA == 0.0, "0.0 with BBOX_REG_LOSS_TYPE smooth_l1 (an L1 loss, as "
             "Detectron2's RetinaNet configs and torchvision's RetinaNet)"),
            ("FOCAL_LOSS_GAMMA", r.FOCAL_LOSS_GAMMA, r.FOCAL_LOSS_GAMMA == 2.0, "2.0 (torchvision's loss)"),
            ("FOCAL_LOSS_ALPHA", r.FOCAL_LOSS_ALPHA, r.FOCAL_LOSS_ALPHA == 0.25, "0.25 (torchvision's loss)")):
        if not ok:
            raise ValueError(f"MODEL.RETINANET.{key}: {value!r} is not available on the torchvision path; "
                             f"expected {expected}, or install Detectron2")
    backbone = _resnet_fpn(cfg, retinanet=True)
    sizes = tuple(tuple(s) for s in ag.SIZES)
    ratios = tuple(tuple(a) for a in ag.ASPECT_RATIOS) * (len(sizes) if len(ag.ASPECT_RATIOS) == 1 else 1)
    anchors = AnchorGenerator(sizes, ratios)
    norm = norm_layer(r.NORM, "MODEL.RETINANET.NORM")
    head = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], r.NUM_CLASSES,
                         norm_layer=norm)
    lo, hi = r.IOU_THRESHOLDS
    return RetinaNetFromOne(
        backbone, num_classes=None, min_size=tuple(i.MIN_SIZE_TRAIN), max_size=i.MAX_SIZE_TRAIN,
        image_mean=[m / 255.0 for m in cfg.MODEL.PIXEL_MEAN], image_std=[s / 255.0 for s in cfg.MODEL.PIXEL_STD],
        anchor_generator=anchors, head=head, score_thresh=r.SCORE_THRESH_TEST, nms_thresh=r.NMS_THRESH_TEST,
        detections_per_img=cfg.TEST.DETECTIONS_PER_IMAGE, fg_iou_thresh=hi, bg_iou_thresh=lo,
        topk_candidates=r.TOPK_CANDIDATES_TEST)


def build_torchvision_detector(cfg) -> nn.Module:
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch not in DETECTION_ARCHITECTURES:
        raise ValueError(f"MODEL.META_ARCHITECTURE {arch!r}: the torchvision fine-tuner builds "
                         f"{list(DETECTION_ARCHITECTURES)}")
    if cfg.INPUT.FORMAT != "RGB":
        raise ValueError(f"INPUT.FORMAT {cfg.INPUT.FORMAT!r}: the torchvision path reads RGB images (and SCRL "
                         "pretrains on RGB); set INPUT.FORMAT RGB with RGB PIXEL_MEAN/PIXEL_STD")
    if arch == "RetinaNet":
        return _exact_boxes(_retinanet(cfg))
    if cfg.MODEL.ROI_HEADS.NAME != "StandardROIHeads" or not cfg.MODEL.FPN.IN_FEATURES:
        raise ValueError(f"MODEL.ROI_HEADS.NAME {cfg.MODEL.ROI_HEADS.NAME!r}: the torchvision path builds the FPN "
                         "R-CNNs (StandardROIHeads on an FPN); the C4 protocols (Res5ROIHeads*) need Detectron2: "
                         "install it (see README, 'Detectron2 backend')")
    if cfg.MODEL.MASK_ON and cfg.MODEL.KEYPOINT_ON:
        raise ValueError("MODEL.MASK_ON and MODEL.KEYPOINT_ON together: the torchvision path builds one of them")
    backbone = _resnet_fpn(cfg)
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1  # + background
    out_ch = cfg.MODEL.FPN.OUT_CHANNELS
    ag = cfg.MODEL.ANCHOR_GENERATOR
    sizes = tuple(tuple(s) for s in ag.SIZES)
    ratios = tuple(tuple(a) for a in ag.ASPECT_RATIOS) * (len(sizes) if len(ag.ASPECT_RATIOS) == 1 else 1)
    bh = cfg.MODEL.ROI_BOX_HEAD
    res = bh.POOLER_RESOLUTION
    if bh.NUM_CONV > 0:
        box_head = FastRCNNConvFCHead((out_ch, res, res), [bh.CONV_DIM] * bh.NUM_CONV, [bh.FC_DIM] * bh.NUM_FC,
                                      norm_layer=norm_layer(bh.NORM, "MODEL.ROI_BOX_HEAD.NORM"))
    else:
        if bh.NUM_FC != 2:
            raise ValueError("MODEL.ROI_BOX_HEAD: without convs the torchvision path supports NUM_FC 2 (2fc head)")
        box_head = TwoMLPHead(out_ch * res * res, bh.FC_DIM)
    i, rpn, roi, t = cfg.INPUT, cfg.MODEL.RPN, cfg.MODEL.ROI_HEADS, cfg.TEST
    kwargs = dict(
        min_size=tuple(i.MIN_SIZE_TRAIN), max_size=i.MAX_SIZE_TRAIN,
        image_mean=[m / 255.0 for m in cfg.MODEL.PIXEL_MEAN], image_std=[s / 255.0 for s in cfg.MODEL.PIXEL_STD],
        rpn_anchor_generator=AnchorGenerator(sizes, ratios),
        rpn_pre_nms_top_n_train=rpn.PRE_NMS_TOPK_TRAIN, rpn_pre_nms_top_n_test=rpn.PRE_NMS_TOPK_TEST,
        rpn_post_nms_top_n_train=rpn.POST_NMS_TOPK_TRAIN, rpn_post_nms_top_n_test=rpn.POST_NMS_TOPK_TEST,
        rpn_nms_thresh=rpn.NMS_THRESH, rpn_batch_size_per_image=rpn.BATCH_SIZE_PER_IMAGE,
        rpn_positive_fraction=rpn.POSITIVE_FRACTION, box_head=box_head,
        box_predictor=FastRCNNPredictor(bh.FC_DIM, num_classes), box_score_thresh=roi.SCORE_THRESH_TEST,
        box_nms_thresh=roi.NMS_THRESH_TEST, box_detections_per_img=t.DETECTIONS_PER_IMAGE,
        box_batch_size_per_image=roi.BATCH_SIZE_PER_IMAGE, box_positive_fraction=roi.POSITIVE_FRACTION,
    )
    if cfg.MODEL.KEYPOINT_ON:
        kh = cfg.MODEL.ROI_KEYPOINT_HEAD
        model = KeypointRCNN(backbone, num_classes=None,
                             keypoint_head=KeypointRCNNHeads(out_ch, list(kh.CONV_DIMS)),
                             keypoint_predictor=KeypointRCNNPredictor(kh.CONV_DIMS[-1], kh.NUM_KEYPOINTS), **kwargs)
    elif cfg.MODEL.MASK_ON:
        mh = cfg.MODEL.ROI_MASK_HEAD
        mask_head = MaskRCNNHeads(out_ch, [mh.CONV_DIM] * mh.NUM_CONV, 1,
                                  norm_layer=norm_layer(mh.NORM, "MODEL.ROI_MASK_HEAD.NORM"))
        model = MaskRCNN(backbone, num_classes=None, mask_head=mask_head,
                         mask_predictor=MaskRCNNPredictor(mh.CONV_DIM, mh.CONV_DIM, num_classes), **kwargs)
    else:
        model = FasterRCNN(backbone, num_classes=None, **kwargs)
    return _exact_boxes(model)


def load_detector_weights(model: nn.Module, path: str) -> str:
    """MODEL.WEIGHTS into the detector: a whole detection checkpoint of this path, or
    pretrained backbone weights in any layout ``tools/convert.py`` reads (a converted
    ``.pkl`` / ``.pth``, one of our pretraining checkpoints, the official release, a
    torchvision ResNet). Returns what was loaded."""
    if path.endswith(".pkl"):
        import pickle

        try:
            with open(path, "rb") as f:
                ckpt = pickle.load(f, encoding="latin1")
        except FileNotFoundError:
            raise FileNotFoundError(f"MODEL.WEIGHTS: file not found: {path}") from None
        ckpt = {"model": {k: torch.as_tensor(v) for k, v in ckpt.get("model", ckpt).items()}}
    else:
        try:
            ckpt = load_checkpoint_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"MODEL.WEIGHTS: file not found: {path}") from None
    state = ckpt.get("model", {}) if isinstance(ckpt, dict) else {}
    if any(k.startswith("backbone.body.") for k in state):
        model.load_state_dict(state, strict=True)
        return "a whole detector"
    try:
        layout, enc, _ = extract_encoder(ckpt)
    except LayoutError as e:
        raise ValueError(f"MODEL.WEIGHTS {path}: {e}") from e
    tv = {d2_to_torchvision(k): v for k, v in enc.items()}
    body = model.backbone.body
    result = body.load_state_dict(tv, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(f"MODEL.WEIGHTS {path}: backbone keys missing {missing[:5]} / unexpected "
                         f"{result.unexpected_keys[:5]} (a different MODEL.RESNETS.DEPTH?)")
    return f"the backbone ({layout} layout, {len(tv)} tensors)"
