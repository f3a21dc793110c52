import glob
import os
import re

import pytest

from conftest import ROOT, cfg_at, flat_items
from scrl_d2.config import ConfigError, add_scrl_config, config_from_args, get_cfg
from scrl_d2.config.config import CfgNode
from scrl_d2.modeling import build_model

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))

pytestmark = pytest.mark.plain  # the configs of a plain install (no Detectron2)


def load(path):
    return config_from_args(path)  # as tools/train_net.py loads it


def test_shipped_pretraining_configs_hold_the_release_values():
    expect = {  # LR, WD, EMA, epochs (method.md's table)
        "scrl_pretrain.yaml": ("SCRL", 0.45, 1e-6, 0.97, 200), "scrl_pretrain_1000ep.yaml": ("SCRL", 0.2, 1.5e-6, 0.996, 1000),
        "byol_pretrain.yaml": ("BYOL", 0.45, 1e-6, 0.97, 200), "byol_pretrain_1000ep.yaml": ("BYOL", 0.2, 1.5e-6, 0.996, 1000),
    }
    for name, (arch, lr, wd, m, ep) in expect.items():
        c = load(os.path.join(ROOT, "configs", name))
        assert (c.MODEL.META_ARCHITECTURE, c.SOLVER.BASE_LR, c.SOLVER.WEIGHT_DECAY, c.MODEL.BYOL.BASE_MOMENTUM,
                c.SOLVER.EPOCHS) == (arch, lr, wd, m, ep)
        assert c.SOLVER.WARMUP_EPOCHS == 10 and c.SOLVER.IMS_PER_GPU == 256 and c.MODEL.RESNETS.DEPTH == 50
        assert tuple(c.INPUT.CROP_SCALE) == (0.2, 1.0) and tuple(c.INPUT.BLUR_PROB) == (1.0, 0.1)
        assert tuple(c.INPUT.SOLARIZE_PROB) == (0.0, 0.2) and c.INPUT.BLUR_TYPE == "resize"
    c = load(os.path.join(ROOT, "configs", "scrl_pretrain.yaml"))
    assert (c.MODEL.SCRL.NUM_BOXES, c.MODEL.SCRL.MIN_SIZE, c.MODEL.SCRL.IOU_THRESHOLD) == (10, 32, 0.5)
    for name, lr in (("scrl_pretrain.yaml", 0.2), ("byol_pretrain.yaml", 0.05), ("byol_pretrain_1000ep.yaml", 0.05)):
        le = load(os.path.join(ROOT, "configs", name)).LINEAR_EVAL  # the release's linear-eval protocol
        assert (le.ENABLED, le.BASE_LR, le.EPOCHS, le.WARMUP_EPOCHS, le.IMS_PER_GPU, le.OPTIMIZER, le.NESTEROV,
                le.WEIGHT_DECAY, tuple(le.CROP_SCALE)) == (True, lr, 80, 5, 128, "LARS", True, 0.0, (0.08, 1.0))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_shipped_config_builds_its_model(path):
    cfg = load(path)
    if cfg.MODEL.META_ARCHITECTURE in ("GeneralizedRCNN", "RetinaNet"):  # a detection fine-tuning config
        from scrl_d2.backend import use_detectron2

        cfg.MODEL.DEVICE = "cpu"
        if use_detectron2():
            from detectron2.modeling import build_model as build_detector
        else:
            from scrl_d2.detection.torchvision_model import build_torchvision_detector as build_detector

            # Detectron2-only protocols (C4 heads; LVIS's repeat-factor sampler): refused by name
            refused = ("MODEL.BACKBONE.NAME: 'build_resnet_backbone'" if cfg.MODEL.BACKBONE.NAME == "build_resnet_backbone"
                       else "DATALOADER.SAMPLER_TRAIN: 'RepeatFactorTrainingSampler'"
                       if cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler" else None)
            if refused:
                with pytest.raises(ConfigError, match=re.escape(refused) + ".*only the Detectron2 path supports it"):
                    build_detector(cfg)
                return
        model = build_detector(cfg)
        if cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
            assert type(model).__name__.startswith("RetinaNet")
            return
        assert (getattr(model.roi_heads, "mask_head", None) is not None) == cfg.MODEL.MASK_ON
        return
    if cfg.MODEL.RESNETS.DEPTH == 50:  # keep it quick: the R50 graph without the 4096-wide heads
        cfg.MODEL.BYOL.PROJECTOR_HIDDEN_DIM = cfg.MODEL.BYOL.PREDICTOR_HIDDEN_DIM = 16
    cfg.MODEL.PROBE.NUM_CLASSES = 5
    assert type(build_model(cfg)).__name__ == cfg.MODEL.META_ARCHITECTURE


def test_resnet101_is_supported():
    cfg = load(os.path.join(ROOT, "configs", "scrl_pretrain.yaml"))
    cfg.merge_from_list(["MODEL.RESNETS.DEPTH", "101", "MODEL.BYOL.PROJECTOR_HIDDEN_DIM", "16",
                         "MODEL.BYOL.PREDICTOR_HIDDEN_DIM", "16", "MODEL.PROBE.ENABLED", "False"])
    assert len(build_model(cfg).backbone.res4) == 23


def test_unknown_key_in_yaml_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("_BASE_: '%s'\nSOLVER:\n  BASE_LRR: 0.1\n" % os.path.join(ROOT, "configs", "scrl_pretrain.yaml"))
    with pytest.raises(ConfigError, match=r"SOLVER\.BASE_LRR.*bad\.yaml"):
        load(str(p))


def test_unknown_or_mistyped_override_is_named():
    cfg = get_cfg()
    with pytest.raises(ConfigError, match=r"MODEL\.RESNET\.DEPTH"):
        cfg.merge_from_list(["MODEL.RESNET.DEPTH", "101"])
    with pytest.raises(ConfigError, match=r"SOLVER\.EPOCHS"):
        cfg.merge_from_list(["SOLVER.EPOCHS", "'many'"])
    with pytest.raises(ConfigError, match="KEY VALUE"):
        cfg.merge_from_list(["SOLVER.EPOCHS"])
    cfg.merge_from_list(["SOLVER.BASE_LR", "1", "SOLVER.EPOCHS", "3"])  # int for a float is fine
    assert cfg.SOLVER.BASE_LR == 1.0 and isinstance(cfg.SOLVER.BASE_LR, float)


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="nope.yaml"):
        load("nope.yaml")


