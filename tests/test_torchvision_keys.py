"""The torchvision fine-tuning path keeps Detectron2's meaning: every key of Detectron2's
defaults that its config holds is honoured (shown by the test the table names), refused by
name for values it cannot honour, or irrelevant with a reason (scrl_d2/detection/torchvision_keys.py)."""
import ast
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, flat_items
from scrl_d2.backend import detectron2_available
from scrl_d2.config import ConfigError
from scrl_d2.config.detection_defaults import detection_defaults
from scrl_d2.detection.torchvision_keys import TORCHVISION_KEYS, check_torchvision_keys

# the torchvision path is what a plain install runs: all of this file runs in CI's plain pass too
pytestmark = pytest.mark.plain
DEMO = os.path.join(ROOT, "configs", "demo", "faster_rcnn_demo.yaml")
# ResNet-18 on small images, light keypoint head: seconds per detector (tests override them)
R18 = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
       "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "160", "INPUT.MIN_SIZE_TEST", "96",
       "INPUT.MAX_SIZE_TEST", "160", "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", "(64, 64)", "TEST.DETECTIONS_PER_IMAGE", "20"]


@pytest.fixture(autouse=True)
def torchvision_backend(monkeypatch):
    monkeypatch.setenv("SCRL_D2_BACKEND", "torchvision")


def cfg_of(*opts, config=DEMO):
    from scrl_d2.config import config_from_args

    return config_from_args(os.path.join(ROOT, "configs", config) if not os.path.isabs(config) else config,
                            R18 + list(opts))


def build(*opts, config=DEMO):
    from scrl_d2.detection.torchvision_model import build_torchvision_detector

    return build_torchvision_detector(cfg_of(*opts, config=config))


# A value each key with a limited range cannot take here (the walk checks it is refused).
BAD = {
    "MODEL.META_ARCHITECTURE": "ProposalNetwork", "MODEL.BACKBONE.NAME": "build_resnet_backbone",
    "MODEL.RESNETS.DEPTH": 26, "MODEL.RESNETS.OUT_FEATURES": ["res4", "res5"],
    "MODEL.RESNETS.NUM_GROUPS": 32, "MODEL.RESNETS.WIDTH_PER_GROUP": 4, "MODEL.RESNETS.STRIDE_IN_1X1": True,
    "MODEL.RESNETS.RES5_DILATION": 2, "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 128, "MODEL.LOAD_PROPOSALS": True,
    "MODEL.FPN.IN_FEATURES": ["res2", "res4"], "MODEL.RPN.IN_FEATURES": ["p2", "p3", "p4", "p5"],
    "MODEL.ROI_HEADS.NAME": "Res5ROIHeads", "MODEL.ROI_HEADS.IN_FEATURES": ["p2", "p6"],
    "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNFCHead", "MODEL.ROI_BOX_HEAD.NUM_FC": 0,
    "MODEL.ROI_MASK_HEAD.NAME": "CustomMaskHead", "MODEL.ROI_KEYPOINT_HEAD.NAME": "CustomKeypointHead",
    "INPUT.FORMAT": "BGR", "INPUT.MIN_SIZE_TRAIN_SAMPLING": "uniform", "INPUT.MIN_SIZE_TEST": 0,
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIPool", "MODEL.ROI_MASK_HEAD.POOLER_TYPE": "ROIPool",
    "MODEL.ROI_KEYPOINT_HEAD.POOLER_TYPE": "ROIAlignRotated",
    "MODEL.RESNETS.NORM": "nnSyncBN", "MODEL.FPN.NORM": "LN", "MODEL.ROI_BOX_HEAD.NORM": "nnSyncBN",
    "MODEL.ROI_MASK_HEAD.NORM": "nnSyncBN", "MODEL.ANCHOR_GENERATOR.SIZES": [[32], [64]],
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5], [1.0]],
    "DATALOADER.SAMPLER_TRAIN": "RepeatFactorTrainingSampler", "SOLVER.LR_SCHEDULER_NAME": "WarmupCosineLR",
    "SOLVER.WARMUP_METHOD": "exponential", "SOLVER.REFERENCE_WORLD_SIZE": 16,
}
# RetinaNet's keys are checked on the RetinaNet protocol config.
RETINANET = "coco/retinanet_R_50_FPN_1x_syncbn.yaml"
BAD_RETINANET = {
    "MODEL.RETINANET.IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"], "MODEL.RETINANET.NUM_CONVS": 2,
    "MODEL.RETINANET.IOU_THRESHOLDS": [0.4, 0.45, 0.5], "MODEL.RETINANET.IOU_LABELS": [0, 0, 1],
    "MODEL.RETINANET.PRIOR_PROB": 0.02, "MODEL.RETINANET.FOCAL_LOSS_GAMMA": 1.5,
    "MODEL.RETINANET.FOCAL_LOSS_ALPHA": 0.5, "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA": 0.1,
    "MODEL.RETINANET.BBOX_REG_LOSS_TYPE": "giou", "MODEL.RETINANET.NORM": "nnSyncBN",
}
# Mask R-CNN's keys, on the Mask R-CNN demo config.
MASK = "demo/mask_rcnn_demo.yaml"
BAD_MASK = {"MODEL.KEYPOINT_ON": True}


