"""The transfer suite: protocol configs, miniature datasets, the VOC metric, COCO subsets,
and tools/transfer.py (resume, table arithmetic, bad input)."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, remove_unless_failed
from scrl_d2.backend import detectron2_available
from scrl_d2.config import config_from_args
from scrl_d2.transfer.miniature import make_miniature
from scrl_d2.detection.formats.voc import VOC_CLASSES
from scrl_d2.transfer.miniature import miniature_overrides
from scrl_d2.transfer.protocols import CONFIGS_DIR, PROTOCOLS, get_protocol
from scrl_d2.detection.subsets import COCO_TRAIN2017_IMAGES, SEEDS, permutation, subset_indices, subset_size

needs_d2 = pytest.mark.skipif(not detectron2_available(),
                              reason="Detectron2 is not installed (see docs/detectron2.md)")
TOOL = os.path.join(ROOT, "tools", "transfer.py")
# a few iterations, no precise BN: each protocol's run is seconds
SHORT = ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "SOLVER.WARMUP_ITERS", "1", "TEST.PRECISE_BN.ENABLED",
         "False", "MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory, request):
    d = tmp_path_factory.mktemp("mini")
    yield make_miniature(str(d))
    remove_unless_failed(request, d)


def load(rel):
    return config_from_args(os.path.join(CONFIGS_DIR, rel))


# ---------------------------------------------------------------------------- configs
def test_every_protocol_config_exists_and_publishes_only_its_metrics():
    for p in PROTOCOLS.values():
        assert os.path.isfile(p.config_path), p.name
        for label, values in p.published.items():
            assert set(values) <= set(p.metrics), (p.name, label)
    used = {os.path.normpath(p.config) for p in PROTOCOLS.values()}
    for sub in ("voc", "moco", "cityscapes", "lvis"):
        for f in os.listdir(os.path.join(CONFIGS_DIR, sub)):
            assert f.startswith("Base") or os.path.join(sub, f) in used, f"configs/{sub}/{f} is in no protocol"


def test_readme_guide_lists_every_protocol_with_its_config():
    text = open(os.path.join(ROOT, "docs", "transfer.md")).read()  # the transfer suite's guide (README links it)
    for p in PROTOCOLS.values():
        assert f"| `{p.name}` | `{p.config}` | {p.trials} |" in text, p.name


def test_paper_protocol_is_detectron2s_2fc_head_with_syncbn_in_backbone_fpn_and_mask_head():
    c = load("coco/mask_rcnn_R_50_FPN_1x_syncbn.yaml")
    bh = c.MODEL.ROI_BOX_HEAD
    assert (bh.NAME, bh.NUM_CONV, bh.NUM_FC, bh.NORM) == ("FastRCNNConvFCHead", 0, 2, "")
    assert (c.MODEL.RESNETS.NORM, c.MODEL.FPN.NORM, c.MODEL.ROI_MASK_HEAD.NORM) == ("SyncBN",) * 3
    assert (c.SOLVER.BASE_LR, c.SOLVER.MAX_ITER, tuple(c.SOLVER.STEPS), c.SOLVER.IMS_PER_BATCH) == \
        (0.02, 90000, (60000, 80000), 16)
    o = load("coco/mask_rcnn_R_50_FPN_1x_syncbn_4conv1fc.yaml").MODEL.ROI_BOX_HEAD
    assert (o.NUM_CONV, o.NUM_FC, o.NORM) == (4, 1, "SyncBN")
    half = load("coco/faster_rcnn_R_50_FPN_0.5x_syncbn.yaml").SOLVER
    assert (half.MAX_ITER, tuple(half.STEPS)) == (45000, (30000, 40000))
    r = load("coco/retinanet_R_50_FPN_1x_syncbn.yaml")
    assert (r.MODEL.META_ARCHITECTURE, r.SOLVER.BASE_LR, r.SOLVER.MAX_ITER) == ("RetinaNet", 0.01, 90000)
    v = load("voc/faster_rcnn_R_50_FPN_18k_syncbn.yaml")
    assert (v.SOLVER.BASE_LR, v.SOLVER.MAX_ITER, tuple(v.SOLVER.STEPS), v.MODEL.ROI_HEADS.NUM_CLASSES) == \
        (0.02, 18000, (12000, 16000), 20)
    assert tuple(v.DATASETS.TRAIN) == ("voc_2007_trainval", "voc_2012_trainval")
    assert tuple(v.DATASETS.TEST) == ("voc_2007_test",)


def test_moco_protocols_hold_mocos_settings():
    c = load("moco/faster_rcnn_R_50_C4_voc0712_24k.yaml")
    assert (c.SOLVER.MAX_ITER, tuple(c.SOLVER.STEPS), c.SOLVER.WARMUP_ITERS, c.SOLVER.BASE_LR) == \
        (24000, (18000, 22000), 100, 0.02)
    assert tuple(c.INPUT.MIN_SIZE_TRAIN) == tuple(range(480, 801, 32)) and c.INPUT.MIN_SIZE_TEST == 800
    assert (c.MODEL.ROI_HEADS.NAME, c.MODEL.RESNETS.NORM, c.MODEL.BACKBONE.FREEZE_AT) == \
        ("Res5ROIHeadsExtraNorm", "SyncBN", 0)
    assert load("moco/faster_rcnn_R_50_C4_voc0712_24k_naivesyncbn.yaml").MODEL.RESNETS.NORM == "naiveSyncBN"
    assert load("moco/mask_rcnn_R_50_C4_2x.yaml").SOLVER.MAX_ITER == 180000
    f = load("moco/mask_rcnn_R_50_FPN_1x.yaml")
    assert (f.MODEL.FPN.NORM, f.MODEL.ROI_MASK_HEAD.NORM, f.MODEL.ROI_BOX_HEAD.NORM) == ("SyncBN", "", "")
    assert get_protocol("voc0712_faster_rcnn_R50_C4_24k").trials == 5


# ---------------------------------------------------------------------------- subsets
def test_coco_subsets_are_shipped_nested_and_reproducible():
    k1, k10 = subset_size(COCO_TRAIN2017_IMAGES, 1), subset_size(COCO_TRAIN2017_IMAGES, 10)
    assert (k1, k10) == (1183, 11829)
    for seed in SEEDS:
        one, ten = subset_indices(COCO_TRAIN2017_IMAGES, 1, seed), subset_indices(COCO_TRAIN2017_IMAGES, 10, seed)
        assert len(set(one)) == k1 and len(set(ten)) == k10 and set(one) <= set(ten)
        assert ten == sorted(permutation(COCO_TRAIN2017_IMAGES, seed)[:k10].tolist())  # the shipped list
    assert subset_indices(COCO_TRAIN2017_IMAGES, 10, 1) != subset_indices(COCO_TRAIN2017_IMAGES, 10, 2)
    with pytest.raises(ValueError, match="seed 9"):
        subset_indices(100, 10, 9)


# ---------------------------------------------------------------------------- VOC metric
def _voc_gt(mini, year="2007", split="test"):
    from scrl_d2.detection.formats.voc import _parse, read_voc_split

    d = os.path.join(mini, f"VOC{year}")
    return d, {fid: _parse(os.path.join(d, "Annotations", fid + ".xml"))[1] for fid in read_voc_split(d, split)}


def _predictions(gt, seed):
    """Jittered ground truth (some far off), duplicates and false positives, with ties."""
    rng = np.random.default_rng(seed)
    present = sorted({VOC_CLASSES.index(n) for objs in gt.values() for n, _, _ in objs})
    preds = []
    for fid, objs in gt.items():
        for name, (x0, y0, x1, y1), _ in objs:
            c = VOC_CLASSES.index(name)
            for _ in range(int(rng.integers(1, 3))):
                j = rng.normal(0, 4 if rng.random() < 0.7 else 25, 4)
                preds.append({"voc_id": fid, "class": c, "score": float(round(rng.random(), 2)),
                              "box": [x0 - 1 + j[0], y0 - 1 + j[1], x1 + j[2], y1 + j[3]]})
        for _ in range(2):
            x, y = rng.uniform(0, 100, 2)
            preds.append({"voc_id": fid, "class": int(rng.choice(present)), "score": float(rng.random()),
                          "box": [x, y, x + 30, y + 30]})
    return preds


def test_voc_ap_of_perfect_detections_and_of_difficult_ones(mini):
    from scrl_d2.detection.formats.voc import voc_detection_ap

    d, gt = _voc_gt(mini)
    present = {n for objs in gt.values() for n, _, diff in objs if not diff}
    perfect = [{"voc_id": f, "class": VOC_CLASSES.index(n), "score": 1.0, "box": [b[0] - 1, b[1] - 1, b[2], b[3]]}
               for f, objs in gt.items() for n, b, _ in objs]
    res = voc_detection_ap(perfect, d, "test", 2007, VOC_CLASSES)["bbox"]
    # every class present scores 100; Detectron2 averages over all 20 (absent ones: 0)
    assert res["AP50"] == pytest.approx(100 * len(present) / 20)
    non_difficult = [p for p, (f, o) in zip(perfect, [(f, o) for f, objs in gt.items() for o in objs]) if not o[2]]
    assert voc_detection_ap(non_difficult, d, "test", 2007, VOC_CLASSES)["bbox"] == res  # difficult: neither way


@needs_d2
@pytest.mark.parametrize("year,split", [("2007", "test"), ("2012", "trainval")])
def test_voc_ap_equals_detectron2s_evaluator_on_the_same_predictions(mini, year, split):
    import torch
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import PascalVOCDetectionEvaluator
    from detectron2.structures import Boxes, Instances

    from scrl_d2.detection.catalog import check_dataset_files
    from scrl_d2.detection.formats.voc import voc_detection_ap

    from scrl_d2.data.catalog import set_datasets_root

    set_datasets_root(mini)
    name = f"voc_{year}_{split}"
    check_dataset_files(name)
    assert MetadataCatalog.get(name).dirname == os.path.join(mini, f"VOC{year}")
    d, gt = _voc_gt(mini, year, split)
    for seed in range(3):
        preds = _predictions(gt, seed)
        ev = PascalVOCDetectionEvaluator(name)
        ev.reset()
        for fid in gt:
            mine = [p for p in preds if p["voc_id"] == fid]
            inst = Instances((1000, 1000))
            inst.pred_boxes = Boxes(torch.tensor([p["box"] for p in mine], dtype=torch.float32).reshape(-1, 4))
            inst.scores = torch.tensor([p["score"] for p in mine])
            inst.pred_classes = torch.tensor([p["class"] for p in mine], dtype=torch.int64)
            ev.process([{"image_id": fid}], [{"instances": inst}])
        theirs = ev.evaluate()["bbox"]
        # the same boxes as Detectron2 saw them (float32), in the same order
        f32 = [dict(p, box=torch.tensor(p["box"], dtype=torch.float32).tolist()) for p in preds]
        ours = voc_detection_ap(f32, d, split, int(year), VOC_CLASSES)["bbox"]
        assert 5 < theirs["AP50"] < 95
        for m in ("AP", "AP50", "AP75"):
            assert ours[m] == pytest.approx(theirs[m], abs=1e-9), (seed, m)


# ---------------------------------------------------------------------------- every protocol runs
def short_cfg(p, root: str):
    """The protocol's miniature run as the test below runs it."""
    return config_from_args(p.config_path, miniature_overrides(p, root) + p.trial_overrides(2) + SHORT
                            + ["MODEL.WEIGHTS", "", "OUTPUT_DIR", "out"])


