import json
import math
import os

import pytest
import torch

from conftest import ROOT, remove_unless_failed
from scrl_d2.backend import detectron2_available
from test_convert import ours_checkpoint, tv_resnet
from test_engine import run_cli

DEMO = os.path.join(ROOT, "configs", "demo", "faster_rcnn_demo.yaml")
MASK_DEMO = os.path.join(ROOT, "configs", "demo", "mask_rcnn_demo.yaml")
FAST = ["SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MIN_SIZE_TEST", "128",
        "TEST.PRECISE_BN.NUM_ITER", "2", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "(100,)"]
needs_d2 = pytest.mark.skipif(not detectron2_available(),
                              reason="Detectron2 is not installed (see docs/detectron2.md)")


@pytest.fixture(scope="module")
def datasets_env(tmp_path_factory, request):
    d = tmp_path_factory.mktemp("det_data")
    yield {"SCRL_DATASETS": str(d)}
    remove_unless_failed(request, d)


@pytest.fixture(scope="module")
def r18_weights(tmp_path_factory, request):
    d = tmp_path_factory.mktemp("w")
    torch.save(ours_checkpoint(tv_resnet(18)), d / "pretrain.pth")
    from scrl_d2.checkpoint.convert import convert_checkpoint

    convert_checkpoint(str(d / "pretrain.pth"), str(d / "r18.pkl"))
    yield str(d / "r18.pkl")
    remove_unless_failed(request, d)


def strict_json(path):
    """results.json as a strict JSON parser reads it (no NaN / Infinity)."""
    def reject(name):
        raise ValueError(f"{path}: {name} is not JSON")

    with open(path) as f:
        return json.loads(f.read(), parse_constant=reject)


def _finite(results, tasks):
    for t in tasks:
        for m in ("AP", "AP50", "AP75"):
            assert math.isfinite(results[t][m]), (t, m, results[t])


@pytest.mark.parametrize("backend", [pytest.param("torchvision", marks=[pytest.mark.plain, pytest.mark.plain_pass_only]),
                                     pytest.param("detectron2", marks=needs_d2)])
def test_faster_rcnn_finetunes_evaluates_and_resumes(tmp_path, datasets_env, r18_weights, backend):
    env = {**datasets_env, "SCRL_D2_BACKEND": backend}
    out = str(tmp_path / "ft")
    r = run_cli("--config-file", DEMO, "OUTPUT_DIR", out, "MODEL.WEIGHTS", r18_weights, "SOLVER.MAX_ITER", "2",
                *FAST, env_extra=env)
    assert ("torchvision path" if backend == "torchvision" else "Detectron2's DefaultTrainer") in r.stdout
    log = open(os.path.join(out, "log.txt")).read()  # the weight-loading report is in the log file
    assert ("initialised the backbone" if backend == "torchvision" else "matched with submodule") in log
    results = strict_json(os.path.join(out, "results.json"))
    _finite(results, ["bbox"])
    assert os.path.exists(os.path.join(out, "model_final.pth"))
    r = run_cli("--config-file", DEMO, "--resume", "OUTPUT_DIR", out, "MODEL.WEIGHTS", r18_weights,
                "SOLVER.MAX_ITER", "4", *FAST, env_extra=env)
    assert "resumed at iteration 2" in r.stdout or "Starting training from iteration 2" in r.stdout
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.json")) if '"iteration"' in x]
    # the resumed run reached its last step, index 3 (Detectron2's numbering on both paths; Detectron2's
    # writer adds its final evaluation's line after it)
    assert max(x["iteration"] for x in lines) == (4 if backend == "detectron2" else 3)


def test_mask_rcnn_gives_box_and_mask_ap_on_the_torchvision_path(tmp_path, datasets_env, r18_weights):
    out = str(tmp_path / "mask")
    run_cli("--config-file", MASK_DEMO, "OUTPUT_DIR", out, "MODEL.WEIGHTS", r18_weights, "SOLVER.MAX_ITER", "2",
            *FAST, env_extra={**datasets_env, "SCRL_D2_BACKEND": "torchvision"})
    _finite(strict_json(os.path.join(out, "results.json")), ["bbox", "segm"])


@pytest.mark.parametrize("backend", ["torchvision", pytest.param("detectron2", marks=needs_d2)])
def test_missing_weights_or_dataset_is_named(tmp_path, datasets_env, backend):
    env = {**datasets_env, "SCRL_D2_BACKEND": backend}
    r = run_cli("--config-file", DEMO, "OUTPUT_DIR", str(tmp_path / "a"), "MODEL.WEIGHTS", "/no/such/weights.pkl",
                *FAST, env_extra=env, check=False)
    assert r.returncode != 0 and "/no/such/weights.pkl" in r.stderr
    r = run_cli("--config-file", DEMO, "OUTPUT_DIR", str(tmp_path / "b"), "DATASETS.ROOT", str(tmp_path / "empty"),
                "DATASETS.TRAIN", "('coco_2017_train',)", *FAST, env_extra=env, check=False)
    assert r.returncode != 0 and "instances_train2017.json" in r.stderr