def _test_names(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def test_every_detectron2_key_is_honoured_refused_or_irrelevant():
    keys = [k for k, _ in flat_items(detection_defaults())]
    assert sorted(TORCHVISION_KEYS) == sorted(keys), (
        f"not in the table: {sorted(set(keys) - set(TORCHVISION_KEYS))}; "
        f"not a Detectron2 default: {sorted(set(TORCHVISION_KEYS) - set(keys))}")
    for key, rule in TORCHVISION_KEYS.items():
        assert rule.kind in ("honoured", "refused", "irrelevant"), key
        if rule.kind == "irrelevant":
            assert rule.why and rule.allowed is None, key
        if rule.kind == "honoured":
            path, name = rule.test.split("::")
            assert name in _test_names(path), f"{key}: {rule.test} does not exist"
        if rule.kind == "refused":
            assert rule.allowed is not None and rule.expected, key
        if rule.allowed is not None:
            assert key in BAD or key in BAD_RETINANET or key in BAD_MASK, f"{key}: no refused value to check"
    probed = {k for k, *_ in PROBES}
    detector_keys = {k for k, r in TORCHVISION_KEYS.items() if r.test.endswith("::" + "test_built_detector_"
                                                                                       "reflects_the_key")}
    assert detector_keys <= probed, f"no probe for {sorted(detector_keys - probed)}"


@pytest.mark.parametrize("key,config", [(k, "demo/faster_rcnn_demo.yaml") for k in BAD]
                         + [(k, RETINANET) for k in BAD_RETINANET] + [(k, MASK) for k in BAD_MASK])
def test_a_value_this_path_cannot_honour_stops_the_run_naming_it(key, config):
    from scrl_d2.detection.torchvision_model import build_torchvision_detector

    cfg = cfg_of(config=config)
    check_torchvision_keys(cfg)  # the shipped config is accepted
    value = {**BAD, **BAD_RETINANET, **BAD_MASK}[key] if config != RETINANET else BAD_RETINANET[key]
    cfg.merge_from_list([key, repr(value) if not isinstance(value, str) else value])
    with pytest.raises(ConfigError) as e:
        build_torchvision_detector(cfg)
    msg = str(e.value)
    assert msg.startswith(key + ": ") and repr(cfg_at_key(cfg, key)) in msg and "Detectron2" in msg
    assert "\n" not in msg


def cfg_at_key(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def test_refused_value_from_the_command_line_is_one_line_exit_2(tmp_path):
    from test_engine import run_cli

    r = run_cli("--config-file", DEMO, "OUTPUT_DIR", str(tmp_path), "INPUT.FORMAT", "BGR",
                env_extra={"SCRL_D2_BACKEND": "torchvision"}, check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "INPUT.FORMAT: 'BGR'" in r.stderr
    assert not os.listdir(tmp_path)  # stopped before any process started or wrote


def _roi_pool(model):
    return model.roi_heads.box_roi_pool


# (key, value, what the built detector carries); config: the R-CNN demo unless RetinaNet
PROBES = [
    ("MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone", lambda m: type(m.backbone.fpn).__name__ ==
     "FeaturePyramidNetwork"),
    ("MODEL.RESNETS.DEPTH", 34, lambda m: len(m.backbone.body.layer3) == 6),
    ("MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"], lambda m: len(m.backbone.fpn.inner_blocks) == 4),
    ("MODEL.RESNETS.NORM", "GN", lambda m: isinstance(m.backbone.body.layer2[0].bn1, torch.nn.GroupNorm)),
    ("MODEL.FPN.IN_FEATURES", ["res3", "res4", "res5"], lambda m: len(m.backbone.fpn.inner_blocks) == 3),
    ("MODEL.FPN.OUT_CHANNELS", 128, lambda m: m.backbone.out_channels == 128),
    ("MODEL.FPN.NORM", "GN", lambda m: any(isinstance(x, torch.nn.GroupNorm) for x in m.backbone.fpn.modules())),
    ("MODEL.RPN.IN_FEATURES", ["p2", "p3", "p4", "p5", "p6"], lambda m: m.rpn.anchor_generator.sizes[0] == (32,)),
    ("MODEL.RPN.BATCH_SIZE_PER_IMAGE", 128, lambda m: m.rpn.fg_bg_sampler.batch_size_per_image == 128),
    ("MODEL.RPN.POSITIVE_FRACTION", 0.25, lambda m: m.rpn.fg_bg_sampler.positive_fraction == 0.25),
    ("MODEL.RPN.PRE_NMS_TOPK_TRAIN", 321, lambda m: m.rpn._pre_nms_top_n["training"] == 321),
    ("MODEL.RPN.PRE_NMS_TOPK_TEST", 123, lambda m: m.rpn._pre_nms_top_n["testing"] == 123),
    ("MODEL.RPN.POST_NMS_TOPK_TRAIN", 77, lambda m: m.rpn._post_nms_top_n["training"] == 77),
    ("MODEL.RPN.POST_NMS_TOPK_TEST", 66, lambda m: m.rpn._post_nms_top_n["testing"] == 66),
    ("MODEL.RPN.NMS_THRESH", 0.6, lambda m: m.rpn.nms_thresh == 0.6),
    ("MODEL.ROI_HEADS.NUM_CLASSES", 4, lambda m: m.roi_heads.box_predictor.cls_score.out_features == 5),
    ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 96, lambda m: m.roi_heads.fg_bg_sampler.batch_size_per_image == 96),
    ("MODEL.ROI_HEADS.POSITIVE_FRACTION", 0.5, lambda m: m.roi_heads.fg_bg_sampler.positive_fraction == 0.5),
    ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.3, lambda m: m.roi_heads.score_thresh == 0.3),
    ("MODEL.ROI_HEADS.NMS_THRESH_TEST", 0.4, lambda m: m.roi_heads.nms_thresh == 0.4),
    ("MODEL.ROI_HEADS.IN_FEATURES", ["p3", "p4", "p5"], lambda m: _roi_pool(m).featmap_names == ["1", "2", "3"]),
    ("MODEL.ROI_BOX_HEAD.NUM_CONV", 2, lambda m: sum(isinstance(x, torch.nn.Conv2d)
                                                     for x in m.roi_heads.box_head.modules()) == 2),
    ("MODEL.ROI_BOX_HEAD.CONV_DIM", 64, lambda m: True),  # with NUM_CONV (below, together)
    ("MODEL.ROI_BOX_HEAD.NUM_FC", 1, lambda m: sum(isinstance(x, torch.nn.Linear)
                                                   for x in m.roi_heads.box_head.modules()) == 1),
    ("MODEL.ROI_BOX_HEAD.FC_DIM", 256, lambda m: m.roi_heads.box_predictor.cls_score.in_features == 256),
    ("MODEL.ROI_BOX_HEAD.NORM", "GN", lambda m: True),  # with NUM_CONV (below, together)
    ("MODEL.ROI_MASK_HEAD.NUM_CONV", 2, lambda m: sum(isinstance(x, torch.nn.Conv2d)
                                                      for x in m.roi_heads.mask_head.modules()) == 2),
    ("MODEL.ROI_MASK_HEAD.CONV_DIM", 64, lambda m: m.roi_heads.mask_predictor.conv5_mask.in_channels == 64),
    ("MODEL.ROI_MASK_HEAD.NORM", "GN", lambda m: any(isinstance(x, torch.nn.GroupNorm)
                                                     for x in m.roi_heads.mask_head.modules())),
    ("MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", (32, 32, 32), lambda m: len(m.roi_heads.keypoint_head) == 3 * 2),
    ("MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", 5, lambda m: m.roi_heads.keypoint_predictor.kps_score_lowres
     .out_channels == 5),
    ("INPUT.MAX_SIZE_TRAIN", 500, lambda m: m.transform.max_size == 500),
    ("TEST.DETECTIONS_PER_IMAGE", 7, lambda m: m.roi_heads.detections_per_img == 7),
    ("MODEL.RETINANET.NUM_CLASSES", 3, lambda m: m.head.classification_head.num_classes == 3),
    ("MODEL.RETINANET.IN_FEATURES", ["p3", "p4", "p5", "p6", "p7"], lambda m: len(m.anchor_generator.sizes) == 5),
    ("MODEL.RETINANET.IOU_THRESHOLDS", [0.3, 0.6], lambda m: (m.proposal_matcher.low_threshold,
                                                               m.proposal_matcher.high_threshold) == (0.3, 0.6)),
    ("MODEL.RETINANET.SCORE_THRESH_TEST", 0.2, lambda m: m.score_thresh == 0.2),
    ("MODEL.RETINANET.TOPK_CANDIDATES_TEST", 50, lambda m: m.topk_candidates == 50),
    ("MODEL.RETINANET.NMS_THRESH_TEST", 0.45, lambda m: m.nms_thresh == 0.45),
    ("MODEL.RETINANET.NORM", "GN", lambda m: any(isinstance(x, torch.nn.GroupNorm) for x in m.head.modules())),
]
_TOGETHER = {"MODEL.ROI_BOX_HEAD.CONV_DIM": ["MODEL.ROI_BOX_HEAD.NUM_CONV", "2"],
             "MODEL.ROI_BOX_HEAD.NORM": ["MODEL.ROI_BOX_HEAD.NUM_CONV", "2"]}