def _twins():
    """Protocols whose short run is another's exactly (their configs differ only in the
    schedule, which SHORT replaces: 1x / 2x / 0.5x): name -> the first such protocol."""
    first, twin = {}, {}
    for n, p in PROTOCOLS.items():
        key = (short_cfg(p, "/miniature").dump(), tuple(p.metrics), tuple(p.backends))
        twin[n] = first.setdefault(key, n)
    return twin


TWINS = _twins()
CASES = [pytest.param(n, b, id=f"{n}-{b}", marks=[needs_d2] if b == "detectron2" else [])
         for n, p in PROTOCOLS.items() for b in ("torchvision", "detectron2") if b in p.backends and TWINS[n] == n]


def test_a_protocol_not_run_below_is_the_same_run_as_one_that_is():
    """Each protocol runs below unless its short run equals, key for key, an earlier
    protocol's (same metrics and backends), which does run."""
    skipped = {n: t for n, t in TWINS.items() if t != n}
    assert {"coco_faster_rcnn_R50_FPN_2x", "coco_mask_rcnn_R50_C4_2x"} <= set(skipped), skipped
    for n, t in skipped.items():
        assert TWINS[t] == t
        assert short_cfg(PROTOCOLS[n], "/m").dump() == short_cfg(PROTOCOLS[t], "/m").dump(), n
        # the full configs do differ (the schedule), so the twin is not the same protocol
        assert config_from_args(PROTOCOLS[n].config_path).dump() != config_from_args(PROTOCOLS[t].config_path).dump()
    ran = {c.values[0] for c in CASES}
    assert ran | set(skipped) == set(PROTOCOLS) and not ran & set(skipped)


