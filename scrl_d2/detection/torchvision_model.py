"""Faster / Mask R-CNN with a ResNet-FPN backbone from torchvision, built from the same
Detectron2-style config keys (norms per layer, 4conv1fc box head, anchors, RPN/ROI
sampling, pixel mean/std in 0-255 RGB)."""
import logging
from typing import Callable, List, Optional

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..checkpoint import LayoutError, d2_to_torchvision, extract_encoder, load_checkpoint_file
from ..modeling.layers import SyncBatchNorm

__all__ = ["build_torchvision_detector", "norm_layer", "load_detector_weights"]

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
    for coder_owner in (model.rpn, model.roi_heads):
        c = coder_owner.box_coder
        coder_owner.box_coder = Float32BoxCoder(c.weights, c.bbox_xform_clip)
    model.rpn.anchor_generator.__class__ = Float32AnchorGenerator
    return model


def _resnet_fpn(cfg) -> BackboneWithFPN:
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
    return BackboneWithFPN(body, return_layers, in_channels, cfg.MODEL.FPN.OUT_CHANNELS,
                           extra_blocks=LastLevelMaxPool(), norm_layer=norm_layer(cfg.MODEL.FPN.NORM, "MODEL.FPN.NORM"))


def build_torchvision_detector(cfg) -> nn.Module:
    if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN":
        raise ValueError(f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE!r}: the torchvision fine-tuner "
                         "builds 'GeneralizedRCNN' (Faster / Mask R-CNN FPN)")
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
    if cfg.INPUT.FORMAT != "RGB":
        raise ValueError(f"INPUT.FORMAT {cfg.INPUT.FORMAT!r}: the torchvision path reads RGB images (and SCRL "
                         "pretrains on RGB); set INPUT.FORMAT RGB with RGB PIXEL_MEAN/PIXEL_STD")
    if cfg.MODEL.MASK_ON:
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