_TOGETHER_PROBE = {
    "MODEL.ROI_BOX_HEAD.CONV_DIM": lambda m: [x.out_channels for x in m.roi_heads.box_head.modules()
                                              if isinstance(x, torch.nn.Conv2d)] == [64, 64],
    "MODEL.ROI_BOX_HEAD.NORM": lambda m: any(isinstance(x, torch.nn.GroupNorm) for x in m.roi_heads.box_head.modules()),
}


@pytest.mark.parametrize("key,value,probe", PROBES, ids=[p[0] for p in PROBES])
def test_built_detector_reflects_the_key(key, value, probe):
    config = RETINANET if key.startswith("MODEL.RETINANET") else (
        "coco/keypoint_rcnn_R_50_FPN_1x_syncbn.yaml" if "KEYPOINT" in key else
        "demo/mask_rcnn_demo.yaml" if "MASK" in key else "demo/faster_rcnn_demo.yaml")
    extra = list(_TOGETHER.get(key, []))
    if key == "MODEL.FPN.IN_FEATURES":
        extra += ["MODEL.RPN.IN_FEATURES", "['p3','p4','p5','p6']", "MODEL.ROI_HEADS.IN_FEATURES", "['p3','p4','p5']",
                  "MODEL.ANCHOR_GENERATOR.SIZES", "[[32],[64],[128],[256]]"]
    model = build(key, repr(value) if not isinstance(value, str) else value, *extra, config=config)
    probe = _TOGETHER_PROBE.get(key, probe)
    assert probe(model), (key, value)
    # and it still trains and predicts with that value
    _train_and_predict(model)


def _target(model, h=96, w=128):
    t = {"boxes": torch.tensor([[10.0, 12.0, 70.0, 80.0]]), "labels": torch.tensor([1])}
    if getattr(model.roi_heads, "mask_head", None) is not None if hasattr(model, "roi_heads") else False:
        from scrl_d2.detection.torchvision_model import PolygonMasks

        t["masks"] = PolygonMasks([[np.array([10, 12, 70, 12, 70, 80, 10, 80.0])]])
    if getattr(model.roi_heads, "keypoint_head", None) is not None if hasattr(model, "roi_heads") else False:
        n = model.roi_heads.keypoint_predictor.kps_score_lowres.out_channels
        k = torch.zeros(1, n, 3)
        k[0, :, 0], k[0, :, 1], k[0, :, 2] = torch.linspace(12, 68, n), 40.5, 2
        t["keypoints"] = k
    return t


def _train_and_predict(model, h=96, w=128):
    torch.manual_seed(0)
    model.train()
    losses = model([torch.rand(3, h, w), torch.rand(3, h, w)], [_target(model, h, w), _target(model, h, w)])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        return model([torch.rand(3, h, w)])[0]


@pytest.mark.parametrize("config,outputs", [("demo/faster_rcnn_demo.yaml", {"boxes"}),
                                            ("demo/mask_rcnn_demo.yaml", {"boxes", "masks"}),
                                            ("coco/keypoint_rcnn_R_50_FPN_1x_syncbn.yaml", {"boxes", "keypoints"}),
                                            (RETINANET, {"boxes"})])
def test_each_architecture_trains_and_predicts(config, outputs):
    model = build("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
                  config=config)
    out = _train_and_predict(model)
    assert outputs <= set(out) and len(out["boxes"]) > 0