@pytest.mark.parametrize("name,backend", CASES)
def test_protocol_runs_on_its_miniature_dataset(mini, tmp_path, monkeypatch, name, backend):
    """The protocol's own config (datasets, evaluator, head) for a few iterations on the
    generated data in its format; results.json has every metric the table reads."""
    p = get_protocol(name)
    if backend == "detectron2" and "cityscapes" in name and not importlib.util.find_spec("cityscapesscripts"):
        pytest.skip("cityscapesscripts is not installed")
    if backend == "detectron2" and "lvis" in name and not importlib.util.find_spec("lvis"):
        pytest.skip("lvis is not installed")
    monkeypatch.setenv("SCRL_D2_BACKEND", backend)
    from scrl_d2.detection import run_finetune

    cfg = short_cfg(p, mini)
    cfg.defrost()
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.freeze()
    run_finetune(cfg)
    with open(tmp_path / "results.json") as f:
        res = json.load(f)
    for m in p.metrics:
        task, metric = m.split("/")
        assert metric in res[task], (m, res)


@pytest.mark.plain
@pytest.mark.parametrize("name", ["voc0712_faster_rcnn_R50_C4_24k", "lvis_v1_mask_rcnn_R50_FPN_1x",
                                  "cityscapes_mask_rcnn_R50_FPN"])
