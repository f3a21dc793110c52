"""What every Detectron2 key means on the torchvision fine-tuning path: one table.

A detection config must mean what it means in Detectron2 on both paths. Each key of
Detectron2's defaults that this path's config holds (``config/detection_defaults.py``)
is one of:

* ``honoured`` — it does here what it does in Detectron2; ``test`` names the test that
  shows it. ``allowed`` (optional) limits the values this path can honour: others stop
  the run at start-up, naming key and value;
* ``refused`` — only the values in ``allowed`` (Detectron2's default or what the shipped
  configs use) run here; any other stops the run at start-up, naming key and value and
  saying that only the Detectron2 path supports it;
* ``irrelevant`` — Detectron2 reads it for something this path does not have; ``why``.

``tests/test_torchvision_keys.py`` walks every key of the defaults against this table.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from ..config import ConfigError
from ..config.detection_defaults import DETECTION_ARCHITECTURES

__all__ = ["KeyRule", "TORCHVISION_KEYS", "check_torchvision_keys"]

_T = "tests/test_torchvision_keys.py::"


@dataclass(frozen=True)
class KeyRule:
    kind: str  # "honoured" | "refused" | "irrelevant"
    test: str = ""  # honoured: the test that shows it ("path::name")
    allowed: Optional[Callable[[Any, Any], bool]] = None  # (value, cfg) -> can this path honour it
    expected: str = ""  # what ``allowed`` accepts, in words
    why: str = ""  # irrelevant: why Detectron2's meaning does not arise here


def H(test: str, allowed=None, expected: str = "") -> KeyRule:
    return KeyRule("honoured", test=test if "::" in test else _T + test, allowed=allowed, expected=expected)


def R(allowed, expected: str) -> KeyRule:
    return KeyRule("refused", allowed=allowed, expected=expected)


def I(why: str) -> KeyRule:  # noqa: E743
    return KeyRule("irrelevant", why=why)


def _eq(*values):
    return lambda v, cfg: v in values


def _rcnn(pred):
    """A rule of the R-CNN heads: RetinaNet does not read the key."""
    return lambda v, cfg: cfg.MODEL.META_ARCHITECTURE == "RetinaNet" or pred(v, cfg)


def _retina(pred):
    """A rule of RetinaNet: the R-CNNs do not read the key."""
    return lambda v, cfg: cfg.MODEL.META_ARCHITECTURE != "RetinaNet" or pred(v, cfg)


def _fpn_levels(cfg):
    """Detectron2's FPN output names for FPN.IN_FEATURES (res2 -> p2 ...)."""
    return ["p" + f[3] for f in cfg.MODEL.FPN.IN_FEATURES]


_DETECTOR = "test_built_detector_reflects_the_key"  # the built component carries the value
_RES2 = lambda v, cfg: v == (64 if cfg.MODEL.RESNETS.DEPTH < 50 else 256)  # noqa: E731
_RES_FEATURES = ("res2", "res3", "res4", "res5")
# Detectron2's norm names this path builds (norm_layer in torchvision_model.py)
_NORMS = ("", "BN", "SyncBN", "FrozenBN", "GN", "naiveSyncBN", "naiveSyncBN_N")
_NORM = dict(allowed=_eq(*_NORMS), expected=" / ".join(repr(n) for n in _NORMS))


def _anchor_lists(v, cfg) -> bool:
    """One list for every level, or one per level of the head that reads the anchors."""
    retina = cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
    levels = len(cfg.MODEL.RETINANET.IN_FEATURES if retina else cfg.MODEL.RPN.IN_FEATURES)
    return len(v) in (1, levels)
_POOLER_TYPE = H("test_poolers_are_detectron2s_roialign", _eq("ROIAlignV2", "ROIAlign"), "ROIAlignV2 or ROIAlign")