def test_add_scrl_config_keeps_existing_values():
    other = CfgNode({"MODEL": CfgNode({"RESNETS": CfgNode({"DEPTH": 101})}), "FOO": 1})
    add_scrl_config(other)
    assert other.MODEL.RESNETS.DEPTH == 101 and other.MODEL.SCRL.NUM_BOXES == 10 and other.FOO == 1


def test_detection_configs_take_detectron2_defaults_and_pretraining_configs_ours():
    """A detection config means what it means in Detectron2: every key Detectron2 defines
    keeps Detectron2's default unless the file sets it (the table in detection_defaults.py,
    or Detectron2's own get_cfg when installed); pretraining configs keep ours."""
    from scrl_d2.config.defaults import _C
    from scrl_d2.config.detection_defaults import detection_defaults

    det = config_from_args("", ["MODEL.META_ARCHITECTURE", "GeneralizedRCNN"])
    table = detection_defaults()
    assert (det.SOLVER.AMP.ENABLED, det.TEST.EVAL_PERIOD, det.SOLVER.WEIGHT_DECAY, det.MODEL.RESNETS.NORM,
            det.MODEL.BACKBONE.FREEZE_AT, det.MODEL.RESNETS.STRIDE_IN_1X1, det.INPUT.FORMAT) == \
        (False, 0, 0.0001, "FrozenBN", 2, True, "BGR")
    assert det.MODEL.PIXEL_STD == [1.0, 1.0, 1.0] and det.LOG_PERIOD == _C.LOG_PERIOD  # ours only where D2 has none

    for key, value in flat_items(table):
        assert cfg_at(det, key) == value, key
    pre = config_from_args(os.path.join(ROOT, "configs", "scrl_pretrain.yaml"))
    assert pre.SOLVER.AMP.ENABLED and pre.MODEL.RESNETS.NORM == "SyncBN" and pre.INPUT.FORMAT == "RGB"