def test_torchvision_path_refuses_detectron2_only_protocols_naming_what_to_install(mini, tmp_path, monkeypatch,
                                                                                   name):
    monkeypatch.setenv("SCRL_D2_BACKEND", "torchvision")
    from scrl_d2.detection import run_finetune

    p = get_protocol(name)
    cfg = config_from_args(p.config_path, miniature_overrides(p, mini) + SHORT + ["MODEL.WEIGHTS", "",
                                                                                   "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(ValueError, match="Detectron2"):
        run_finetune(cfg)


@needs_d2
def test_moco_extra_norm_head_is_registered_and_adds_a_norm_after_res5():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import scrl_d2  # noqa: F401

    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS_DIR, "moco", "faster_rcnn_R_50_C4_voc0712_24k.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN"])
    model = build_model(cfg)
    res5 = model.roi_heads.res5
    assert type(res5[-1]).__name__ == "BatchNorm2d" and res5[-1].num_features == 2048


@needs_d2
def test_coco_subset_is_the_same_images_on_both_paths(mini, monkeypatch):
    from detectron2.data import DatasetCatalog

    from scrl_d2.data.catalog import set_datasets_root
    from scrl_d2.detection.torchvision_data import CocoDetectionDataset

    set_datasets_root(mini)
    for name in ("coco_2017_train_10pct_seed3", "coco_2017_train_1pct_seed1"):
        d2 = sorted(d["image_id"] for d in DatasetCatalog.get(name))
        tv = CocoDetectionDataset(name, train=True, with_masks=False, filter_empty=False).ids
        assert d2 == sorted(tv) and len(d2) == subset_size(24, 10 if "10pct" in name else 1)


# ---------------------------------------------------------------------------- the tool
def _tool(*args, env=None):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=900)


def test_table_arithmetic_mean_sample_std_and_missing_trials(tmp_path):
    from scrl_d2.transfer.suite import TransferSuite, mean_std

    assert mean_std([50.0, 52.0, 57.0]) == pytest.approx((53.0, math.sqrt(13.0)))
    assert mean_std([41.0]) == (41.0, 0.0) and all(map(math.isnan, mean_std([40.0, float("nan")])))
    p = get_protocol("voc0712_faster_rcnn_R50_FPN")
    suite = TransferSuite(str(tmp_path), {"mine": "random", "other": "random"}, [p], trials=3)
    ap50 = {"mine": [50.0, 52.0, 57.0], "other": [60.0, 61.0]}  # other: trial 3 missing
    for run in suite.runs():
        vals = ap50[run.checkpoint]
        if run.trial <= len(vals):
            os.makedirs(run.output_dir)
            with open(run.results_file, "w") as f:
                json.dump({"bbox": {"AP50": vals[run.trial - 1], "AP": 30.0 + run.trial, "AP75": None}}, f)
    md = suite.write_table()
    rows = {r["row"]: r for r in json.load(open(tmp_path / "table.json"))}
    assert rows["mine"]["metrics"]["bbox/AP50"]["mean"] == pytest.approx(53.0)
    assert rows["mine"]["metrics"]["bbox/AP50"]["std"] == pytest.approx(math.sqrt(13.0))
    assert rows["mine"]["metrics"]["bbox/AP"]["mean"] == pytest.approx(32.0)
    assert rows["mine"]["metrics"]["bbox/AP75"]["mean"] is None  # undefined stays undefined
    assert rows["other"]["trials"] == "2/3" and rows["other"]["metrics"]["bbox/AP50"]["std"] == \
        pytest.approx(math.sqrt(0.5))
    assert "| mine | ours | 53.00 ± 3.61 | 32.00 ± 1.00 | n/a | 3/3 |" in md
    assert "[1](runs/voc0712_faster_rcnn_R50_FPN/mine/trial1)" in md
    csv_rows = open(tmp_path / "table.csv").read().splitlines()
    assert "voc0712_faster_rcnn_R50_FPN,mine,ours,bbox/AP50,53.0000,3.6056,3," in "\n".join(csv_rows)