def test_retinanet_head_norm_keeps_statistics_per_level():
    """Detectron2's RetinaNet head with NORM BN / SyncBN shares convs and the norm's affine
    parameters across the five levels but keeps batch statistics per level
    (CycleBatchNormList); torchvision's head would share one BatchNorm."""
    from scrl_d2.detection.torchvision_model import CycleBatchNorm

    model = build("MODEL.RETINANET.NORM", "BN", config=RETINANET)
    p6p7 = model.backbone.fpn.extra_blocks  # P6 from C5 (ResNet-18: 512 channels), as Detectron2; not from P5
    assert p6p7.use_P5 is False and p6p7.p6.in_channels == 512
    norms = [m for m in model.head.modules() if isinstance(m, CycleBatchNorm)]
    assert len(norms) == 8 and all(len(n.norms) == 5 for n in norms)  # 4 convs x (class, box)
    _train_and_predict(model)
    means = torch.stack([bn.running_mean for bn in norms[0].norms])
    assert len({tuple(m.tolist()) for m in means}) == 5  # each level its own statistics
    assert all(n._next == 0 for n in norms)  # five levels per forward: back at level 0
    assert not any(bn.affine for n in norms for bn in n.norms) and norms[0].weight.grad is not None
    if detectron2_available():  # the same outputs and statistics as Detectron2's module
        from detectron2.layers.batch_norm import CycleBatchNormList

        ours, theirs = CycleBatchNorm(6, 5, torch.nn.BatchNorm2d), CycleBatchNormList(5, torch.nn.BatchNorm2d,
                                                                                     num_features=6)
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            for level in range(5):
                x = torch.randn(2, 6, 4 + level, 4, generator=g)
                torch.testing.assert_close(ours(x), theirs(x))
        for a, b in zip(ours.norms, theirs):
            torch.testing.assert_close(a.running_mean, b.running_mean)
            torch.testing.assert_close(a.running_var, b.running_var)


def test_anchors_are_detectron2s():
    """Cell anchors equal Detectron2's DefaultAnchorGenerator's (not rounded to whole pixels
    as torchvision's), and one list of sizes / ratios goes to every level, as Detectron2."""
    model = build("MODEL.ANCHOR_GENERATOR.SIZES", "[[32, 64]]", "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[0.5, 1.0]]")
    cells = model.rpn.anchor_generator.cell_anchors
    assert len(cells) == 5 and all(c.shape == (4, 4) for c in cells)
    w = 32 / 0.5 ** 0.5  # a 32 px anchor of ratio h/w 0.5: 45.25 x 22.63
    assert any(torch.allclose(a, torch.tensor([-w / 2, -w / 4, w / 2, w / 4])) for a in cells[0])
    retina = build(config=RETINANET)
    if detectron2_available():
        from detectron2.config import get_cfg as d2_get_cfg
        from detectron2.layers import ShapeSpec
        from detectron2.modeling.anchor_generator import build_anchor_generator

        for m, cfg in ((model, cfg_of("MODEL.ANCHOR_GENERATOR.SIZES", "[[32, 64]]",
                                      "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[0.5, 1.0]]")),
                       (retina, cfg_of(config=RETINANET))):
            d2cfg = d2_get_cfg()
            d2cfg.MODEL.ANCHOR_GENERATOR.SIZES = cfg.MODEL.ANCHOR_GENERATOR.SIZES
            d2cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS
            ours = (m.rpn.anchor_generator if hasattr(m, "rpn") else m.anchor_generator).cell_anchors
            theirs = build_anchor_generator(d2cfg, [ShapeSpec(stride=2 ** k) for k in range(len(ours))]).cell_anchors
            for a, b in zip(ours, theirs):  # the same anchors (torchvision orders ratios first)
                key = lambda t: sorted(map(tuple, t.round(decimals=4).tolist()))  # noqa: E731
                assert key(a) == key(b)


def test_pixel_statistics_normalise_as_detectron2():
    """Detectron2: (pixel - PIXEL_MEAN) / PIXEL_STD on 0-255 values."""
    mean, std = [100.0, 110.0, 120.0], [50.0, 60.0, 70.0]
    model = build("MODEL.PIXEL_MEAN", repr(mean), "MODEL.PIXEL_STD", repr(std))
    img = torch.randint(0, 256, (3, 8, 8)).float()
    expected = (img - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(model.transform.normalize(img / 255.0), expected, rtol=1e-5, atol=1e-4)


def test_freeze_at_freezes_weights_and_batch_norm_statistics(tmp_path):
    """Detectron2's FREEZE_AT 2: stem and res2 get no gradient and FrozenBN (statistics
    fixed at the loaded values); res3 onwards train and update theirs."""
    from torchvision.ops import FrozenBatchNorm2d

    from scrl_d2.detection.torchvision_model import load_detector_weights
    from test_convert import ours_checkpoint, tv_resnet

    tv = tv_resnet(18)
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    torch.save(ours_checkpoint(tv), tmp_path / "p.pth")
    model = build("MODEL.BACKBONE.FREEZE_AT", "2", "MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "")
    load_detector_weights(model, str(tmp_path / "p.pth"))
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d) and isinstance(body.layer1[1].bn2, FrozenBatchNorm2d)
    assert isinstance(body.layer2[0].bn1, torch.nn.BatchNorm2d)
    assert not any(p.requires_grad for p in list(body.conv1.parameters()) + list(body.layer1.parameters()))
    torch.testing.assert_close(body.layer1[0].bn1.running_mean, tv.layer1[0].bn1.running_mean)
    before = {n: b.clone() for n, b in body.named_buffers()}
    _train_and_predict(model)
    after = dict(body.named_buffers())
    for n in before:
        moved = not torch.equal(before[n], after[n])
        if n.startswith(("bn1.", "layer1.")):
            assert not moved, n
        elif n.endswith("running_mean"):
            assert moved, n
    assert all(p.grad is None for p in body.layer1.parameters())
    assert body.layer2[0].conv1.weight.grad is not None


def test_box_regression_losses_use_detectron2s_beta():
    """RPN and Fast R-CNN box losses are Detectron2's smooth-L1 with its beta (0: L1),
    summed and divided as Detectron2 (torchvision fixes beta 1/9)."""
    from fvcore.nn import smooth_l1_loss

    from scrl_d2.detection.torchvision_model import _box_loss

    for beta in (0.0, 0.5):
        model = build("MODEL.RPN.SMOOTH_L1_BETA", str(beta), "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", str(beta))
        assert model.rpn.smooth_l1_beta == beta and model.roi_heads.smooth_l1_beta == beta
        g = torch.Generator().manual_seed(1)
        labels = [torch.tensor([1.0, 0.0, -1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, -1.0, 0.0, 0.0, 0.0])]
        targets = [torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)]
        deltas, logits = torch.randn(12, 4, generator=g), torch.randn(12, 1, generator=g)
        model.rpn.fg_bg_sampler.batch_size_per_image = 6  # every labelled anchor is sampled
        obj, box = model.rpn.compute_loss(logits, deltas, labels, targets)
        lab, tgt = torch.cat(labels), torch.cat(targets)
        fg, valid = lab == 1, lab >= 0
        norm = 6 * 2
        torch.testing.assert_close(box, smooth_l1_loss(deltas[fg], tgt[fg], beta, reduction="sum") / norm)
        torch.testing.assert_close(obj, torch.nn.functional.binary_cross_entropy_with_logits(
            logits[:, 0][valid], lab[valid], reduction="sum") / norm)
        # Fast R-CNN: class-specific deltas of foreground proposals
        cls_logits = torch.randn(5, 3, generator=g)
        reg = torch.randn(5, 12, generator=g)
        lbl, rt = [torch.tensor([0, 2, 1]), torch.tensor([1, 0])], [torch.randn(3, 4, generator=g),
                                                                      torch.randn(2, 4, generator=g)]
        _, box = _box_loss(beta)(cls_logits, reg, lbl, rt)
        lab, tgt = torch.cat(lbl), torch.cat(rt)
        picked = torch.stack([reg[i].view(3, 4)[lab[i]] for i in range(5) if lab[i] > 0])
        torch.testing.assert_close(box, smooth_l1_loss(picked, tgt[lab > 0], beta, reduction="sum") / 5)


