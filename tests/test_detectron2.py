"""The Detectron2 backend. Skipped, with the reason, where Detectron2 is not installed."""
import os

import pytest
import torch

from scrl_d2.backend import detectron2_available

pytestmark = pytest.mark.skipif(
    not detectron2_available(),
    reason="Detectron2 is not installed (it is on no package registry; see docs/detectron2.md)",
)

from conftest import ROOT, cfg_at, flat_items, tiny_cfg, tiny_opts  # noqa: E402
from test_engine import assert_same_weights, model_state, run_cli  # noqa: E402

PRETRAIN_CONFIGS = ["scrl_pretrain.yaml", "scrl_pretrain_1000ep.yaml", "byol_pretrain.yaml", "byol_pretrain_1000ep.yaml"]


def _cfg(monkeypatch, backend, arch="SCRL", **over):
    monkeypatch.setenv("SCRL_D2_BACKEND", backend)
    cfg = tiny_cfg("unused", arch)
    for k, v in over.items():
        cfg.merge_from_list([k, v])
    return cfg


def _build(monkeypatch, backend, cfg):
    from scrl_d2.modeling import build_model

    monkeypatch.setenv("SCRL_D2_BACKEND", backend)
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.mark.parametrize("name", PRETRAIN_CONFIGS)
def test_registered_and_built_by_detectron2_build_model(monkeypatch, name):
    monkeypatch.setenv("SCRL_D2_BACKEND", "detectron2")
    import detectron2.modeling as d2m

    import scrl_d2
    from scrl_d2.config import get_cfg

    assert scrl_d2.register_detectron2() and "SCRL" in d2m.META_ARCH_REGISTRY and "BYOL" in d2m.META_ARCH_REGISTRY
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs", name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.BYOL.PROJECTOR_HIDDEN_DIM", "16",
                         "MODEL.BYOL.PREDICTOR_HIDDEN_DIM", "16"])
    assert "DEFORM_ON_PER_STAGE" in cfg.MODEL.RESNETS  # Detectron2's keys underneath ours
    model = d2m.build_model(cfg)
    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE
    assert type(model.backbone).__module__.startswith("detectron2.modeling.backbone")
    assert model.backbone.output_shape()["res5"].stride == 32 and model.backbone.output_shape()["res5"].channels == 2048
    if name.startswith("scrl"):
        assert type(model.pooler.d2_roi_align).__module__.startswith("detectron2.layers")


def test_add_scrl_config_on_detectron2_get_cfg():
    from detectron2.config import get_cfg as d2_get_cfg

    from scrl_d2.config import add_scrl_config

    cfg = d2_get_cfg()
    add_scrl_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "byol_pretrain.yaml"))
    assert cfg.MODEL.META_ARCHITECTURE == "BYOL" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert cfg.MODEL.RESNETS.OUT_FEATURES == ["res5"] and cfg.MODEL.BACKBONE.FREEZE_AT == 0


@pytest.mark.parametrize("depth", [18, 50])
def test_same_weights_give_same_res5_on_both_backends(monkeypatch, depth):
    over = {"MODEL.RESNETS.DEPTH": str(depth), "MODEL.RESNETS.RES2_OUT_CHANNELS": "64" if depth < 50 else "256"}
    tv = _build(monkeypatch, "torchvision", _cfg(monkeypatch, "torchvision", **over)).eval()
    d2 = _build(monkeypatch, "detectron2", _cfg(monkeypatch, "detectron2", **over)).eval()
    assert type(d2.backbone).__module__ != type(tv.backbone).__module__
    d2.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96)
    torch.testing.assert_close(d2.backbone(x)["res5"], tv.backbone(x)["res5"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["SCRL", "BYOL"])
def test_same_batch_gives_same_loss_on_both_backends(monkeypatch, arch):
    from test_model import _batch

    tv = _build(monkeypatch, "torchvision", _cfg(monkeypatch, "torchvision", arch))
    d2 = _build(monkeypatch, "detectron2", _cfg(monkeypatch, "detectron2", arch))
    d2.load_state_dict(tv.state_dict(), strict=True)
    cfg = _cfg(monkeypatch, "torchvision", arch)
    batch = _batch(cfg, B=6)
    lt, ld = tv.train()(batch)["loss"], d2.train()(batch)["loss"]
    assert lt.item() > 0
    torch.testing.assert_close(ld, lt, atol=1e-5, rtol=1e-5)
    ld.backward()
    lt.backward()
    g_tv = dict(tv.named_parameters())
    for n, p in d2.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, g_tv[n].grad, atol=1e-5, rtol=1e-4, msg=n)