def test_published_numbers_sit_beside_ours(tmp_path):
    from scrl_d2.transfer.suite import TransferSuite

    suite = TransferSuite(str(tmp_path), {"x": "random"}, [get_protocol("coco_mask_rcnn_R50_FPN_1x")])
    md = suite.write_table()
    assert "| SCRL 200ep | SCRL release README" in md and "41.02" in md and "37.50" in md


def test_tool_runs_resumes_only_missing_trials_and_prints_commands(tmp_path):
    out = tmp_path / "suite"
    common = ["--output-dir", str(out), "--weights", "random=random", "--protocols", "voc0712_faster_rcnn_R50_FPN",
              "--trials", "2", "--miniature", str(tmp_path / "mini"), "--", *SHORT,
              "DATALOADER.NUM_WORKERS", "1"]
    env = {"SCRL_D2_BACKEND": "torchvision"}
    r = _tool(*common, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = out / "runs" / "voc0712_faster_rcnn_R50_FPN" / "random"
    assert "| random | ours |" in r.stdout and "2/2" in r.stdout
    stamp = (runs / "trial1" / "results.json").stat().st_mtime_ns
    os.remove(runs / "trial2" / "results.json")
    r = _tool(*common, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 run(s) already complete: skipped" in r.stderr + r.stdout
    assert (runs / "trial1" / "results.json").stat().st_mtime_ns == stamp  # not rerun
    assert (runs / "trial2" / "results.json").exists()
    cmd = json.load(open(runs / "trial2" / "transfer_run.json"))["command"]
    assert cmd[cmd.index("SEED") + 1] == "2" and "--resume" in cmd
    printed = _tool("--output-dir", str(tmp_path / "p"), "--weights", "random=random", "--protocols",
                    "moco", "--launcher", "print")
    assert printed.returncode == 0 and printed.stdout.count("-m scrl_d2.cli.train_net") == 5 * 2 + 4 + 2
    assert not (tmp_path / "p" / "runs").exists()


def test_demo_preset_prints_the_table_of_random_byol_and_scrl(tmp_path):
    """`--preset demo` from nothing: pretrains BYOL and SCRL on the demo images, converts,
    fine-tunes each checkpoint (and random init) and prints the table (runs shortened here)."""
    # narrow FPN and box head (the backbone stays the pretrained ResNet-18): each of the six
    # fine-tuned model_final.pth is ~95 MB instead of ~230 MB
    r = _tool("--preset", "demo", "--output-dir", str(tmp_path / "demo"), "--trials", "1", "--", "SOLVER.MAX_ITER",
              "2", "SOLVER.STEPS", "(1,)", "SOLVER.WARMUP_ITERS", "1", "TEST.PRECISE_BN.ENABLED", "False",
              "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "64")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    for row in ("random", "byol_demo", "scrl_demo"):
        assert r.stdout.count(f"| {row} | ours |") == 2 and f"/{row}/trial1)" in r.stdout
    assert os.path.isfile(tmp_path / "demo" / "weights" / "scrl_demo.pkl")
    assert "| SCRL 200ep | SCRL release README" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--weights", "x"], "--weights 'x': expected NAME=PATH"),
    (["--weights", "x=/no/such.pth", "--protocols", "coco_faster_rcnn_R50_FPN_1x"], "/no/such.pth: file not found"),
    (["--weights", "x=random", "--protocols", "coco_nope"], "unknown protocol 'coco_nope'"),
    (["--weights", "x=random"], "no protocols"),
])
def test_tool_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    r = _tool("--output-dir", str(tmp_path), *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
