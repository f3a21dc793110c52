"""Every box pair is pooled from the intended image and rectangle at the shipped batch
size (256 images per process: view-2 indices 256..511), under each autocast dtype the
CPU has, on both backends; BYOL's global pooling likewise. The check is structural (see
scrl_d2.modeling.audit): the RoIs the RoIAlign kernel receives, and pooled values of a
feature map that encodes each image's index."""
import os

import pytest
import torch

from conftest import ROOT, SHIPPED_TINY
from scrl_d2.backend import detectron2_available
from scrl_d2.config import get_cfg
from scrl_d2.data import build_pretrain_loader
from scrl_d2.engine.trainer import amp_dtype
from scrl_d2.modeling import build_model
from scrl_d2.modeling.audit import audit_pooling

BACKENDS = ["torchvision", pytest.param("detectron2", marks=pytest.mark.skipif(
    not detectron2_available(), reason="Detectron2 is not installed (see docs/detectron2.md)"))]
CPU = torch.device("cpu")


def shipped_cfg(config: str, folder: str):
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs", config))
    cfg.merge_from_list(SHIPPED_TINY + ["DATASETS.TRAIN", f"('images:{folder}',)"])
    return cfg


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", ["scrl_pretrain.yaml", "byol_pretrain.yaml"])
def test_every_unit_comes_from_the_intended_image_at_the_shipped_batch(batch_scale_folder, backend, config,
                                                                        monkeypatch):
    monkeypatch.setenv("SCRL_D2_BACKEND", backend)
    cfg = shipped_cfg(config, batch_scale_folder)
    assert cfg.SOLVER.IMS_PER_GPU == 256 and cfg.SOLVER.AMP.ENABLED  # as shipped
    shipped_dtype = amp_dtype(cfg, CPU)
    assert shipped_dtype == torch.bfloat16  # "auto" on CPU (and on A100/H100)
    loader, _, _ = build_pretrain_loader(cfg, cfg.SEED)  # a loader worker draws the boxes
    batch = next(iter(loader))
    batch.pop("skipped"), batch.pop("seed")
    torch.manual_seed(0)
    model = build_model(cfg)
    scrl = cfg.MODEL.META_ARCHITECTURE == "SCRL"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for dtype in (None, torch.bfloat16, torch.float16):
        audit = audit_pooling(model, batch, dtype, CPU)
        assert audit.ok, audit.as_dict()
        if scrl:
            pairs = batch["pair_index"].numel()
            assert audit.kernel_calls == 2 and audit.rois == 2 * 2 * pairs and audit.rois_dtype == "float32"
            assert batch["pair_index"].max() // cfg.MODEL.SCRL.NUM_BOXES > 200  # view-2 indices well past 256
        else:
            assert audit.kernel_calls == 0 and audit.units == 2 * 2 * 256
        # the check is not vacuous: most units' expected values spell out their image
        assert audit.units_readable > 0.5 * audit.units, audit.as_dict()
    for k, v in model.state_dict().items():  # the audit leaves the model as it was
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("defect,wrong_image,wrong_rectangle", [
    ("index", 2, 0),  # one view-2 box read from the previous image (online and target pass)
    ("rectangle", 0, 2),  # one box half a pixel off
    ("bf16_rois", 0, None),  # the old BoxPooler: RoIs cast to the feature dtype
])
def test_the_audit_sees_a_misread_box(batch_scale_folder, defect, wrong_image, wrong_rectangle):
    cfg = shipped_cfg("scrl_pretrain.yaml", batch_scale_folder)
    cfg.merge_from_list(["DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_GPU", "64"])
    loader, _, _ = build_pretrain_loader(cfg, cfg.SEED)
    batch = next(iter(loader))
    batch.pop("skipped"), batch.pop("seed")
    model = build_model(cfg)
    assert audit_pooling(model, batch, torch.bfloat16, CPU).ok
    pool = model.pooler.forward

    def misread(features, rois):
        rois = rois.clone()
        if defect == "index":
            rois[-1, 0] -= 1
        elif defect == "rectangle":
            rois[0, 1:] += 0.5
        else:
            rois = rois.to(features.dtype).float()
        return pool(features, rois)

    model.pooler.forward = misread
    bad = audit_pooling(model, batch, torch.bfloat16, CPU)
    assert not bad.ok and bad.wrong_image == wrong_image
    if wrong_rectangle is not None:
        assert bad.wrong_rectangle == wrong_rectangle
    else:  # bf16 rounds most coordinates of a 32 px view
        assert bad.wrong_rectangle > 0.5 * bad.rois
    if defect == "index":
        assert bad.units_wrong_image == 2