TORCHVISION_KEYS: Dict[str, KeyRule] = {
    "VERSION": I("the config format's version: Detectron2 upgrades old configs with it; both paths read version 2"),
    # ------------------------------------------------------------------ model
    "MODEL.META_ARCHITECTURE": H("test_each_architecture_trains_and_predicts", _eq(*DETECTION_ARCHITECTURES),
                                 " or ".join(DETECTION_ARCHITECTURES)),
    "MODEL.DEVICE": H("tests/test_detection.py::test_faster_rcnn_finetunes_evaluates_and_resumes"),
    "MODEL.WEIGHTS": H("tests/test_detection.py::test_faster_rcnn_finetunes_evaluates_and_resumes"),
    "MODEL.PIXEL_MEAN": H("test_pixel_statistics_normalise_as_detectron2"),
    "MODEL.PIXEL_STD": H("test_pixel_statistics_normalise_as_detectron2"),
    "MODEL.BACKBONE.NAME": H(_DETECTOR, lambda v, cfg: v == ("build_retinanet_resnet_fpn_backbone"
                                                             if cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
                                                             else "build_resnet_fpn_backbone"),
                             "build_resnet_fpn_backbone (R-CNN) / build_retinanet_resnet_fpn_backbone (RetinaNet)"),
    "MODEL.BACKBONE.FREEZE_AT": H("test_freeze_at_freezes_weights_and_batch_norm_statistics"),
    "MODEL.RESNETS.DEPTH": H(_DETECTOR, _eq(18, 34, 50, 101, 152), "18, 34, 50, 101 or 152"),
    "MODEL.RESNETS.OUT_FEATURES": H(_DETECTOR, lambda v, cfg: set(cfg.MODEL.FPN.IN_FEATURES) <= set(v),
                                    "a superset of MODEL.FPN.IN_FEATURES"),
    "MODEL.RESNETS.NUM_GROUPS": R(_eq(1), "1 (no ResNeXt on this path)"),
    "MODEL.RESNETS.WIDTH_PER_GROUP": R(_eq(64), "64 (no ResNeXt on this path)"),
    "MODEL.RESNETS.NORM": H(_DETECTOR, **_NORM),
    "MODEL.RESNETS.STRIDE_IN_1X1": R(_eq(False), "False (torchvision / ResNet v1.5 strides, what SCRL pretrains)"),
    "MODEL.RESNETS.RES5_DILATION": R(_eq(1), "1"),
    "MODEL.RESNETS.RES2_OUT_CHANNELS": R(_RES2, "64 for ResNet-18/34, 256 for ResNet-50 and deeper"),
    "MODEL.RESNETS.STEM_OUT_CHANNELS": R(_eq(64), "64"),
    "MODEL.MASK_ON": H("test_each_architecture_trains_and_predicts"),
    "MODEL.KEYPOINT_ON": H("test_each_architecture_trains_and_predicts", lambda v, cfg: not (v and cfg.MODEL.MASK_ON),
                           "False when MODEL.MASK_ON is True (this path builds one of the two heads)"),
    "MODEL.LOAD_PROPOSALS": R(_eq(False), "False (no precomputed proposals on this path)"),
    "MODEL.FPN.IN_FEATURES": H(_DETECTOR, lambda v, cfg: len(v) > 0 and " ".join(v) in " ".join(_RES_FEATURES),
        "consecutive ResNet stages in order, e.g. [res2, res3, res4, res5] (Detectron2's FPN asserts it)"),
    "MODEL.FPN.OUT_CHANNELS": H(_DETECTOR),
    "MODEL.FPN.NORM": H(_DETECTOR, **_NORM),
    "MODEL.RPN.IN_FEATURES": H(_DETECTOR, _rcnn(lambda v, cfg: list(v) == _fpn_levels(cfg) + ["p" + str(
        int(_fpn_levels(cfg)[-1][1]) + 1)] if cfg.MODEL.FPN.IN_FEATURES else False),
        "every FPN level and the max-pooled one above (p2 ... p6 for res2 ... res5)"),
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE": H(_DETECTOR),
    "MODEL.RPN.POSITIVE_FRACTION": H(_DETECTOR),
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": H(_DETECTOR),
    "MODEL.RPN.PRE_NMS_TOPK_TEST": H(_DETECTOR),
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": H(_DETECTOR),
    "MODEL.RPN.POST_NMS_TOPK_TEST": H(_DETECTOR),
    "MODEL.RPN.NMS_THRESH": H(_DETECTOR),
    "MODEL.RPN.SMOOTH_L1_BETA": H("test_box_regression_losses_use_detectron2s_beta"),
    "MODEL.ROI_HEADS.NAME": R(_rcnn(_eq("StandardROIHeads")), "StandardROIHeads on an FPN (the C4 protocols' Res5ROIHeads "
                                                       "have no torchvision counterpart)"),
    "MODEL.ROI_HEADS.NUM_CLASSES": H(_DETECTOR),
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": H(_DETECTOR),
    "MODEL.ROI_HEADS.POSITIVE_FRACTION": H(_DETECTOR),
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": H(_DETECTOR),
    "MODEL.ROI_HEADS.NMS_THRESH_TEST": H(_DETECTOR),
    "MODEL.ROI_HEADS.IN_FEATURES": H(_DETECTOR, _rcnn(lambda v, cfg: len(v) > 0 and set(v) <= set(_fpn_levels(cfg))),
                                     "FPN levels of MODEL.FPN.IN_FEATURES (e.g. [p2, p3, p4, p5])"),
    "MODEL.ROI_BOX_HEAD.NAME": R(_rcnn(_eq("FastRCNNConvFCHead")), "FastRCNNConvFCHead"),
    "MODEL.ROI_BOX_HEAD.NUM_CONV": H(_DETECTOR),
    "MODEL.ROI_BOX_HEAD.CONV_DIM": H(_DETECTOR),
    "MODEL.ROI_BOX_HEAD.NUM_FC": H(_DETECTOR, _rcnn(lambda v, cfg: v >= 1), ">= 1"),
    "MODEL.ROI_BOX_HEAD.FC_DIM": H(_DETECTOR),
    "MODEL.ROI_BOX_HEAD.NORM": H(_DETECTOR, **_NORM),
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": H("test_pooler_resolutions_size_the_poolers_and_heads"),
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": H("test_poolers_are_detectron2s_roialign"),
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": _POOLER_TYPE,
    "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": H("test_box_regression_losses_use_detectron2s_beta"),
    "MODEL.ROI_MASK_HEAD.NAME": R(_eq("MaskRCNNConvUpsampleHead"), "MaskRCNNConvUpsampleHead"),
    "MODEL.ROI_MASK_HEAD.NUM_CONV": H(_DETECTOR),
    "MODEL.ROI_MASK_HEAD.CONV_DIM": H(_DETECTOR),
    "MODEL.ROI_MASK_HEAD.NORM": H(_DETECTOR, **_NORM),
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": H("test_pooler_resolutions_size_the_poolers_and_heads"),
    "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO": H("test_poolers_are_detectron2s_roialign"),
    "MODEL.ROI_MASK_HEAD.POOLER_TYPE": _POOLER_TYPE,
    "MODEL.ROI_KEYPOINT_HEAD.NAME": R(_eq("KRCNNConvDeconvUpsampleHead"), "KRCNNConvDeconvUpsampleHead"),
    "MODEL.ROI_KEYPOINT_HEAD.POOLER_RESOLUTION": H("test_pooler_resolutions_size_the_poolers_and_heads"),
    "MODEL.ROI_KEYPOINT_HEAD.POOLER_SAMPLING_RATIO": H("test_poolers_are_detectron2s_roialign"),
    "MODEL.ROI_KEYPOINT_HEAD.POOLER_TYPE": _POOLER_TYPE,
    "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS": H(_DETECTOR),
    "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS": H(_DETECTOR),
    "MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE": H("test_keypoints_take_detectron2s_pixel_convention"),
    "MODEL.RETINANET.NUM_CLASSES": H(_DETECTOR),
    "MODEL.RETINANET.IN_FEATURES": H(_DETECTOR, _retina(lambda v, cfg: list(v) == ["p3", "p4", "p5", "p6", "p7"]
                                     and list(cfg.MODEL.FPN.IN_FEATURES) == ["res3", "res4", "res5"]),
                                     "[p3, p4, p5, p6, p7] with MODEL.FPN.IN_FEATURES [res3, res4, res5]"),
    "MODEL.RETINANET.NUM_CONVS": R(_retina(_eq(4)), "4 (torchvision's head)"),
    "MODEL.RETINANET.IOU_THRESHOLDS": H(_DETECTOR, _retina(lambda v, cfg: len(v) == 2), "two thresholds [bg, fg]"),
    "MODEL.RETINANET.IOU_LABELS": R(_retina(lambda v, cfg: list(v) == [0, -1, 1]), "[0, -1, 1]"),
    "MODEL.RETINANET.PRIOR_PROB": R(_retina(_eq(0.01)), "0.01 (torchvision's head)"),
    "MODEL.RETINANET.SCORE_THRESH_TEST": H(_DETECTOR),
    "MODEL.RETINANET.TOPK_CANDIDATES_TEST": H(_DETECTOR),
    "MODEL.RETINANET.NMS_THRESH_TEST": H(_DETECTOR),
    "MODEL.RETINANET.FOCAL_LOSS_GAMMA": R(_retina(_eq(2.0)), "2.0 (torchvision's loss)"),
    "MODEL.RETINANET.FOCAL_LOSS_ALPHA": R(_retina(_eq(0.25)), "0.25 (torchvision's loss)"),
    "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA": R(_retina(_eq(0.0)),
                                             "0.0 for RetinaNet (an L1 loss, as Detectron2's RetinaNet configs "
                                             "and torchvision's RetinaNet)"),
    "MODEL.RETINANET.BBOX_REG_LOSS_TYPE": R(_retina(_eq("smooth_l1")), "smooth_l1"),
    "MODEL.RETINANET.NORM": H("test_retinanet_head_norm_keeps_statistics_per_level", **_NORM),
    "MODEL.ANCHOR_GENERATOR.SIZES": H("test_anchors_are_detectron2s", _anchor_lists,
                                      "one list, or one per feature level"),
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": H("test_anchors_are_detectron2s", _anchor_lists,
                                              "one list, or one per feature level"),
    # ------------------------------------------------------------------ input
    "INPUT.FORMAT": R(_eq("RGB"), "RGB (SCRL pretrains on RGB; set RGB PIXEL_MEAN/PIXEL_STD with it)"),
    "INPUT.MIN_SIZE_TRAIN": H("test_min_size_train_sampling_choice_and_range"),
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": H("test_min_size_train_sampling_choice_and_range",
                                       lambda v, cfg: v == "choice" or (v == "range"
                                                                        and len(cfg.INPUT.MIN_SIZE_TRAIN) == 2),
                                       "'choice', or 'range' with two MIN_SIZE_TRAIN values"),
    "INPUT.MAX_SIZE_TRAIN": H(_DETECTOR),
    "INPUT.MIN_SIZE_TEST": H("test_test_sizes_resize_at_evaluation", lambda v, cfg: v > 0,
                             "> 0 (0, no resizing at test time, is not available on this path)"),
    "INPUT.MAX_SIZE_TEST": H("test_test_sizes_resize_at_evaluation"),
    "INPUT.RANDOM_FLIP": H("test_random_flip_horizontal_vertical_none"),
    "INPUT.MASK_FORMAT": H("test_mask_targets_in_both_formats_as_detectron2"),
    # ------------------------------------------------------------------ data
    "DATASETS.TRAIN": H("tests/test_detection.py::test_faster_rcnn_finetunes_evaluates_and_resumes"),
    "DATASETS.TEST": H("tests/test_detection.py::test_faster_rcnn_finetunes_evaluates_and_resumes"),
    "DATALOADER.NUM_WORKERS": H("tests/test_detection.py::test_eval_only_and_two_processes_on_the_torchvision_path"),
    "DATALOADER.FILTER_EMPTY_ANNOTATIONS": H("test_filter_empty_annotations"),
    "DATALOADER.ASPECT_RATIO_GROUPING": H("test_aspect_ratio_grouping_batches_like_orientations"),
    "DATALOADER.SAMPLER_TRAIN": R(_eq("TrainingSampler"), "TrainingSampler (RepeatFactorTrainingSampler, for "
                                                          "LVIS, is on the Detectron2 path)"),
    "DATALOADER.REPEAT_THRESHOLD": I("read only by RepeatFactorTrainingSampler, which this path refuses"),
    # ------------------------------------------------------------------ solver
    "SOLVER.MAX_ITER": H("test_schedule_and_optimizer_follow_detectron2"),
    "SOLVER.BASE_LR": H("test_schedule_and_optimizer_follow_detectron2"),
    "SOLVER.MOMENTUM": H("test_schedule_and_optimizer_follow_detectron2"),
    "SOLVER.NESTEROV": H("test_schedule_and_optimizer_follow_detectron2"),
    "SOLVER.WEIGHT_DECAY": H("test_schedule_and_optimizer_follow_detectron2"),
    "SOLVER.WEIGHT_DECAY_NORM": H("test_schedule_and_optimizer_follow_detectron2"),
    "SOLVER.BIAS_LR_FACTOR": H("test_schedule_and_optimizer_follow_detectron2"),
    "SOLVER.AMP.ENABLED": H("tests/test_detection.py::"
                            "test_torchvision_detector_keeps_box_coordinates_float32_under_autocast"),
    "SOLVER.IMS_PER_BATCH": H("tests/test_detection.py::test_eval_only_and_two_processes_on_the_torchvision_path"),
    "SOLVER.LR_SCHEDULER_NAME": R(_eq("WarmupMultiStepLR"), "WarmupMultiStepLR"),
    "SOLVER.STEPS": H("test_schedule_and_optimizer_follow_detectron2"),
    "SOLVER.GAMMA": H("test_schedule_and_optimizer_follow_detectron2"),
    "SOLVER.WARMUP_FACTOR": H("test_schedule_and_optimizer_follow_detectron2"),
    "SOLVER.WARMUP_ITERS": H("test_schedule_and_optimizer_follow_detectron2"),
    "SOLVER.WARMUP_METHOD": H("test_schedule_and_optimizer_follow_detectron2", _eq("linear", "constant"),
                              "linear or constant"),
    "SOLVER.CHECKPOINT_PERIOD": H("tests/test_detection.py::"
                                  "test_sigterm_during_finetuning_checkpoints_and_the_rerun_resumes"),
    "SOLVER.REFERENCE_WORLD_SIZE": R(_eq(0), "0 (no automatic rescaling of the schedule to the number of "
                                             "processes on this path; scale IMS_PER_BATCH / BASE_LR / MAX_ITER "
                                             "/ STEPS yourself)"),
    # ------------------------------------------------------------------ test
    "TEST.EVAL_PERIOD": H("test_eval_period_evaluates_during_training"),
    "TEST.DETECTIONS_PER_IMAGE": H(_DETECTOR),
    "TEST.KEYPOINT_OKS_SIGMAS": H("test_keypoint_oks_sigmas_reach_cocoeval"),
    "TEST.PRECISE_BN.ENABLED": H("test_precise_bn_recomputes_statistics"),
    "TEST.PRECISE_BN.NUM_ITER": H("test_precise_bn_recomputes_statistics"),
    # ------------------------------------------------------------------ run
    "OUTPUT_DIR": H("tests/test_detection.py::test_faster_rcnn_finetunes_evaluates_and_resumes"),
    "SEED": H("test_seed_fixes_the_data_order"),
    "CUDNN_BENCHMARK": I("sets torch.backends.cudnn.benchmark (done by default_setup for both paths); it "
                         "changes speed, not results"),
}


def check_torchvision_keys(cfg) -> None:
    """Stop before anything runs when a key holds a value this path cannot honour."""
    for key, rule in TORCHVISION_KEYS.items():
        if rule.allowed is None:
            continue
        node = cfg
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if node is None:
            continue
        if not rule.allowed(node, cfg):
            raise ConfigError(f"{key}: {node!r} is not available on the torchvision fine-tuning path (expected "
                              f"{rule.expected}); only the Detectron2 path supports it: install Detectron2 "
                              "(see docs/detectron2.md)")
