"""Faster / Mask / Keypoint R-CNN and RetinaNet with a ResNet-FPN backbone from
torchvision, built from the same Detectron2 config keys, with Detectron2's meaning for
each (``torchvision_keys.py`` says which key is honoured, refused or irrelevant): norms
per layer and FrozenBN in frozen stages, 2fc or conv+fc box head, pooler resolutions,
anchors, RPN/ROI sampling and losses (smooth-L1 beta), mask targets of both mask
formats, ResizeShortestEdge's size sampling, RetinaNet matching and test thresholds,
pixel mean/std in 0-255 RGB. R50-C4 (``Res5ROIHeads*``) has no torchvision counterpart:
those protocols run with Detectron2."""
import contextlib
import functools
import logging
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from pycocotools import mask as mask_utils
from torch import nn
from torchvision.models.detection import FasterRCNN, KeypointRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign, roi_align
from torchvision.ops import poolers as tv_poolers
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ..checkpoint import LayoutError, d2_to_torchvision, extract_encoder, load_checkpoint_file, load_pickle_file
from ..config import ConfigError
from ..config.detection_defaults import DETECTION_ARCHITECTURES
from ..modeling.layers import SyncBatchNorm
from ..utils.errors import InputFileNotFoundError, InputValueError
from .torchvision_keys import check_torchvision_keys

__all__ = ["build_torchvision_detector", "norm_layer", "load_detector_weights", "DETECTION_ARCHITECTURES",
           "PolygonMasks"]


logger = logging.getLogger("scrl_d2.detection")


def norm_layer(norm: str, key: str) -> Optional[Callable[[int], nn.Module]]:
    """Detectron2 norm names as torchvision ``norm_layer`` factories."""
    table = {"": None, "BN": nn.BatchNorm2d, "SyncBN": SyncBatchNorm, "FrozenBN": FrozenBatchNorm2d,
             "GN": lambda c: nn.GroupNorm(32, c), "naiveSyncBN": SyncBatchNorm, "naiveSyncBN_N": SyncBatchNorm}
    if norm not in table:
        raise InputValueError(f"{key}: unknown norm {norm!r}; use one of {sorted(k for k in table if k)} or ''")
    return table[norm]