def test_syncbn_on_one_process_behaves_as_bn(monkeypatch):
    from test_model import _batch

    over = {"MODEL.RESNETS.NORM": "SyncBN", "MODEL.BYOL.HEAD_NORM": "SyncBN"}
    sync = _build(monkeypatch, "detectron2", _cfg(monkeypatch, "detectron2", **over))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in sync.backbone.modules())
    assert isinstance(sync.projector.net[1], torch.nn.SyncBatchNorm)
    plain = {"MODEL.RESNETS.NORM": "BN", "MODEL.BYOL.HEAD_NORM": "BN"}
    bn = _build(monkeypatch, "detectron2", _cfg(monkeypatch, "detectron2", **plain))
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in bn.modules())
    bn.load_state_dict(sync.state_dict(), strict=True)
    batch = _batch(_cfg(monkeypatch, "detectron2"), B=4)
    torch.testing.assert_close(sync.train()(batch)["loss"], bn.train()(batch)["loss"])


@pytest.mark.parametrize("arch", ["SCRL", "BYOL"])
def test_train_net_runs_through_detectron2_and_says_so(tmp_path, image_folder, arch):
    out = str(tmp_path / "d2")
    r = run_cli(*tiny_opts(f"classes:{image_folder}", out, arch), "SOLVER.MAX_ITER", "3",
                env_extra={"SCRL_D2_BACKEND": "detectron2"})
    assert "with the detectron2 backend" in r.stdout and "detectron2.modeling.backbone.resnet.ResNet" in r.stdout
    assert os.path.exists(os.path.join(out, "checkpoint_0_iter3.pth"))


def test_two_processes_launch_through_detectron2(tmp_path, image_folder):
    out = str(tmp_path / "ddp")
    r = run_cli("--num-gpus", "2", *tiny_opts(f"classes:{image_folder}", out), "SOLVER.IMS_PER_GPU", "4",
                "SOLVER.MAX_ITER", "3", env_extra={"SCRL_D2_BACKEND": "detectron2"})
    assert "detectron2.engine.launch" in r.stdout and "weights identical on all 2 processes" in r.stdout


@pytest.mark.parametrize("first,second", [("torchvision", "detectron2"), ("detectron2", "torchvision")])
def test_checkpoint_of_one_backend_resumes_on_the_other(tmp_path, image_folder, first, second):
    data = f"classes:{image_folder}"
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_cli(*tiny_opts(data, straight), env_extra={"SCRL_D2_BACKEND": first})
    run_cli(*tiny_opts(data, split), "SOLVER.MAX_ITER", "6", env_extra={"SCRL_D2_BACKEND": first})
    r = run_cli(*tiny_opts(data, split), env_extra={"SCRL_D2_BACKEND": second})
    assert f"with the {second} backend" in r.stdout and "resumed at epoch 1, iteration 6" in r.stdout
    assert_same_weights(model_state(os.path.join(straight, "checkpoint_2.pth")),
                        model_state(os.path.join(split, "checkpoint_2.pth")), atol=1e-4)