@needs_d2
@pytest.mark.parametrize("config", ["faster_rcnn_R_50_FPN_1x_syncbn.yaml", "mask_rcnn_R_50_FPN_1x_syncbn.yaml"])
def test_detection_checkpointer_loads_the_pkl_into_rcnn_fpn(tmp_path, monkeypatch, config):
    monkeypatch.setenv("SCRL_D2_BACKEND", "detectron2")
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from scrl_d2.checkpoint.convert import convert_checkpoint
    from scrl_d2.checkpoint.layouts import torchvision_to_d2
    from scrl_d2.config import config_from_args
    from scrl_d2.modeling import ResNet

    tv = tv_resnet(50)
    torch.save(ours_checkpoint(tv), tmp_path / "p.pth")
    convert_checkpoint(str(tmp_path / "p.pth"), str(tmp_path / "r50.pkl"))
    cfg = config_from_args(os.path.join(ROOT, "configs", "coco", config))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    ck = DetectionCheckpointer(model)
    incompatible = ck._load_model(ck._load_file(str(tmp_path / "r50.pkl")))
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up.")]
    assert not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    ours = ResNet(depth=50).eval()
    ours.load_state_dict({torchvision_to_d2(k): v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model.backbone.bottom_up(x)["res5"], ours(x)["res5"], atol=1e-4, rtol=1e-4)


def test_eval_only_and_two_processes_on_the_torchvision_path(tmp_path, datasets_env, r18_weights):
    """Two processes as shipped (SyncBN everywhere, over gloo here) with a loader worker
    each, fine-tuning then evaluating; then --eval-only of the result."""
    env = {**datasets_env, "SCRL_D2_BACKEND": "torchvision"}
    out = str(tmp_path / "ddp")
    r = run_cli("--num-gpus", "2", "--config-file", DEMO, "OUTPUT_DIR", out, "MODEL.WEIGHTS", r18_weights,
                "SOLVER.MAX_ITER", "2", *FAST, "DATALOADER.NUM_WORKERS", "1", env_extra=env)
    assert "2 process(es)" in r.stdout
    _finite(strict_json(os.path.join(out, "results.json")), ["bbox"])
    ev = str(tmp_path / "ev")
    r = run_cli("--eval-only", "--config-file", DEMO, "OUTPUT_DIR", ev, "MODEL.WEIGHTS",
                os.path.join(out, "model_final.pth"), *FAST, env_extra=env)
    assert "initialised a whole detector" in r.stdout
    _finite(strict_json(os.path.join(ev, "results.json")), ["bbox"])


def test_newcomer_pipeline_command(tmp_path, datasets_env):
    import subprocess
    import sys

    out = str(tmp_path / "pipe")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "demo_pipeline.py"), "--output-dir", out,
                        "--pretrain-iters", "2", "SOLVER.MAX_ITER", "2", *FAST], capture_output=True, text=True,
                       env={**os.environ, **datasets_env}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| bbox" in r.stdout and "COCO AP" in r.stdout
    results = strict_json(os.path.join(out, "results.json"))
    _finite(results, ["bbox"])
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}