class Float32AnchorGenerator(AnchorGenerator):
    """Detectron2's DefaultAnchorGenerator on torchvision's: cell anchors not rounded to
    whole pixels (torchvision rounds, e.g. a 40.3 px RetinaNet anchor to 40), and always
    float32 (torchvision makes them in the feature maps' dtype: under bf16 autocast an
    anchor's corners, up to ~1333 px, would round to 4-8 px)."""

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
        scales = torch.as_tensor(scales, dtype=torch.float32, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32, device=device)
        ws = (scales[None, :] / torch.sqrt(ratios)[:, None]).reshape(-1)
        hs = (scales[None, :] * torch.sqrt(ratios)[:, None]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def set_cell_anchors(self, dtype: torch.dtype, device: torch.device) -> None:
        super().set_cell_anchors(torch.float32, device)


def _anchors(cfg, levels: int) -> Float32AnchorGenerator:
    """MODEL.ANCHOR_GENERATOR as Detectron2 reads it: one list of sizes (or ratios) is
    given to every level."""
    ag = cfg.MODEL.ANCHOR_GENERATOR
    sizes = [tuple(s) for s in ag.SIZES]
    ratios = [tuple(a) for a in ag.ASPECT_RATIOS]
    sizes, ratios = (sizes * levels if len(sizes) == 1 else sizes), (ratios * levels if len(ratios) == 1 else ratios)
    if len(sizes) != levels or len(ratios) != levels:
        raise ConfigError(f"MODEL.ANCHOR_GENERATOR: {len(sizes)} SIZES / {len(ratios)} ASPECT_RATIOS lists for "
                          f"{levels} feature levels; give one list, or one per level")
    return Float32AnchorGenerator(tuple(sizes), tuple(ratios))


class Float32BoxCoder(BoxCoder):
    """torchvision decodes boxes in the deltas' dtype (bf16 / fp16 under autocast: it casts
    the anchors / proposals to it), so proposals and detections would lose whole pixels;
    decode in float32 as Detectron2's ``Box2BoxTransform`` does, at both entry points:
    ``decode`` (RPN proposals, R-CNN detections) and ``decode_single`` (which RetinaNet's
    detections call directly)."""

    def decode(self, rel_codes: torch.Tensor, boxes: List[torch.Tensor]) -> torch.Tensor:
        return super().decode(rel_codes.float(), [b.float() for b in boxes])

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return super().decode_single(rel_codes.float(), boxes.float())


def _exact_boxes(model: nn.Module) -> nn.Module:
    """Box coordinates in float32 whatever the autocast dtype (anchors, proposals, detections)."""
    if isinstance(model, RetinaNet):
        c = model.box_coder
        model.box_coder = Float32BoxCoder(c.weights, c.bbox_xform_clip)
        model.head.regression_head.box_coder = model.box_coder
        return model
    for coder_owner in (model.rpn, model.roi_heads):
        c = coder_owner.box_coder
        coder_owner.box_coder = Float32BoxCoder(c.weights, c.bbox_xform_clip)
    return model


class RetinaNetFromOne(RetinaNet):
    """torchvision's RetinaNet indexes its class logits by label (0..C-1); the datasets give
    R-CNN labels 1..C (0 = background). Shift in and out, so outputs match the R-CNNs'.
    Its losses carry Detectron2's names (``loss_cls``, ``loss_box_reg``): the training
    step sums, and the metrics report, the outputs named ``loss*``."""

    LOSS_NAMES = {"classification": "loss_cls", "bbox_regression": "loss_box_reg"}

    def forward(self, images, targets=None):
        if targets is not None:
            targets = [dict(t, labels=t["labels"] - 1) for t in targets]
        out = super().forward(images, targets)
        if self.training:
            return {self.LOSS_NAMES[k]: v for k, v in out.items()}
        for o in out:
            o["labels"] = o["labels"] + 1
        return out


def _frozen(module: nn.Module) -> nn.Module:
    """Detectron2's ``freeze()``: no gradients, and every BatchNorm (SyncBN too) becomes a
    FrozenBN so its statistics stop moving as well (``requires_grad`` alone leaves them
    updating in training mode). Returns the module, converted in place below the top."""
    for p in module.parameters():
        p.requires_grad_(False)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        if module.track_running_stats:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = _frozen(child)
        if new is not child:
            setattr(module, name, new)
    return module


def _resnet_fpn(cfg, retinanet: bool = False) -> BackboneWithFPN:
    r = cfg.MODEL.RESNETS
    depth = r.DEPTH
    body = getattr(torchvision.models, f"resnet{depth}")(weights=None,
                                                          norm_layer=norm_layer(r.NORM, "MODEL.RESNETS.NORM") or nn.Identity)
    # Detectron2's FREEZE_AT: 1 = stem, 2 = stem + res2, ...
    stages = [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    for names in stages[:cfg.MODEL.BACKBONE.FREEZE_AT]:
        for n in names:
            setattr(body, n, _frozen(getattr(body, n)))
    in_features = cfg.MODEL.FPN.IN_FEATURES
    return_layers = {f"layer{int(f[3]) - 1}": str(i) for i, f in enumerate(in_features)}
    width = 64 if depth < 50 else 256
    in_channels = [width * 2 ** (int(f[3]) - 2) for f in in_features]
    if retinanet:  # P6 from C5 and P7 from P6, as Detectron2's retinanet backbone (never from P5)
        extra = LastLevelP6P7(in_channels[-1], cfg.MODEL.FPN.OUT_CHANNELS)
        extra.use_P5 = False
    else:
        extra = LastLevelMaxPool()
    return BackboneWithFPN(body, return_layers, in_channels, cfg.MODEL.FPN.OUT_CHANNELS,
                           extra_blocks=extra, norm_layer=norm_layer(cfg.MODEL.FPN.NORM, "MODEL.FPN.NORM"))


class PolygonMasks:
    """One image's instance polygons (Detectron2's ``INPUT.MASK_FORMAT polygon``), in image
    pixels, carried through flips and resizing. Mask targets are rasterised inside each
    proposal box at the head's resolution, as Detectron2's ``PolygonMasks.crop_and_resize``."""

    def __init__(self, polygons: List[List[np.ndarray]]):
        self.polygons = [[np.asarray(p, dtype=np.float64) for p in inst if len(p) >= 6] for inst in polygons]

    def __len__(self) -> int:
        return len(self.polygons)

    def _map(self, fn) -> "PolygonMasks":
        out = PolygonMasks([])
        out.polygons = [[fn(p.copy()) for p in inst] for inst in self.polygons]
        return out

    def flip(self, width: float = 0.0, height: float = 0.0) -> "PolygonMasks":
        """Mirror x about ``width`` (horizontal) or y about ``height`` (vertical)."""
        def f(p):
            if width:
                p[0::2] = width - p[0::2]
            if height:
                p[1::2] = height - p[1::2]
            return p
        return self._map(f)

    def scale(self, sx: float, sy: float) -> "PolygonMasks":
        def f(p):
            p[0::2] *= sx
            p[1::2] *= sy
            return p
        return self._map(f)

    def crop_and_resize(self, boxes: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
        out = torch.zeros((len(index), size, size), dtype=torch.float32)
        for k, (i, box) in enumerate(zip(index.tolist(), boxes.detach().float().cpu().tolist())):
            x0, y0, x1, y1 = box
            sx, sy = size / max(x1 - x0, 0.1), size / max(y1 - y0, 0.1)
            polys = [np.stack([(p[0::2] - x0) * sx, (p[1::2] - y0) * sy], axis=1).ravel().tolist()
                     for p in self.polygons[i]]
            if polys:
                rle = mask_utils.merge(mask_utils.frPyObjects(polys, size, size))
                out[k] = torch.from_numpy(mask_utils.decode(rle).astype(np.float32))
        return out.to(boxes.device)


def _mask_targets(gt_masks, boxes: torch.Tensor, matched_idxs: torch.Tensor, size: int) -> torch.Tensor:
    """Detectron2's mask targets: polygons rasterised in the box, or (``bitmask``) the
    full-image mask cropped with an aligned RoIAlign and thresholded at 0.5 (torchvision
    would use an unaligned, unthresholded crop)."""
    if isinstance(gt_masks, PolygonMasks):
        return gt_masks.crop_and_resize(boxes, matched_idxs, size)
    rois = torch.cat([matched_idxs.to(boxes)[:, None], boxes], dim=1)
    crops = roi_align(gt_masks[:, None].to(rois), rois, (size, size), 1.0, sampling_ratio=0, aligned=True)[:, 0]
    return (crops >= 0.5).to(rois.dtype)


def _box_loss(beta: float):
    """Fast R-CNN losses with Detectron2's smooth-L1 ``beta`` (0: L1); torchvision fixes 1/9."""
    def loss(class_logits, box_regression, labels, regression_targets):
        labels, targets = torch.cat(labels), torch.cat(regression_targets)
        cls = F.cross_entropy(class_logits, labels)
        fg = torch.where(labels > 0)[0]
        deltas = box_regression.reshape(class_logits.shape[0], -1, 4)[fg, labels[fg]]
        box = F.smooth_l1_loss(deltas, targets[fg], beta=beta, reduction="sum") / max(labels.numel(), 1)
        return cls, box
    return loss


@contextlib.contextmanager
def _swapped(module, **names):
    old = {n: getattr(module, n) for n in names}
    for n, v in names.items():
        setattr(module, n, v)
    try:
        yield
    finally:
        for n, v in old.items():
            setattr(module, n, v)


class D2Pooler(MultiScaleRoIAlign):
    """torchvision's multi-level RoIAlign with Detectron2's POOLER_TYPE: ``ROIAlignV2`` is
    the half-pixel-aligned RoIAlign (torchvision's pooler is the unaligned ``ROIAlign``)."""

    def __init__(self, featmap_names: List[str], resolution: int, sampling_ratio: int, aligned: bool):
        super().__init__(featmap_names, resolution, sampling_ratio)
        self.aligned = aligned

    def forward(self, *args, **kwargs):
        with _swapped(tv_poolers, roi_align=functools.partial(roi_align, aligned=self.aligned)):
            return super().forward(*args, **kwargs)


class D2RoIHeads(RoIHeads):
    """torchvision's RoIHeads with Detectron2's box loss beta and mask targets."""
    smooth_l1_beta = 0.0

    def forward(self, *args, **kwargs):
        with _swapped(tv_roi_heads, fastrcnn_loss=_box_loss(self.smooth_l1_beta),
                      project_masks_on_boxes=_mask_targets):
            return super().forward(*args, **kwargs)


class D2RPN(RegionProposalNetwork):
    """torchvision's RPN with Detectron2's loss: smooth-L1 ``beta`` (0: L1), both terms
    summed over the sampled anchors and divided by BATCH_SIZE_PER_IMAGE x images."""
    smooth_l1_beta = 0.0

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        pos, neg = self.fg_bg_sampler(labels)
        pos, neg = torch.where(torch.cat(pos))[0], torch.where(torch.cat(neg))[0]
        sampled = torch.cat([pos, neg])
        normalizer = self.fg_bg_sampler.batch_size_per_image * len(labels)
        labels, targets = torch.cat(labels), torch.cat(regression_targets)
        box = F.smooth_l1_loss(pred_bbox_deltas[pos], targets[pos], beta=self.smooth_l1_beta, reduction="sum")
        obj = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled], reduction="sum")
        return obj / normalizer, box / normalizer


class D2Transform(GeneralizedRCNNTransform):
    """Detectron2's ResizeShortestEdge: the training size drawn from MIN_SIZE_TRAIN
    ('choice') or uniformly from its [min, max] ('range'), MAX_SIZE_TRAIN; in evaluation
    MIN_SIZE_TEST / MAX_SIZE_TEST (torchvision would use the last training size); polygons
    resized with boxes."""
    sampling = "choice"
    test_sizes = None  # (MIN_SIZE_TEST, MAX_SIZE_TEST)

    def torch_choice(self, k: List[int]) -> int:
        if self.sampling == "range":
            return int(torch.randint(int(k[0]), int(k[-1]) + 1, ()).item())
        return super().torch_choice(k)

    def resize(self, image, target=None):
        polygons = target.pop("masks") if target is not None and isinstance(target.get("masks"),
                                                                            PolygonMasks) else None
        h, w = image.shape[-2:]
        if self.training or self.test_sizes is None:
            image, target = super().resize(image, target)
        else:
            train_sizes = self.min_size, self.max_size
            self.min_size, self.max_size = (self.test_sizes[0],), self.test_sizes[1]
            try:
                image, target = super().resize(image, target)
            finally:
                self.min_size, self.max_size = train_sizes
        if polygons is not None:
            target["masks"] = polygons.scale(image.shape[-1] / w, image.shape[-2] / h)
        return image, target


class CycleBatchNorm(nn.Module):
    """Detectron2's RetinaNet head norm (``CycleBatchNormList``): the head runs once per
    FPN level with shared convs and shared affine parameters, but each level keeps its own
    batch statistics; call k uses level k % levels."""

    def __init__(self, channels: int, levels: int, bn_class):
        super().__init__()
        self.norms = nn.ModuleList([bn_class(channels, affine=False) for _ in range(levels)])
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self._next = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norms[self._next](x)
        self._next = (self._next + 1) % len(self.norms)
        return y * self.weight[:, None, None].to(y.dtype) + self.bias[:, None, None].to(y.dtype)


def _retinanet(cfg) -> nn.Module:
    r, i = cfg.MODEL.RETINANET, cfg.INPUT
    backbone = _resnet_fpn(cfg, retinanet=True)
    anchors = _anchors(cfg, len(r.IN_FEATURES))
    norm = norm_layer(r.NORM, "MODEL.RETINANET.NORM")
    if norm is not None and r.NORM in ("BN", "SyncBN"):  # as Detectron2's head: other norms are shared
        bn_class = norm
        norm = lambda c: CycleBatchNorm(c, len(r.IN_FEATURES), bn_class)  # noqa: E731
    head = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], r.NUM_CLASSES,
                         norm_layer=norm)
    lo, hi = r.IOU_THRESHOLDS
    return RetinaNetFromOne(
        backbone, num_classes=None, min_size=tuple(i.MIN_SIZE_TRAIN), max_size=i.MAX_SIZE_TRAIN,
        image_mean=[m / 255.0 for m in cfg.MODEL.PIXEL_MEAN], image_std=[s / 255.0 for s in cfg.MODEL.PIXEL_STD],
        anchor_generator=anchors, head=head, score_thresh=r.SCORE_THRESH_TEST, nms_thresh=r.NMS_THRESH_TEST,
        detections_per_img=cfg.TEST.DETECTIONS_PER_IMAGE, fg_iou_thresh=hi, bg_iou_thresh=lo,
        topk_candidates=r.TOPK_CANDIDATES_TEST)


