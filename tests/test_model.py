import math

import pytest
import torch
import torchvision

from conftest import tiny_cfg
from scrl_d2.checkpoint import torchvision_to_d2
from scrl_d2.modeling import ResNet, build_model, symmetric_loss
from scrl_d2.modeling.meta_arch.byol import regression_loss
from scrl_d2.solver import LARS, build_lr_scheduler, build_momentum_scheduler, build_optimizer, split_norm_and_bias


def test_loss_zero_when_prediction_equals_target_and_positive_otherwise():
    z = torch.randn(12, 32)
    p = torch.cat([z[6:], z[:6]]) * 3.0  # view-1 prediction = view-2 target (scale does not matter)
    assert symmetric_loss(p, z).abs().item() < 1e-5
    assert symmetric_loss(torch.randn(12, 32), z).item() > 0.5
    assert torch.allclose(regression_loss(z, -z), torch.full((12,), 4.0))


def test_loss_weights_ignore_pairs():
    z = torch.randn(8, 16)
    p = torch.cat([z[4:], z[:4]]).clone()
    p[0] = -p[0]  # a bad pair ...
    w = torch.tensor([0.0, 1, 1, 1])  # ... that does not count
    assert symmetric_loss(p, z, w).item() < 1e-5
    assert symmetric_loss(p, z, torch.zeros(4)).item() == 0.0


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_equals_torchvision_resnet(depth):
    tv = getattr(torchvision.models, f"resnet{depth}")().eval()
    ours = ResNet(depth=depth, res2_out_channels=64 if depth < 50 else 256).eval()
    ours.load_state_dict({torchvision_to_d2(k): v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(2, 3, 64, 64)
    body = torch.nn.Sequential(*list(tv.children())[:-2])
    torch.testing.assert_close(ours(x)["res5"], body(x))
    assert "res3.0.shortcut.norm.running_mean" in ours.state_dict() and "stem.conv1.norm.weight" in ours.state_dict()


def _batch(cfg, B=4, valid=True):
    S = cfg.INPUT.CROP_SIZE
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[4.0, 4.0, 40.0, 40.0]]).repeat(B, cfg.MODEL.SCRL.NUM_BOXES, 1)
    return {"view1": torch.randint(0, 255, (B, 3, S, S), dtype=torch.uint8, generator=g),
            "view2": torch.randint(0, 255, (B, 3, S, S), dtype=torch.uint8, generator=g),
            "boxes1": boxes, "boxes2": boxes.clone(),
            "box_valid": torch.full((B, cfg.MODEL.SCRL.NUM_BOXES), valid), "label": torch.zeros(B, dtype=torch.long)}


def test_ema_update_and_target_init():
    cfg = tiny_cfg("unused", "BYOL")
    cfg.MODEL.BYOL.TARGET_INIT = "online"
    model = build_model(cfg)
    for o, t in zip(model.backbone.parameters(), model.target_backbone.parameters()):
        assert torch.equal(o, t) and not t.requires_grad
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    before = [t.clone() for t in model.target_parameters()]
    model.update_target(0.9)
    online = list(model.backbone.parameters()) + list(model.projector.parameters())
    for b, t, o in zip(before, model.target_parameters(), online):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    cfg.MODEL.BYOL.TARGET_INIT = "random"
    m2 = build_model(cfg)
    assert not torch.equal(m2.backbone.stem.conv1.weight, m2.target_backbone.stem.conv1.weight)


def test_momentum_and_lr_schedules():
    cfg = tiny_cfg("unused")
    cfg.SOLVER.EPOCHS, cfg.SOLVER.WARMUP_EPOCHS, cfg.MODEL.BYOL.BASE_MOMENTUM = 10, 2, 0.97
    lr = build_lr_scheduler(cfg, 0.9, iters_per_epoch=5)
    assert lr(0) == pytest.approx(0.9 / 10)  # first step already non-zero, as the release
    assert lr(9) == pytest.approx(0.9)  # end of warm-up
    mid = 0.9 * 0.5 * (1 + math.cos(math.pi * (11 / 50 - 0.2) / 0.8))
    assert lr(10) == pytest.approx(mid)
    assert lr(49) == pytest.approx(0.0, abs=1e-12)  # last step
    m = build_momentum_scheduler(cfg, iters_per_epoch=5)
    assert m(0) == pytest.approx(0.97)
    assert m(25) == pytest.approx(1 - 0.03 * (math.cos(math.pi * 0.5) + 1) / 2)
    assert m(49) == pytest.approx(1 - 0.03 * (math.cos(math.pi * 49 / 50) + 1) / 2)