def test_pooler_resolutions_size_the_poolers_and_heads():
    model = build("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "14")
    assert model.roi_heads.box_roi_pool.output_size == (14, 14)
    _train_and_predict(model)  # 14 used to crash: the pooler stayed at 7
    model = build("MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "7", config="demo/mask_rcnn_demo.yaml")
    assert model.roi_heads.mask_roi_pool.output_size == (7, 7)
    assert _train_and_predict(model)["masks"].shape[-2:] == (96, 128)
    model = build("MODEL.ROI_KEYPOINT_HEAD.POOLER_RESOLUTION", "7",
                  config="coco/keypoint_rcnn_R_50_FPN_1x_syncbn.yaml")
    assert model.roi_heads.keypoint_roi_pool.output_size == (7, 7)
    _train_and_predict(model)


@pytest.mark.parametrize("pooler_type", ["ROIAlignV2", "ROIAlign"])
def test_poolers_are_detectron2s_roialign(pooler_type):
    """Each head's pooler is Detectron2's (POOLER_TYPE aligned or not, POOLER_SAMPLING_RATIO,
    boxes to FPN levels by size): equal to Detectron2's ROIPooler on the same features."""
    model = build("MODEL.ROI_BOX_HEAD.POOLER_TYPE", pooler_type, "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", "2",
                  "MODEL.ROI_MASK_HEAD.POOLER_TYPE", pooler_type, config="demo/mask_rcnn_demo.yaml")
    box, mask = model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool
    assert (box.sampling_ratio, mask.sampling_ratio) == (2, 0)
    assert box.aligned == mask.aligned == (pooler_type == "ROIAlignV2")
    g = torch.Generator().manual_seed(0)
    feats = {str(k): torch.randn(1, 8, 64 // 2 ** k, 64 // 2 ** k, generator=g) for k in range(4)}
    xy = torch.rand(30, 2, generator=g) * 150
    boxes = torch.cat([xy, xy + 4 + torch.rand(30, 2, generator=g) * 100], dim=1)
    ours = box(feats, [boxes], [(256, 256)])
    single = torch.ops.torchvision.roi_align  # one level, by hand: the aligned flag reaches the kernel
    lone = type(box)(["0"], 7, 2, box.aligned)
    rois = torch.cat([torch.zeros(30, 1), boxes], dim=1)
    torch.testing.assert_close(lone({"0": feats["0"]}, [boxes], [(256, 256)]),
                               single(feats["0"], rois, 0.25, 7, 7, 2, box.aligned))
    if detectron2_available():
        from detectron2.modeling.poolers import ROIPooler
        from detectron2.structures import Boxes

        ref = ROIPooler((7, 7), scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32], sampling_ratio=2, pooler_type=pooler_type)
        torch.testing.assert_close(ours, ref([feats[str(k)] for k in range(4)], [Boxes(boxes)]))


def _sizes(model, n=200):
    torch.manual_seed(0)
    model.train()
    return {min(model.transform.resize(torch.zeros(3, 100, 150), None)[0].shape[-2:]) for _ in range(n)}


def test_min_size_train_sampling_choice_and_range():
    """ResizeShortestEdge: 'choice' draws one of MIN_SIZE_TRAIN, 'range' any integer in
    [min, max] (it used to behave as 'choice'); the shorter side takes the drawn size."""
    choice = _sizes(build("INPUT.MIN_SIZE_TRAIN", "(64, 80)", "INPUT.MAX_SIZE_TRAIN", "1000"))
    assert choice == {64, 80}
    ranged = _sizes(build("INPUT.MIN_SIZE_TRAIN", "(64, 80)", "INPUT.MIN_SIZE_TRAIN_SAMPLING", "range",
                          "INPUT.MAX_SIZE_TRAIN", "1000"))
    assert ranged == set(range(64, 81))
    capped = build("INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "80")
    capped.train()
    assert max(capped.transform.resize(torch.zeros(3, 100, 150), None)[0].shape[-2:]) == 80


def test_test_sizes_resize_at_evaluation():
    """In evaluation the model resizes to MIN_SIZE_TEST / MAX_SIZE_TEST (torchvision would
    take the last training size), and returns boxes in the input's pixels."""
    model = build("INPUT.MIN_SIZE_TRAIN", "(64, 80)", "INPUT.MIN_SIZE_TEST", "72", "INPUT.MAX_SIZE_TEST", "100",
                  "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")
    model.eval()
    images, _ = model.transform([torch.rand(3, 100, 120)])
    assert images.image_sizes == [(72, 86)]
    images, _ = model.transform([torch.rand(3, 40, 120)])
    assert images.image_sizes == [(33, 100)]  # the longer side capped at MAX_SIZE_TEST
    with torch.no_grad():
        out = model([torch.rand(3, 100, 120)])[0]
    assert out["boxes"][:, 2].max() <= 120 and out["boxes"][:, 3].max() <= 100


# ---------------------------------------------------------------------------- data
@pytest.fixture()
def tiny_coco(tmp_path):
    """Three images (landscape, portrait, one without objects) with boxes, polygons and
    person keypoints, registered as a COCO-json dataset."""
    from scrl_d2.detection import register_coco_json

    rng = np.random.default_rng(0)
    names = ["nose", "left_eye", "right_eye"]
    images, anns = [], []
    for i, (w, h) in enumerate([(64, 48), (40, 56), (50, 50)], start=1):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": w, "height": h})
        if i == 3:
            continue
        anns.append({"id": i, "image_id": i, "category_id": 1, "iscrowd": 0, "area": 300.0,
                     "bbox": [4.0, 6.0, 20.0, 15.0], "segmentation": [[4, 6, 24, 6, 24, 21, 4, 21]],
                     "keypoints": [10, 8, 2, 6, 7, 2, 15, 7, 1], "num_keypoints": 3})
    cats = [{"id": 1, "name": "person", "keypoints": names, "skeleton": []}]
    json_file = tmp_path / "ann.json"
    json_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    register_coco_json("tiny_coco_keys_test", str(json_file), str(tmp_path))
    return "tiny_coco_keys_test"


def _dataset(name, **kw):
    from scrl_d2.detection.torchvision_data import CocoDetectionDataset

    return CocoDetectionDataset(name, train=True, with_masks=kw.pop("with_masks", False), **kw)


def _always_flip(monkeypatch):
    real = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros(()) if a == ((),) else real(*a, **k))


def test_random_flip_horizontal_vertical_none(tiny_coco, monkeypatch):
    """The flipped image's box covers the same pixels as the original's box, mirrored:
    horizontally in x, vertically in y ('vertical' used to flip horizontally)."""
    _always_flip(monkeypatch)
    plain = _dataset(tiny_coco, flip="none")[0]
    img, t = plain
    x0, y0, x1, y1 = t["boxes"][0].int().tolist()
    for flip, dims in (("horizontal", [-1]), ("vertical", [-2])):
        fimg, ft = _dataset(tiny_coco, flip=flip, with_masks=True, mask_format="bitmask",
                            with_keypoints=True)[0]
        assert torch.equal(fimg, img.flip(dims))
        a0, b0, a1, b1 = ft["boxes"][0].int().tolist()
        assert torch.equal(fimg[:, b0:b1, a0:a1], img[:, y0:y1, x0:x1].flip(dims))
        m = ft["masks"][0]
        assert torch.equal(m.nonzero().min(0).values, torch.tensor([b0, a0]))
    assert torch.equal(_dataset(tiny_coco, flip="none")[0][0], img)


def test_mask_targets_in_both_formats_as_detectron2(tiny_coco):
    """'polygon' keeps polygons and rasterises them inside each box; 'bitmask' crops the
    full-image mask with an aligned RoIAlign, thresholded at 0.5 (Detectron2's two
    PolygonMasks / BitMasks.crop_and_resize)."""
    from scrl_d2.detection.torchvision_model import PolygonMasks, _mask_targets

    poly = _dataset(tiny_coco, flip="none", with_masks=True, mask_format="polygon")[0][1]["masks"]
    bit = _dataset(tiny_coco, flip="none", with_masks=True, mask_format="bitmask")[0][1]["masks"]
    assert isinstance(poly, PolygonMasks) and bit.shape == (1, 48, 64)
    # the box holds the 20 x 15 rectangle's left half: the left half of the target is 1
    boxes, idx = torch.tensor([[4.0, 6.0, 44.0, 21.0]]), torch.tensor([0])
    for t in (_mask_targets(poly, boxes, idx, 8), _mask_targets(bit, boxes, idx, 8)):
        assert torch.equal(t[0], torch.cat([torch.ones(8, 4), torch.zeros(8, 4)], dim=1)), t
    if detectron2_available():
        from detectron2.structures import BitMasks
        from detectron2.structures import PolygonMasks as D2Polygons

        g = torch.Generator().manual_seed(0)
        boxes = torch.rand(20, 2, generator=g) * 30
        boxes = torch.cat([boxes, boxes + 3 + torch.rand(20, 2, generator=g) * 30], dim=1)
        idx = torch.zeros(20, dtype=torch.long)
        d2p = D2Polygons([[np.array([4, 6, 24, 6, 24, 21, 4, 21.0])]] * 20).crop_and_resize(boxes, 14)
        assert torch.equal(_mask_targets(poly, boxes, idx, 14), d2p.float())
        tri = [np.array([3.3, 5.1, 40.7, 12.9, 17.2, 44.6])]  # diagonal edges, fractional corners
        d2t = D2Polygons([tri] * 20).crop_and_resize(boxes, 14)
        assert torch.equal(PolygonMasks([tri]).crop_and_resize(boxes, idx, 14), d2t.float())
        d2b = BitMasks(bit.bool().repeat(20, 1, 1)).crop_and_resize(boxes, 14)
        assert torch.equal(_mask_targets(bit, boxes, idx, 14), d2b.float())
    # resizing carries polygons with the image
    model = build(config="demo/mask_rcnn_demo.yaml")
    model.train()
    img, t = model.transform.resize(torch.zeros(3, 48, 64), {"boxes": torch.tensor([[4.0, 6.0, 24.0, 21.0]]),
                                                            "masks": poly})
    sx, sy = img.shape[-1] / 64, img.shape[-2] / 48
    np.testing.assert_allclose(t["masks"].polygons[0][0], np.array([4 * sx, 6 * sy, 24 * sx, 6 * sy, 24 * sx,
                                                                    21 * sy, 4 * sx, 21 * sy]), rtol=1e-6)
    np.testing.assert_allclose(t["boxes"][0].numpy(), np.array([4 * sx, 6 * sy, 24 * sx, 21 * sy]), rtol=1e-5)


def test_keypoints_take_detectron2s_pixel_convention(tiny_coco, monkeypatch):
    """COCO keypoints are pixel indices: +0.5 on load (flips then mirror exactly), -0.5 on
    the way back to COCO results; MIN_KEYPOINTS_PER_IMAGE drops images with fewer."""
    from scrl_d2.detection.coco_eval import predictions_to_coco

    k = _dataset(tiny_coco, flip="none", with_keypoints=True)[0][1]["keypoints"][0]
    assert k[:, :2].tolist() == [[10.5, 8.5], [6.5, 7.5], [15.5, 7.5]]
    _always_flip(monkeypatch)
    kf = _dataset(tiny_coco, flip="horizontal", with_keypoints=True)[0][1]["keypoints"][0]
    # mirrored about the 64 px width, left_eye and right_eye swapped
    assert kf[:, :2].tolist() == [[53.5, 8.5], [48.5, 7.5], [57.5, 7.5]]
    out = [{"boxes": torch.tensor([[0.0, 0, 5, 5]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1]),
            "keypoints": k[None]}]
    rec = predictions_to_coco(out, [1], {1: 1})[0]
    assert rec["keypoints"][:6] == [10.0, 8.0, 2.0, 6.0, 7.0, 2.0]
    assert len(_dataset(tiny_coco, with_keypoints=True, min_keypoints=3).ids) == 2
    with pytest.raises(ValueError, match="no usable images"):
        _dataset(tiny_coco, with_keypoints=True, min_keypoints=4)
    if detectron2_available():  # the same numbers as Detectron2's own loader
        from detectron2.data.datasets import load_coco_json

        from scrl_d2.detection.catalog import get_dataset

        paths = get_dataset(tiny_coco).paths()
        d2 = load_coco_json(paths["json_file"], paths["image_root"], extra_annotation_keys=None)
        assert np.asarray(d2[0]["annotations"][0]["keypoints"]).reshape(3, 3)[:, :2].tolist() == k[:, :2].tolist()


def test_filter_empty_annotations(tiny_coco):
    assert len(_dataset(tiny_coco, filter_empty=True).ids) == 2
    assert len(_dataset(tiny_coco, filter_empty=False).ids) == 3


def test_aspect_ratio_grouping_batches_like_orientations(tiny_coco):
    """Detectron2's grouping: every batch holds only landscape or only portrait images."""
    from scrl_d2.detection.sampler import TrainingBatches

    ds = _dataset(tiny_coco, filter_empty=False)
    assert ds.buckets == [0, 1, 1]  # 64x48 landscape; 40x56 portrait; 50x50 not landscape
    stream = iter(TrainingBatches(len(ds), 2, seed=0, buckets=ds.buckets, rank=0, world=1))
    batches = [[i for i, _ in next(stream)] for _ in range(30)]
    assert all(len({ds.buckets[i] for i in b}) == 1 for b in batches)
    assert {ds.buckets[b[0]] for b in batches} == {0, 1}
    plain = iter(TrainingBatches(len(ds), 2, seed=0, rank=0, world=1))
    assert any(len({ds.buckets[i] for i, _ in next(plain)}) == 2 for _ in range(30))


def test_seed_fixes_the_data_order():
    from scrl_d2.detection.sampler import TrainingBatches

    def first(seed):
        it = iter(TrainingBatches(50, 1, seed=seed, rank=0, world=1))
        return [next(it)[0][0] for _ in range(50)]

    assert first(1) == first(1) and first(1) != first(2)


def test_schedule_and_optimizer_follow_detectron2(tmp_path):
    """Learning rate per iteration and per-parameter (lr, weight decay) equal Detectron2's
    build_lr_scheduler / build_optimizer for the same config (with Detectron2), or its
    documented rules (without)."""
    from scrl_d2.detection.torchvision_finetune import lr_at, param_groups

    opts = ["SOLVER.BASE_LR", "0.1", "SOLVER.STEPS", "(30, 60)", "SOLVER.GAMMA", "0.5", "SOLVER.MAX_ITER", "80",
            "SOLVER.WARMUP_ITERS", "10", "SOLVER.WARMUP_FACTOR", "0.01", "SOLVER.WEIGHT_DECAY", "0.001",
            "SOLVER.WEIGHT_DECAY_NORM", "0.0", "SOLVER.MOMENTUM", "0.8", "SOLVER.NESTEROV", "True",
            "MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "1"]
    for method, bias in (("linear", "1.0"), ("constant", "2.0")):
        cfg = cfg_of(*opts, "SOLVER.WARMUP_METHOD", method, "SOLVER.BIAS_LR_FACTOR", bias, "OUTPUT_DIR", str(tmp_path))
        lrs = [lr_at(cfg, it) for it in range(80)]
        assert lrs[0] == pytest.approx(0.001) and lrs[20] == pytest.approx(0.1) and lrs[70] == pytest.approx(0.025)
        assert lrs[5] == pytest.approx(0.001 if method == "constant" else 0.1 * (0.01 * 0.5 + 0.5))
        from scrl_d2.detection.torchvision_model import build_torchvision_detector

        model = build_torchvision_detector(cfg)
        ours = {id(p): (g["lr_factor"], g["weight_decay"]) for g in param_groups(model, cfg) for p in g["params"]}
        assert len(ours) == sum(p.requires_grad for p in model.parameters())
        bn = model.backbone.body.layer2[0].bn1
        assert ours[id(bn.weight)] == (1.0, 0.0)
        assert ours[id(model.roi_heads.box_predictor.cls_score.weight)] == (1.0, 0.001)
        assert ours[id(model.roi_heads.box_predictor.cls_score.bias)] == ((2.0, 0.001) if bias == "2.0"
                                                                         else (1.0, 0.001))
        from scrl_d2.detection.torchvision_finetune import TorchvisionDetectionTrainer

        sgd = TorchvisionDetectionTrainer(cfg).optimizer  # what fine-tuning steps with
        assert [(g["momentum"], g["nesterov"]) for g in sgd.param_groups] == [(0.8, True)] * len(sgd.param_groups)
        assert sorted({g["weight_decay"] for g in sgd.param_groups}) == [0.0, 0.001]
        if detectron2_available():
            from detectron2.config import get_cfg as d2_get_cfg
            from detectron2.solver import build_lr_scheduler, get_default_optimizer_params

            d2cfg = d2_get_cfg()
            d2cfg.merge_from_list(opts[:20] + ["SOLVER.WARMUP_METHOD", method])
            sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
            sched = build_lr_scheduler(d2cfg, sgd)
            d2 = []
            for _ in range(80):
                d2.append(sgd.param_groups[0]["lr"])
                sched.step()
            assert lrs == pytest.approx(d2, rel=1e-9)
            groups = get_default_optimizer_params(model, base_lr=cfg.SOLVER.BASE_LR,
                                                  weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
                                                  bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR)
            theirs = {id(p): (g.get("lr", cfg.SOLVER.BASE_LR) / cfg.SOLVER.BASE_LR,
                              g.get("weight_decay", cfg.SOLVER.WEIGHT_DECAY)) for g in groups for p in g["params"]}
            assert {k: (pytest.approx(a), b) for k, (a, b) in ours.items()} == theirs


def _trainer(tmp_path, dataset, *opts):
    from scrl_d2.detection.torchvision_finetune import TorchvisionDetectionTrainer

    cfg = cfg_of("OUTPUT_DIR", str(tmp_path), "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
                 "SOLVER.WARMUP_ITERS", "1", "MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN",
                 "DATASETS.TRAIN", f"('{dataset}',)", "DATASETS.TEST", f"('{dataset}',)",
                 "MODEL.ROI_HEADS.NUM_CLASSES", "1", *opts)
    return TorchvisionDetectionTrainer(cfg)


def test_eval_period_evaluates_during_training(tmp_path, tiny_coco, monkeypatch):
    t = _trainer(tmp_path, tiny_coco, "SOLVER.MAX_ITER", "3", "TEST.EVAL_PERIOD", "1",
                 "TEST.PRECISE_BN.ENABLED", "False", "LOG_PERIOD", "1")
    seen, results = [], tmp_path / "results.json"
    real = t.evaluate
    monkeypatch.setattr(t, "evaluate", lambda tag="eval": seen.append((tag, results.exists())) or real(tag=tag))
    t.resume_or_load(resume=False)
    t.train()
    # results.json is the final evaluation's alone: the transfer suite counts a run with it as complete
    assert seen == [("iter1", False), ("iter2", False), ("final", False)] and results.exists()
    history = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    assert [h["iteration"] for h in history if any(k.endswith("bbox/AP") for k in h)] == [0, 1, 2]


def test_precise_bn_recomputes_statistics(tmp_path, tiny_coco, monkeypatch):
    import fvcore.nn.precise_bn as pbn

    real, batches = pbn.update_bn_stats, []
    monkeypatch.setattr(pbn, "update_bn_stats", lambda m, data, n: batches.append(n) or real(m, data, n))
    for enabled in (False, True):
        t = _trainer(tmp_path / str(enabled), tiny_coco, "TEST.PRECISE_BN.ENABLED", str(enabled),
                     "TEST.PRECISE_BN.NUM_ITER", "3")
        bn = t.model.backbone.body.layer3[0].bn1
        before = bn.running_mean.clone()
        batches.clear()
        t._precise_bn()
        assert torch.equal(bn.running_mean, before) != enabled
        assert batches == ([3] if enabled else [])


def test_keypoint_oks_sigmas_reach_cocoeval(tiny_coco):
    """TEST.KEYPOINT_OKS_SIGMAS replaces COCO's sigmas in COCOeval (a wrong length is named)."""
    from scrl_d2.detection.coco_eval import evaluate_predictions

    ds = _dataset(tiny_coco, with_keypoints=True)
    preds = [{"image_id": 1, "category_id": 1, "bbox": [4.0, 6.0, 20.0, 15.0], "score": 0.9,
              "keypoints": [12, 9, 1, 8, 8, 1, 17, 8, 1]}]  # 1-2 px off each
    preds.append(dict(preds[0], image_id=2))
    loose = evaluate_predictions(ds.coco, preds, ["keypoints"], ds.class_names, kpt_oks_sigmas=[1.0, 1.0, 1.0])
    tight = evaluate_predictions(ds.coco, preds, ["keypoints"], ds.class_names, kpt_oks_sigmas=[0.01, 0.01, 0.01])
    assert loose["keypoints"]["AP"] == pytest.approx(100.0) and tight["keypoints"]["AP"] < 50
    with pytest.raises(ValueError, match="TEST.KEYPOINT_OKS_SIGMAS has 2 values"):
        evaluate_predictions(ds.coco, preds, ["keypoints"], ds.class_names, kpt_oks_sigmas=[1.0, 1.0])


@pytest.mark.skipif(detectron2_available(), reason="Detectron2 is installed: this checks a plain install")
def test_plain_install_names_detectron2_for_what_needs_it(tmp_path, monkeypatch):
    """Without Detectron2: a C4 protocol stops at start-up with one line naming the key and
    Detectron2; forcing the Detectron2 backend says it is not installed."""
    from test_engine import run_cli

    monkeypatch.delenv("SCRL_D2_BACKEND")
    c4 = os.path.join(ROOT, "configs", "moco", "faster_rcnn_R_50_C4_voc0712_24k.yaml")
    r = run_cli("--config-file", c4, "OUTPUT_DIR", str(tmp_path / "a"), env_extra={"SCRL_D2_BACKEND": "auto"},
                check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "MODEL.BACKBONE.NAME: 'build_resnet_backbone'" in r.stderr and "Detectron2" in r.stderr
    r = run_cli("--config-file", DEMO, "OUTPUT_DIR", str(tmp_path / "b"), env_extra={"SCRL_D2_BACKEND": "detectron2"},
                check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "Detectron2 is not installed" in r.stderr