def _with_d2_input(model: nn.Module, cfg) -> nn.Module:
    model.transform.__class__ = D2Transform
    model.transform.sampling = cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    model.transform.test_sizes = (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    return model


def build_torchvision_detector(cfg) -> nn.Module:
    """The detector of ``cfg``; a value this path cannot honour raises ConfigError naming the key."""
    check_torchvision_keys(cfg)
    if cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
        return _with_d2_input(_exact_boxes(_retinanet(cfg)), cfg)
    if cfg.MODEL.MASK_ON and cfg.MODEL.KEYPOINT_ON:
        raise InputValueError("MODEL.MASK_ON and MODEL.KEYPOINT_ON together: the torchvision path builds one of them")
    backbone = _resnet_fpn(cfg)
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1  # + background
    out_ch = cfg.MODEL.FPN.OUT_CHANNELS
    # Detectron2's p2..p5 are this backbone's "0".."3" (in FPN.IN_FEATURES order)
    level = {f"p{f[3]}": str(k) for k, f in enumerate(cfg.MODEL.FPN.IN_FEATURES)}
    pool_levels = [level[f] for f in cfg.MODEL.ROI_HEADS.IN_FEATURES]

    def pooler(head) -> D2Pooler:
        return D2Pooler(pool_levels, head.POOLER_RESOLUTION, head.POOLER_SAMPLING_RATIO,
                        aligned=head.POOLER_TYPE == "ROIAlignV2")

    bh = cfg.MODEL.ROI_BOX_HEAD
    res = bh.POOLER_RESOLUTION
    if bh.NUM_CONV == 0 and bh.NUM_FC == 2:  # Detectron2's 2fc head (torchvision's names fc6 / fc7)
        box_head = TwoMLPHead(out_ch * res * res, bh.FC_DIM)
    else:
        box_head = FastRCNNConvFCHead((out_ch, res, res), [bh.CONV_DIM] * bh.NUM_CONV, [bh.FC_DIM] * bh.NUM_FC,
                                      norm_layer=norm_layer(bh.NORM, "MODEL.ROI_BOX_HEAD.NORM"))
    i, rpn, roi, t = cfg.INPUT, cfg.MODEL.RPN, cfg.MODEL.ROI_HEADS, cfg.TEST
    kwargs = dict(
        min_size=tuple(i.MIN_SIZE_TRAIN), max_size=i.MAX_SIZE_TRAIN,
        image_mean=[m / 255.0 for m in cfg.MODEL.PIXEL_MEAN], image_std=[s / 255.0 for s in cfg.MODEL.PIXEL_STD],
        rpn_anchor_generator=_anchors(cfg, len(cfg.MODEL.RPN.IN_FEATURES)),
        rpn_pre_nms_top_n_train=rpn.PRE_NMS_TOPK_TRAIN, rpn_pre_nms_top_n_test=rpn.PRE_NMS_TOPK_TEST,
        rpn_post_nms_top_n_train=rpn.POST_NMS_TOPK_TRAIN, rpn_post_nms_top_n_test=rpn.POST_NMS_TOPK_TEST,
        rpn_nms_thresh=rpn.NMS_THRESH, rpn_batch_size_per_image=rpn.BATCH_SIZE_PER_IMAGE,
        rpn_positive_fraction=rpn.POSITIVE_FRACTION, box_roi_pool=pooler(bh), box_head=box_head,
        box_predictor=FastRCNNPredictor(bh.FC_DIM, num_classes), box_score_thresh=roi.SCORE_THRESH_TEST,
        box_nms_thresh=roi.NMS_THRESH_TEST, box_detections_per_img=t.DETECTIONS_PER_IMAGE,
        box_batch_size_per_image=roi.BATCH_SIZE_PER_IMAGE, box_positive_fraction=roi.POSITIVE_FRACTION,
    )
    if cfg.MODEL.KEYPOINT_ON:
        kh = cfg.MODEL.ROI_KEYPOINT_HEAD
        model = KeypointRCNN(backbone, num_classes=None, keypoint_roi_pool=pooler(kh),
                             keypoint_head=KeypointRCNNHeads(out_ch, list(kh.CONV_DIMS)),
                             keypoint_predictor=KeypointRCNNPredictor(kh.CONV_DIMS[-1], kh.NUM_KEYPOINTS), **kwargs)
    elif cfg.MODEL.MASK_ON:
        mh = cfg.MODEL.ROI_MASK_HEAD
        mask_head = MaskRCNNHeads(out_ch, [mh.CONV_DIM] * mh.NUM_CONV, 1,
                                  norm_layer=norm_layer(mh.NORM, "MODEL.ROI_MASK_HEAD.NORM"))
        model = MaskRCNN(backbone, num_classes=None, mask_roi_pool=pooler(mh), mask_head=mask_head,
                         mask_predictor=MaskRCNNPredictor(mh.CONV_DIM if mh.NUM_CONV else out_ch, mh.CONV_DIM,
                                                          num_classes), **kwargs)
    else:
        model = FasterRCNN(backbone, num_classes=None, **kwargs)
    model.rpn.__class__, model.rpn.smooth_l1_beta = D2RPN, float(rpn.SMOOTH_L1_BETA)
    model.roi_heads.__class__, model.roi_heads.smooth_l1_beta = D2RoIHeads, float(bh.SMOOTH_L1_BETA)
    return _with_d2_input(_exact_boxes(model), cfg)


def load_detector_weights(model: nn.Module, path: str) -> str:
    """MODEL.WEIGHTS into the detector: a whole detection checkpoint of this path, or
    pretrained backbone weights in any layout ``tools/convert.py`` reads (a converted
    ``.pkl`` / ``.pth``, one of our pretraining checkpoints, the official release, a
    torchvision ResNet). Returns what was loaded."""
    if path.endswith(".pkl"):  # a pickle: read by an unpickler that rebuilds numpy arrays only
        try:
            ckpt = load_pickle_file(path)
        except FileNotFoundError:
            raise InputFileNotFoundError(f"MODEL.WEIGHTS: file not found: {path}") from None
        except ValueError as e:
            raise InputValueError(f"MODEL.WEIGHTS {e}") from e
        if not isinstance(ckpt, dict):
            raise InputValueError(f"MODEL.WEIGHTS {path}: a Detectron2 .pkl holds a dict, this one a "
                                  f"{type(ckpt).__name__}")
        ckpt = {"model": {k: torch.as_tensor(v) for k, v in ckpt.get("model", ckpt).items()}}
    else:
        try:
            ckpt = load_checkpoint_file(path)
        except FileNotFoundError:
            raise InputFileNotFoundError(f"MODEL.WEIGHTS: file not found: {path}") from None
        except ValueError as e:
            raise InputValueError(f"MODEL.WEIGHTS {e}") from e
    state = ckpt.get("model", {}) if isinstance(ckpt, dict) else {}
    if any(k.startswith("backbone.body.") for k in state):
        model.load_state_dict(state, strict=True)
        return "a whole detector"
    try:
        layout, enc, _ = extract_encoder(ckpt)
    except LayoutError as e:
        raise InputValueError(f"MODEL.WEIGHTS {path}: {e}") from e
    tv = {d2_to_torchvision(k): v for k, v in enc.items()}
    body = model.backbone.body
    result = body.load_state_dict(tv, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise InputValueError(f"MODEL.WEIGHTS {path}: backbone keys missing {missing[:5]} / unexpected "
                              f"{result.unexpected_keys[:5]} (a different MODEL.RESNETS.DEPTH?)")
    return f"the backbone ({layout} layout, {len(tv)} tensors)"