def test_lars_excludes_norm_and_bias_by_kind():
    cfg = tiny_cfg("unused")
    cfg.MODEL.PROBE.ENABLED, cfg.MODEL.PROBE.NUM_CLASSES = True, 3
    model = build_model(cfg)
    groups = split_norm_and_bias(model, model.online_parameters())
    excluded = {id(p) for p in groups["exclude"]}
    names = {n for n, p in model.named_parameters() if id(p) in excluded}
    # shortcut norms and head BNs are excluded too (a name match on "bn" would miss them)
    assert "backbone.res3.0.shortcut.norm.weight" in names
    assert "projector.net.1.weight" in names and "predictor.net.0.bias" in names and "probe.bias" in names
    assert "backbone.res3.0.shortcut.weight" not in names and "projector.net.0.weight" not in names
    assert not any(n.startswith("target_") for n, p in model.named_parameters()
                   if id(p) in excluded | {id(q) for q in groups["default"]})
    opt = build_optimizer(cfg, model)
    assert [g.get("lars_exclude", False) for g in opt.param_groups] == [False, True]
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_lars_step_matches_formula():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}],
               lr=0.5, momentum=0.9, weight_decay=0.1, trust_coef=0.001)
    w.grad, b.grad = torch.tensor([0.6, 0.8]), torch.tensor([2.0])
    opt.step()
    d = torch.tensor([0.6, 0.8]) + 0.1 * torch.tensor([3.0, 4.0])
    ratio = 0.001 * 5.0 / (1.0 + 0.1 * 5.0 + 1e-8)
    torch.testing.assert_close(w.data, torch.tensor([3.0, 4.0]) - 0.5 * ratio * d)
    torch.testing.assert_close(b.data, torch.tensor([1.0 - 0.5 * 2.0]))  # plain SGD step
    w.grad, b.grad = torch.tensor([0.6, 0.8]), torch.tensor([2.0])
    opt.step()  # momentum: buf = 0.9 * buf + d
    torch.testing.assert_close(b.data, torch.tensor([0.0 - 0.5 * (0.9 * 2.0 + 2.0)]))


@pytest.mark.parametrize("arch", ["SCRL", "BYOL"])
def test_forward_backward_and_probe_is_detached(arch):
    cfg = tiny_cfg("unused", arch)
    cfg.MODEL.PROBE.ENABLED, cfg.MODEL.PROBE.NUM_CLASSES = True, 3
    model = build_model(cfg).train()
    out = model(_batch(cfg))
    assert set(out) == {"loss", "loss_probe"}  # losses only: Detectron2's trainers sum every value
    assert out["loss"].item() > 0 and model.metrics["num_pairs"].item() == (40 if arch == "SCRL" else 4)
    assert 0 <= model.metrics["probe_acc"].item() <= 1
    out["loss_probe"].backward()  # the probe's loss alone ...
    assert model.probe.weight.grad is not None
    assert all(p.grad is None for p in model.backbone.parameters())  # ... never reaches the encoder


def test_scrl_batch_without_boxes_gives_zero_loss_and_full_graph():
    cfg = tiny_cfg("unused", "SCRL")
    model = build_model(cfg).train()
    out = model(_batch(cfg, valid=False))
    assert out["loss"].item() == 0.0 and model.metrics["num_pairs"].item() == 0
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in model.predictor.parameters())


def test_unknown_meta_architecture_is_named():
    cfg = tiny_cfg("unused")
    cfg.MODEL.META_ARCHITECTURE = "MoCo"
    with pytest.raises(KeyError, match="MoCo"):
        build_model(cfg)
