"""The small-scale study (tools/transfer.py --study): its scenes, its statistics, and its
miniature end to end (the numbers of the miniature are not checked: it is the pipeline)."""
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import remove_unless_failed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSFER = os.path.join(ROOT, "tools", "transfer.py")


def _transfer(*args, env=None, check=True, timeout=900):
    r = subprocess.run([sys.executable, TRANSFER, *args], capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, **(env or {})))
    if check and r.returncode != 0:
        raise AssertionError(f"transfer.py failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


# ---------------------------------------------------------------------------- scenes
@pytest.mark.plain
def test_scene_annotations_are_the_visible_pixels_of_each_object():
    from scrl_d2.data.scenes import MIN_VISIBLE, SCENE_CLASSES, render_scene, scene_label

    rng = np.random.default_rng(3)
    seen_small = seen_occluded = 0
    for _ in range(40):
        img, objs = render_scene(rng)
        assert len(objs) >= 1
        union = np.zeros((img.height, img.width), dtype=int)
        for o in objs:
            ys, xs = np.nonzero(o["mask"])
            assert o["box"] == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # the visible pixels' box
            assert o["area"] == o["mask"].sum() > 0 and 0 <= o["label"] < len(SCENE_CLASSES)
            union += o["mask"]
            seen_small += o["area"] < 32 * 32
        assert union.max() == 1  # a pixel is visible in one object at most (occlusion resolved)
        assert scene_label(objs) == max(objs, key=lambda o: o["area"])["label"]
        # occlusion happens: some object's box holds pixels of a later object
        for i, o in enumerate(objs):
            x0, y0, x1, y1 = o["box"]
            if any(p["mask"][y0:y1, x0:x1].any() for p in objs[i + 1:]):
                seen_occluded += 1
    assert seen_small > 20 and seen_occluded > 5
    assert 0 < MIN_VISIBLE < 1


@pytest.mark.plain
def test_scene_set_splits_are_disjoint_and_pretraining_has_no_labels(tmp_path, monkeypatch, request):
    from scrl_d2.data import catalog
    from scrl_d2.data.scenes import SCENE_CLASSES, SCENE_SETS, ensure_scene_set

    monkeypatch.setattr(catalog, "_ROOT", str(tmp_path))
    root = ensure_scene_set("smoke")
    spec = SCENE_SETS["smoke"]
    seeds = [seed for _, seed in spec.splits().values()]
    assert len(set(seeds)) == len(seeds)
    digests = {}
    for split, (count, _) in spec.splits().items():
        files = catalog.list_images(os.path.join(root, split))
        assert len(files) == count, split
        digests[split] = {hashlib.sha1(open(f, "rb").read()).hexdigest() for f in files}
    for a in digests:
        for b in digests:
            if a < b:
                assert not digests[a] & digests[b], (a, b)
    # pretraining: a flat folder of images, read unlabelled; no annotation file names it
    assert all(not e.is_dir() for e in os.scandir(os.path.join(root, "pretrain")))
    dicts = catalog.DatasetCatalog.get("scrl_scenes_smoke_pretrain")
    assert {d["label"] for d in dicts} == {-1}
    assert sorted(os.listdir(os.path.join(root, "annotations"))) == ["det_train.json", "det_val.json"]
    cls = catalog.DatasetCatalog.get("scrl_scenes_smoke_cls_val")
    assert catalog.MetadataCatalog.get("scrl_scenes_smoke_cls_val").classes == sorted(SCENE_CLASSES)
    assert len(cls) == spec.cls_val[0]
    det = json.load(open(os.path.join(root, "annotations", "det_val.json")))
    assert len(det["images"]) == spec.det_val[0] and [c["name"] for c in det["categories"]] == list(SCENE_CLASSES)
    for a in det["annotations"]:
        img = det["images"][a["image_id"] - 1]
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
        assert 0 < a["area"] <= w * h
    remove_unless_failed(request, tmp_path)


@pytest.mark.plain
def test_detection_split_is_written_as_rendered(tmp_path, monkeypatch):
    """The json's boxes are the renderer's (same seed, same order), on the image it wrote."""
    from PIL import Image

    from scrl_d2.data import catalog
    from scrl_d2.data.scenes import SCENE_SETS, ensure_scene_set, render_scene

    monkeypatch.setattr(catalog, "_ROOT", str(tmp_path))
    root = ensure_scene_set("smoke")
    count, seed = SCENE_SETS["smoke"].det_train
    det = json.load(open(os.path.join(root, "annotations", "det_train.json")))
    rng = np.random.default_rng(seed)
    for info in det["images"]:
        img, objs = render_scene(rng)
        assert Image.open(os.path.join(root, "det_train", info["file_name"])).size == img.size
        anns = [a for a in det["annotations"] if a["image_id"] == info["id"]]
        assert [(a["category_id"] - 1, a["bbox"], a["area"]) for a in anns] == \
            [(o["label"], [o["box"][0], o["box"][1], o["box"][2] - o["box"][0], o["box"][3] - o["box"][1]],
              o["area"]) for o in objs]


# ---------------------------------------------------------------------------- statistics
@pytest.mark.plain
def test_t_interval_is_the_student_interval_of_the_mean():
    from scipy import stats

    from scrl_d2.transfer.study_report import t_interval

    values = [31.2, 29.8, 33.1, 30.4, 32.0]
    c = t_interval(values)
    assert c["n"] == 5 and math.isclose(c["mean"], np.mean(values)) and math.isclose(c["std"], np.std(values, ddof=1))
    # the bounds sit at the t distribution's 2.5% and 97.5% points (4 degrees of freedom)
    se = c["std"] / math.sqrt(5)
    assert math.isclose(stats.t.cdf((c["hi"] - c["mean"]) / se, 4), 0.975)
    assert math.isclose(stats.t.cdf((c["lo"] - c["mean"]) / se, 4), 0.025)
    assert math.isnan(t_interval([1.0, float("nan")])["mean"])  # a missing metric is not dropped silently
    one = t_interval([2.0])
    assert one["mean"] == 2.0 and math.isnan(one["lo"])


@pytest.mark.plain
def test_differences_pair_trial_k_with_trial_k_over_trials_every_arm_has():
    from scrl_d2.transfer.study import METRICS
    from scrl_d2.transfer.study_report import summarize

    def res(ap):
        return {m: ap + i for i, m in enumerate(METRICS)}

    runs = {"random": {1: res(1.0), 2: res(2.0), 3: res(4.0)}, "byol": {3: res(10.0), 1: res(5.0), 2: res(7.0)},
            "scrl": {1: res(6.0), 3: res(13.0)}}  # scrl's trial 2 is missing
    s = summarize({"runs": runs})
    pairs = {p["pair"]: p for p in s["pairs"]}
    assert all(p["trials"] == [1, 3] for p in s["pairs"])
    assert pairs["scrl - random"]["metrics"]["bbox/AP"]["values"] == [5.0, 9.0]
    assert pairs["scrl - byol"]["metrics"]["bbox/AP75"]["values"] == [1.0, 3.0]
    assert pairs["byol - random"]["metrics"]["bbox/AP"]["mean"] == 5.0  # (4 + 6) / 2: trial 2 is not paired
    assert s["arms"]["byol"]["trials"] == [1, 2, 3] and s["arms"]["byol"]["metrics"]["bbox/AP"]["values"] == \
        [5.0, 7.0, 10.0]


@pytest.mark.plain
@pytest.mark.parametrize("args,needle", [(["--study", "nope"], "--study 'nope': unknown; available: small, smoke"),
                                         (["--study", "small", "--weights", "a=b"], "--weights cannot be combined"),
                                         (["--study", "small", "--", "SOLVER.MAX_ITER", "3"],
                                          "KEY VALUE overrides cannot be combined")])
def test_bad_study_arguments_get_one_line_and_status_2(tmp_path, args, needle, capsys):
    """In-process (a process start costs ~8 s of imports on a CI core); the script, below."""
    from scrl_d2.cli.transfer import main

    with pytest.raises(SystemExit) as e:
        main([*args, "--output-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "s")


@pytest.mark.plain
def test_the_script_reports_a_bad_study_argument_in_one_line_with_status_2(tmp_path):
    r = _transfer("--study", "nope", "--output-dir", str(tmp_path / "s"), check=False, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--study 'nope': unknown; available: small, smoke" in r.stderr and not os.path.exists(tmp_path / "s")


# ---------------------------------------------------------------------------- end to end
def _stat_fields(pid):
    """state, ppid, pgrp, ... of /proc/PID/stat (None if gone)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _running_in_group(pgid):
    """Processes of process group ``pgid`` that are not zombies (a sandbox's PID 1 may not
    reap the orphans it inherits; a zombie runs nothing)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(stat[:120])
    return out


def _results(out):
    runs = {}
    base = os.path.join(out, "runs", "study_smoke")
    for arm in sorted(os.listdir(base)):
        for t in sorted(os.listdir(os.path.join(base, arm))):
            runs.setdefault(arm, {})[int(t[len("trial"):])] = json.load(open(os.path.join(base, arm, t,
                                                                                         "results.json")))["bbox"]
    return runs


@pytest.mark.plain
def test_smoke_study_runs_end_to_end_resumes_and_tabulates_its_runs(tmp_path, request):
    from PIL import Image

    out = str(tmp_path / "study")
    env = {"SCRL_DATASETS": str(tmp_path / "datasets")}
    # interrupted as a cluster stops a job (SIGTERM to its whole process group) while SCRL pretrains
    err = tmp_path / "interrupted.err"
    with open(err, "w") as f:
        p = subprocess.Popen([sys.executable, TRANSFER, "--study", "smoke", "--output-dir", out],
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=f, env=dict(os.environ, **env))
    scrl_log = os.path.join(out, "pretrain", "scrl", "log.txt")
    deadline = time.time() + 600
    while not (os.path.exists(scrl_log) and "iter: 0" in open(scrl_log).read()) and time.time() < deadline:
        assert p.poll() is None, "the study ended before SCRL pretrained"
        time.sleep(0.2)
    if not (os.path.exists(scrl_log) and "iter: 0" in open(scrl_log).read()):
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"SCRL pretraining did not log its first step within 600 s: {open(err).read()[-2000:]}")
    os.killpg(p.pid, signal.SIGTERM)
    assert p.wait(timeout=300) == 75, open(err).read()  # the trainer stopped with its checkpoint; then the tool
    assert "stopped: interrupted by SIGTERM during the SCRL pretraining; rerun the same command to resume" in \
        open(err).read()
    assert _running_in_group(p.pid) == []  # the tool waited for its child: nothing of the job still runs
    assert "received SIGTERM: stopping after the current step" in open(scrl_log).read()
    assert not os.path.exists(os.path.join(out, "pretrain", "scrl", "done.json"))
    byol_log = open(os.path.join(out, "pretrain", "byol", "log.txt")).read()

    r = _transfer("--study", "smoke", "--output-dir", out, env=env)
    assert open(os.path.join(out, "pretrain", "byol", "log.txt")).read() == byol_log  # complete: not rerun
    assert "resumed at epoch" in open(scrl_log).read()  # SCRL resumed from the checkpoint of its interruption
    assert os.path.exists(os.path.join(out, "pretrain", "scrl", "done.json"))
    table = json.load(open(os.path.join(out, "table.json")))
    runs = _results(out)
    assert sorted(runs) == ["byol", "random", "scrl"] and all(sorted(v) == [1, 2] for v in runs.values())
    # the table is computed from these runs: per-arm values and per-trial paired differences
    for arm, a in table["summary"]["arms"].items():
        assert a["metrics"]["bbox/AP"]["values"] == [runs[arm][1]["AP"], runs[arm][2]["AP"]]
    for pr in table["summary"]["pairs"]:
        want = [runs[pr["a"]][t]["AP75"] - runs[pr["b"]][t]["AP75"] for t in (1, 2)]
        assert pr["trials"] == [1, 2] and pr["metrics"]["bbox/AP75"]["values"] == pytest.approx(want, abs=0)
    assert set(table["probes"]) == {"random", "byol", "scrl"}
    assert {"linear_top1", "knn_top1"} <= set(table["probes"]["random"])
    assert table["environment"]["cores"] and table["wall_s"]["total"] > 0
    # the trials are paired: SEED k in every arm
    for arm in runs:
        cmd = json.load(open(os.path.join(out, "runs", "study_smoke", arm, "trial2", "transfer_run.json")))["command"]
        assert cmd[cmd.index("SEED") + 1] == "2"
    md = open(os.path.join(out, "table.md")).read()
    assert "| scrl - random |" in md and "linear probe" in md and "random" in md and md in r.stdout
    assert Image.open(os.path.join(out, "figure.png")).format == "PNG"
    assert open(os.path.join(out, "table.csv")).readline().startswith("section,row,metric,mean,std,ci95_lo")

    # the pretrained encoders reached the detector (converted, every ResNet weight loaded)
    for arm in ("byol", "scrl"):
        log = open(os.path.join(out, "runs", "study_smoke", arm, "trial1", "log.txt")).read()
        assert f"weights/{arm}.pkl" in log
        if "fvcore.common.checkpoint" in log:  # Detectron2's loader: what it did not find is listed
            missing = log.split("not found in the checkpoint:", 1)[1].split("[", 1)[0] if "not found" in log else ""
            assert "bottom_up" not in missing and "Total num: 20" in log  # ResNet-18: 20 conv + norm layers
    assert "weights/" not in open(os.path.join(out, "runs", "study_smoke", "random", "trial1", "log.txt")).read()

    # a rerun runs nothing; a lost fine-tuning run is rerun alone, from scratch, to the same numbers
    shutil.rmtree(os.path.join(out, "runs", "study_smoke", "scrl", "trial2"))
    r = _transfer("--study", "smoke", "--output-dir", out, env=env)
    assert "5 fine-tuning run(s) already complete: skipped" in r.stderr + r.stdout
    assert "[1/1] study_smoke / scrl / trial 2" in r.stderr + r.stdout
    assert _results(out) == runs

    # another design in the same folder is refused before anything runs
    design = json.load(open(os.path.join(out, "design.json")))
    json.dump(dict(design, trials=3), open(os.path.join(out, "design.json"), "w"))
    r = _transfer("--study", "smoke", "--output-dir", out, env=env, check=False)
    assert r.returncode == 2 and "with another design (trials differ)" in r.stderr
    remove_unless_failed(request, tmp_path)


# ---------------------------------------------------------------------------- pieces
_CHILD = """
import signal, sys, time
def stop(signum, frame):
    open(sys.argv[1], "w").write(signal.Signals(signum).name)
    sys.exit(75)  # as a trainer does: checkpoint, exit 75
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGUSR1, stop)
open(sys.argv[1] + ".ready", "w").close()
time.sleep(60)
sys.exit(0)
"""

_PARENT = """
import sys
from scrl_d2.transfer.suite import Interrupted, call_forwarding_signals
try:
    rc = call_forwarding_signals([sys.executable, "-c", sys.argv[1], sys.argv[2]], sys.stdout, "the child")
    print("rc", rc)
except Interrupted as e:
    print("stopped:", e)
    sys.exit(75)
"""


@pytest.mark.plain
@pytest.mark.parametrize("sig,to", [(signal.SIGTERM, "parent"), (signal.SIGUSR1, "parent"), (signal.SIGTERM, "child")])
def test_a_stop_signal_reaches_the_running_step_and_the_tool_says_so(tmp_path, sig, to):
    """Only the tool signalled (e.g. kill PID): it passes the signal on and waits; only the
    child signalled (it exits 75): the tool stops too, instead of counting a failure."""
    mark = str(tmp_path / "got")
    p = subprocess.Popen([sys.executable, "-c", _PARENT, _CHILD, mark], stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.time() + 60
    while not os.path.exists(mark + ".ready") and time.time() < deadline:
        time.sleep(0.05)
    if to == "parent":
        os.kill(p.pid, sig)
    else:
        child = [int(pid) for pid in filter(str.isdigit, os.listdir("/proc"))
                 if _stat_fields(pid) and int(_stat_fields(pid)[1]) == p.pid]
        assert len(child) == 1
        os.kill(child[0], sig)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 75 and open(mark).read() == sig.name, out
    by = f"by {sig.name} " if to == "parent" else ""
    assert f"stopped: interrupted {by}during the child; rerun the same command to resume" in out
    assert _running_in_group(p.pid) == []


@pytest.mark.plain
def test_a_run_without_any_prediction_scores_zero_where_the_split_has_objects(tmp_path):
    from scrl_d2.transfer.study import empty_prediction_metrics, predictions_empty

    run = tmp_path / "run"
    (run / "inference").mkdir(parents=True)
    assert not predictions_empty(str(run))
    (run / "inference" / "coco_instances_results.json").write_text("[]")
    assert predictions_empty(str(run))
    (run / "inference" / "coco_instances_results.json").write_text('[{"image_id": 1}]')
    assert not predictions_empty(str(run))
    nan = float("nan")
    res = {m: nan for m in ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm", "bbox/APl")}
    out = empty_prediction_metrics([100.0, 2000.0], res)  # a small and a medium object, no large one
    assert {k: v for k, v in out.items() if not math.isnan(v)} == {"bbox/AP": 0.0, "bbox/AP50": 0.0,
                                                                    "bbox/AP75": 0.0, "bbox/APs": 0.0,
                                                                    "bbox/APm": 0.0}
    assert math.isnan(out["bbox/APl"])
    assert empty_prediction_metrics([100.0], dict(res, **{"bbox/AP": 3.0})).get("bbox/AP") is None  # kept