@pytest.mark.parametrize("arch", ["SCRL", "BYOL"])
def test_detectron2_simple_trainer_trains_our_meta_architecture(monkeypatch, image_folder, arch):
    """The trainer contract: forward returns losses only (Detectron2's SimpleTrainer sums
    every value), metrics go to its EventStorage. A few steps with SimpleTrainer on our
    loader, the target's EMA as a Detectron2 hook, give our trainer's losses and weights."""
    import copy

    from detectron2.engine import HookBase, SimpleTrainer

    from scrl_d2.data import build_pretrain_loader
    from scrl_d2.engine.trainer import build_grad_scaler, optimization_step
    from scrl_d2.solver import build_optimizer

    cfg = _cfg(monkeypatch, "detectron2", arch, **{"MODEL.PROBE.ENABLED": "True"})
    cfg.merge_from_list(["DATASETS.TRAIN", f"('classes:{image_folder}',)"])
    loader, _, num_classes = build_pretrain_loader(cfg, cfg.SEED)
    cfg.MODEL.PROBE.NUM_CLASSES = num_classes
    batches = [{k: v for k, v in b.items() if k not in ("skipped", "seed")} for b, _ in zip(loader, range(3))]
    ours = _build(monkeypatch, "detectron2", cfg)
    assert ours.probe is not None
    theirs = copy.deepcopy(ours)

    # our step
    opt = build_optimizer(cfg, ours)
    scaler = build_grad_scaler(None, torch.device("cpu"))
    expected = []
    for b in batches:
        out = optimization_step(ours, ours, opt, scaler, b, None, torch.device("cpu"), momentum=0.99)
        expected.append(float(sum(v.detach() for v in out.values())))

    # Detectron2's SimpleTrainer with an EMA hook
    class TargetEMA(HookBase):
        def after_step(self):
            self.trainer.model.update_target(0.99)

    class Recorder(HookBase):
        def __init__(self):
            self.losses, self.metrics = [], []

        def after_step(self):
            s = self.trainer.storage
            self.losses.append(s.history("total_loss").latest())
            self.metrics.append({k: s.history(k).latest() for k in ("num_pairs", "probe_acc", "loss", "loss_probe")})

    trainer = SimpleTrainer(theirs, iter(batches), build_optimizer(cfg, theirs))
    rec = Recorder()
    trainer.register_hooks([TargetEMA(), rec])
    trainer.train(0, len(batches))
    assert rec.losses == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert all(m["num_pairs"] > 0 for m in rec.metrics)  # the model's metric, reported to EventStorage
    assert_same_weights(ours.state_dict(), theirs.state_dict(), atol=1e-5)


COCO_CONFIGS = sorted(f for f in os.listdir(os.path.join(ROOT, "configs", "coco")) if not f.startswith("Base"))


@pytest.mark.parametrize("name", COCO_CONFIGS)
def test_shipped_coco_configs_load_into_plain_detectron2(name):
    """Every configs/coco file is a Detectron2 config: Detectron2's own get_cfg() (no
    scrl_d2 keys) merges it and build_model builds it, as its tools/train_net.py does."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs", "coco", name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert ("mask" in name) == cfg.MODEL.MASK_ON and ("keypoint" in name) == cfg.MODEL.KEYPOINT_ON
    if cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN":  # the paper's 2fc head, or the named 4conv1fc option
        convs = model.roi_heads.box_head.conv_norm_relus
        assert len(convs) == (4 if "4conv1fc" in name else 0)


def test_demo_detection_configs_load_into_detectron2_with_add_scrl_config():
    """The demo configs use scrl_d2's keys (LOG_PERIOD) and datasets: one call adds them."""
    from detectron2.config import get_cfg

    import scrl_d2  # noqa: F401  (registers the demo detection datasets)
    from scrl_d2.config import add_scrl_config

    for name in ("faster_rcnn_demo.yaml", "mask_rcnn_demo.yaml"):
        cfg = get_cfg()
        add_scrl_config(cfg)
        cfg.merge_from_file(os.path.join(ROOT, "configs", "demo", name))
        assert cfg.LOG_PERIOD == 5 and cfg.MODEL.RESNETS.DEPTH == 18


def test_detection_defaults_table_equals_detectron2():
    """detection_defaults.py (used without Detectron2) holds Detectron2's defaults for each
    of its keys and for every key our pretraining defaults share with Detectron2."""
    from detectron2.config import get_cfg as d2_get_cfg

    from scrl_d2.config.defaults import _C
    from scrl_d2.config.detection_defaults import detection_defaults

    d2, table = d2_get_cfg(), detection_defaults()
    for key, value in flat_items(table):
        assert cfg_at(d2, key) == value, key
    shared = [k for k, _ in flat_items(_C) if cfg_at(d2, k) is not KeyError]
    missing = [k for k in shared if cfg_at(table, k) is KeyError]
    assert not missing, missing


def test_a_stock_detectron2_config_keeps_detectron2_meaning(tmp_path):
    """Detectron2's own COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml through our command
    line resolves, key by key, to what Detectron2's get_cfg() + merge_from_file gives."""
    from detectron2.config import get_cfg as d2_get_cfg

    from scrl_d2.config import config_from_args

    from detectron2 import model_zoo

    # where an installed Detectron2 keeps its configs (detectron2/model_zoo/configs/)
    path = model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml")
    ref = d2_get_cfg()
    ref.merge_from_file(path)
    ours = config_from_args(path)
    ours_flat = dict(flat_items(ours))
    for key, value in flat_items(ref):
        assert ours_flat[key] == value, key
    assert not ours.SOLVER.AMP.ENABLED and ours.INPUT.FORMAT == "BGR" and ours.MODEL.RESNETS.NORM == "FrozenBN"