@needs_d2
def test_coco_protocol_config_runs_on_the_synthetic_data_with_detectron2(tmp_path, datasets_env):
    """The documented command for the paper's Faster R-CNN row, on the data we have here."""
    from scrl_d2.checkpoint.convert import convert_checkpoint

    torch.save(ours_checkpoint(tv_resnet(50)), tmp_path / "p.pth")
    convert_checkpoint(str(tmp_path / "p.pth"), str(tmp_path / "r50.pkl"))
    out = str(tmp_path / "coco")
    r = run_cli("--config-file", os.path.join(ROOT, "configs", "coco", "faster_rcnn_R_50_FPN_1x_syncbn.yaml"),
                "--num-gpus", "1", "MODEL.WEIGHTS", str(tmp_path / "r50.pkl"), "OUTPUT_DIR", out,
                "DATASETS.TRAIN", "('scrl_demo_det_train',)", "DATASETS.TEST", "('scrl_demo_det_val',)",
                "MODEL.ROI_HEADS.NUM_CLASSES", "4", "SOLVER.MAX_ITER", "2", *FAST,
                env_extra={**datasets_env, "SCRL_D2_BACKEND": "detectron2"})
    assert "Detectron2's DefaultTrainer" in r.stdout
    _finite(strict_json(os.path.join(out, "results.json")), ["bbox"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torchvision_detector_keeps_box_coordinates_float32_under_autocast(dtype, monkeypatch):
    """Anchors, proposals and detections: in bf16 a coordinate near 1000 px would round
    to 4 px; they must be float32 and equal the fp32 arithmetic."""
    monkeypatch.setenv("SCRL_D2_BACKEND", "torchvision")
    from torchvision.models.detection.image_list import ImageList

    from scrl_d2.config import config_from_args
    from scrl_d2.detection.torchvision_model import build_torchvision_detector

    cfg = config_from_args(DEMO, ["INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "256"])
    torch.manual_seed(0)
    model = build_torchvision_detector(cfg).eval()
    # anchors of an 800 x 1216 input: the generator only reads the maps' shapes and dtype
    images = ImageList(torch.zeros(1, 3, 800, 1216), [(800, 1216)])
    maps = [torch.zeros(1, 1, 800 // s, 1216 // s, dtype=dtype) for s in (4, 8, 16, 32, 64)]
    anchors = model.rpn.anchor_generator(images, maps)[0]
    ref = model.rpn.anchor_generator(images, [m.float() for m in maps])[0]
    assert anchors.dtype == torch.float32 and torch.equal(anchors, ref) and anchors.max() > 1000
    deltas = (torch.randn(500, 4) * 0.5).to(dtype)
    for coder in (model.rpn.box_coder, model.roi_heads.box_coder):
        decoded = coder.decode(deltas, [ref[-500:]])
        assert decoded.dtype == torch.float32
        torch.testing.assert_close(decoded, coder.decode(deltas.float(), [ref[-500:]]), rtol=0, atol=0)
    # end to end: the proposals RoIAlign receives and the detections are float32
    seen = {}
    model.roi_heads.box_roi_pool.register_forward_pre_hook(lambda m, args: seen.update(proposals=args[1]))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        assert model.backbone.body.conv1(torch.zeros(1, 3, 8, 8)).dtype == dtype  # autocast is on
        out = model([torch.rand(3, 96, 160)])[0]
    assert seen["proposals"][0].dtype == torch.float32 and out["boxes"].dtype == torch.float32


@pytest.mark.parametrize("mechanism", ["DATASETS.ROOT", "SCRL_DATASETS", "DETECTRON2_DATASETS"])
def test_coco_dataset_root_by_each_documented_mechanism(tmp_path, monkeypatch, mechanism):
    """coco_2017_val found under a root given by DATASETS.ROOT (what run_finetune applies),
    $SCRL_DATASETS or $DETECTRON2_DATASETS, on our catalog and, when installed, Detectron2's
    (which registers coco_2017_* itself and must follow the same root)."""
    import shutil

    from scrl_d2.data.catalog import set_datasets_root
    from scrl_d2.detection import ensure_synthetic_detection, get_coco_json

    src = ensure_synthetic_detection()
    roots = []
    for k in range(2):  # two roots one after the other: the second must win too
        root = tmp_path / f"root{k}"
        (root / "coco" / "annotations").mkdir(parents=True)
        shutil.copy(os.path.join(src, "annotations", "val.json"), root / "coco" / "annotations" / "instances_val2017.json")
        shutil.copytree(os.path.join(src, "val"), root / "coco" / "val2017")
        roots.append(str(root))
    for var in ("SCRL_DATASETS", "DETECTRON2_DATASETS"):
        monkeypatch.delenv(var, raising=False)
    try:
        for root in roots:
            if mechanism == "DATASETS.ROOT":
                set_datasets_root(root)
            else:
                set_datasets_root("")
                monkeypatch.setenv(mechanism, root)
            json_file, image_root = get_coco_json("coco_2017_val")
            assert json_file == os.path.join(root, "coco", "annotations", "instances_val2017.json")
            if detectron2_available():
                from detectron2.data import DatasetCatalog, MetadataCatalog

                records = DatasetCatalog.get("coco_2017_val")
                assert records and all(r["file_name"].startswith(os.path.join(root, "coco", "val2017")) for r in records)
                assert MetadataCatalog.get("coco_2017_val").json_file == json_file
    finally:
        set_datasets_root("")


@pytest.mark.parametrize("backend", ["torchvision", pytest.param("detectron2", marks=needs_d2)])
def test_sigterm_during_finetuning_checkpoints_and_the_rerun_resumes(tmp_path, datasets_env, r18_weights, backend):
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, **datasets_env, "SCRL_D2_BACKEND": backend}
    out = str(tmp_path / "ft")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", DEMO, "OUTPUT_DIR", out,
           "MODEL.WEIGHTS", r18_weights, "SOLVER.MAX_ITER", "40", "LOG_PERIOD", "1", *FAST]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        t = time.time()
        while time.time() - t < 300 and p.poll() is None:
            lines = open(os.path.join(out, "metrics.json")).read() if os.path.exists(
                os.path.join(out, "metrics.json")) else ""
            if lines.count('"iteration"') >= 2:
                break
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        so, se = p.communicate(timeout=300)
    finally:
        p.kill()
    assert p.returncode == 75, se[-3000:]
    assert "interrupted by SIGTERM after iteration" in se
    saved = [f for f in os.listdir(out) if f.startswith("model_0") and f.endswith(".pth")]
    assert saved and "model_final.pth" not in os.listdir(out)
    stopped = max(int(f[6:13]) for f in saved)
    r = run_cli("--config-file", DEMO, "--resume", "OUTPUT_DIR", out, "MODEL.WEIGHTS", r18_weights,
                "SOLVER.MAX_ITER", str(stopped + 3), *FAST, env_extra={**datasets_env, "SCRL_D2_BACKEND": backend})
    assert f"iteration {stopped + 1}" in r.stdout + r.stderr
    assert os.path.exists(os.path.join(out, "model_final.pth"))
