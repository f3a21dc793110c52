"""tools/benchmark.py (a thin script over scrl_d2.cli.benchmark and the library
scrl_d2.benchmark): every mode runs on a CPU and writes the documented JSON keys; the
``train`` mode's timing runs through the trainer's ``train()`` with the ThroughputTimer hook."""
import json
import os
import statistics
import subprocess
import sys
import types

import pytest
import torch
from conftest import ROOT, tiny_cfg

from scrl_d2.benchmark import BenchmarkTrainer, bench_train, synthetic_batch
from scrl_d2.engine import PretrainTrainer, ThroughputTimer
from scrl_d2.engine import hooks as hooks_module

BENCH = os.path.join(ROOT, "tools", "benchmark.py")
TINY = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.BYOL.PROJECTOR_HIDDEN_DIM", "64",
        "MODEL.BYOL.PREDICTOR_HIDDEN_DIM", "64", "MODEL.BYOL.PROJECTION_DIM", "32", "MODEL.SCRL.MIN_SIZE", "16",
        "INPUT.CROP_SIZE", "64", "SOLVER.AMP.ENABLED", "False"]


def bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the generated JPEG folder goes here
    r = subprocess.run([sys.executable, BENCH, *args, "--json", str(out)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_boxes_mode(tmp_path):
    res, stdout = bench(tmp_path, "boxes", "--iters", "3")
    assert res["mode"] == "boxes" and res["box_ms_per_256"] > 0 and "torch" in res and "device" in res
    assert "box_ms_per_256" in stdout


@pytest.mark.parametrize("mode,extra", [
    ("model", ["--batch", "4"]),
    ("data", ["--batch", "8", "--workers", "0", "1"]),
    ("train", ["--batch", "8", "--with-model", "DATALOADER.NUM_WORKERS", "1"]),
])
def test_throughput_modes(tmp_path, mode, extra):
    files = ["--num-images", "24"] if mode in ("data", "train") else []  # model mode reads no files
    res, _ = bench(tmp_path, mode, *TINY, "--iters", "2", "--warmup", "1", *files, *extra)
    assert res["mode"] == mode and res["img_per_s"] > 0 and res["step_ms_median"] > 0
    assert res["settings"]["arch"] == "SCRL" and res["settings"]["depth"] == 18
    if mode == "data":
        assert [r["settings"]["workers"] for r in res["rows"]] == [0, 1]
    if mode == "train":  # a real JPEG folder was generated: 500x375 files
        assert res["model_img_per_s"] > 0 and res["fraction_of_model"] > 0
        from PIL import Image

        folder = res["settings"]["data"].split(":", 1)[1]
        files = sorted(os.listdir(folder))
        assert len([f for f in files if f.endswith(".jpg")]) == 24
        assert Image.open(os.path.join(folder, files[-1])).size == (500, 375)


def test_parity_mode_compares_speed_options_with_the_plain_path(tmp_path):
    res, stdout = bench(tmp_path, "parity", *TINY, "SOLVER.IMS_PER_GPU", "4", "--iters", "3",
                        "--variants", "channels_last", "bf16")
    assert res["mode"] == "parity" and res["same_loss"] is True
    variants = [r["settings"]["variant"] for r in res["rows"]]
    assert variants == ["plain", "channels_last", "bf16"]
    assert all(len(r["losses"]) == 3 for r in res["rows"])
    assert res["rows"][1]["max_rel_diff"] <= 1e-3 and "same_loss" in stdout
    # the structural pooling check at each variant's dtype
    assert res["pooling_exact"] is True and "pooling_exact" in stdout
    assert [r["pooling"]["dtype"] for r in res["rows"]] == ["float32", "float32", "bfloat16"]
    assert all(r["pooling"]["ok"] and r["pooling"]["rois"] > 0 for r in res["rows"])


def test_official_generator_path_is_checked(tmp_path):
    r = subprocess.run([sys.executable, BENCH, "boxes", "--official-scrl", str(tmp_path / "nowhere")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "nowhere" in r.stderr and "models/box_generator.py" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one line, no traceback


def test_thin_script_calls_the_library():
    with open(BENCH) as f:
        source = f.read()
    assert "from scrl_d2.cli.benchmark import main" in source and len(source.splitlines()) < 40


def test_throughput_timer_times_whole_windows_after_warmup(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(hooks_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def run(warmup, window, durations):
        timer = ThroughputTimer(warmup, window)
        timer.trainer = types.SimpleNamespace(device=torch.device("cpu"))
        timer.before_train()
        for d in durations:
            now[0] += d
            timer.after_step()
        return timer

    # 2 warm-up steps (not timed), windows of 3 steps, a partial window (not timed)
    t = run(2, 3, [10, 10, 1, 2, 3, 4, 5, 6, 7, 8])
    assert t.step_times == [2.0, 5.0] and t.timed_steps == 6 and t.total_s == 21.0 and t.peak_mem_gib is None
    t = run(0, 1, [1, 2])  # no warm-up: timed from before_train
    assert t.step_times == [1.0, 2.0] and t.timed_steps == 2 and t.total_s == 3.0


def test_train_mode_times_the_trainers_own_train_loop(image_folder, monkeypatch):
    """bench_train builds the trainer without its default hooks, registers the timer and
    runs ``train()``: the steps the timer saw are the ones train() ran, no file written."""
    seen = []
    train = PretrainTrainer.train

    def spy(self):
        before, hooks = self.iter, list(self.hooks)
        train(self)
        seen.append({"trainer": type(self), "before": before, "after": self.iter, "max_iter": self.max_iter,
                     "hooks": hooks, "files": os.listdir(self.cfg.OUTPUT_DIR), "output_dir": self.cfg.OUTPUT_DIR,
                     "storage_iter": self.storage.iter})

    monkeypatch.setattr(PretrainTrainer, "train", spy)
    cfg = tiny_cfg(f"images:{image_folder}")  # 48 images, batch 8: 6 steps per epoch
    rows = bench_train(cfg, iters=5, warmup=2, window=2)  # 2 windows of 2 steps after 2 warm-up steps
    assert len(seen) == 1, "bench_train must run trainer.train() once"
    run = seen[0]
    assert run["trainer"] is BenchmarkTrainer
    assert run["before"] == 0 and run["after"] == run["max_iter"] == run["storage_iter"] == 6
    assert len(run["hooks"]) == 1 and isinstance(run["hooks"][0], ThroughputTimer)  # no default hooks
    timer = run["hooks"][0]
    assert timer.timed_steps == 4 and len(timer.step_times) == 2 and all(t > 0 for t in timer.step_times)
    assert run["files"] == [] and not os.path.exists(run["output_dir"])  # no checkpoint / metrics; removed
    row = rows[0]
    assert row["mode"] == "train" and row["step_ms_median"] == statistics.median(timer.step_times) * 1e3
    assert row["img_per_s"] == 4 * 8 / timer.total_s


def test_synthetic_batch_is_a_loader_batch():
    cfg = tiny_cfg("images:/nowhere")
    b = synthetic_batch(cfg, torch.device("cpu"))
    assert b["view1"].shape == (8, 3, 64, 64) and b["view1"].dtype == torch.uint8
    assert b["boxes1"].shape[:2] == b["box_valid"].shape and b["pair_index"].numel() == int(b["box_valid"].sum())


def test_data_per_core_side_by_side(tmp_path):
    """``data --per-core --official-scrl CHECKOUT``: ours (CPU path, and the split path's CPU
    side) and the release's recipe imported from the checkout (here a stand-in with the
    release's module layout and functions), on the same photograph-like 500x375 JPEGs of
    about 100 KB, one core each; the ratios are computed from the rows."""
    fake = tmp_path / "scrl"
    (fake / "augment").mkdir(parents=True)
    (fake / "augment" / "__init__.py").write_text("")
    (fake / "augment" / "getters.py").write_text(
        "from torchvision import transforms as T\n"
        "def _views(input_size=224, crop_scale=(0.08, 1.0), with_trans_info=False):\n"
        "    return T.Compose([T.RandomResizedCrop(input_size, scale=crop_scale), T.ToTensor(),\n"
        "                      T.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))])\n"
        "get_simclr_transforms_for_view_1 = get_simclr_transforms_for_view_2 = _views\n")
    res, stdout = bench(tmp_path, "data", *TINY, "--per-core", "--official-scrl", str(fake), "--num-images", "24",
                        "--per-core-images", "24", "--rounds", "1", "--batch", "8")
    rows = res["rows"]
    assert [r["settings"]["generator"] for r in rows] == ["scrl_d2 cpu", "scrl_d2 split (CPU side)",
                                                           f"official ({fake})",
                                                           "official, PIL views (no ToTensor + Normalize)"]
    for r in rows:
        assert r["settings"]["cores"] == 1 and r["settings"]["images"] == 24 and r["img_per_s_per_core"] > 0
    for r in rows[:2]:
        assert r["vs_official"] == pytest.approx(r["img_per_s_per_core"] / rows[2]["img_per_s_per_core"])
        assert r["vs_official_pil"] == pytest.approx(r["img_per_s_per_core"] / rows[3]["img_per_s_per_core"])
    assert res["settings"]["generator"] == "scrl_d2 cpu" and res["vs_official"] == rows[0]["vs_official"]
    assert "vs_official_pil" in stdout
    folder = os.path.join(str(tmp_path), "scrl_bench_jpegs_24")
    sizes = [os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".jpg")]
    assert len(sizes) == 24 and 70e3 < statistics.mean(sizes) < 140e3  # as ImageNet's average file


def test_per_core_rows_time_what_they_name(tmp_path, monkeypatch):
    """The cpu row renders every view's colour operations, the split row none (the device's
    part), each on the same files; the release's PIL row stops before ToTensor + Normalize."""
    from scrl_d2.benchmark import bench_per_core
    from scrl_d2.benchmark.data import official_two_views
    from scrl_d2.data.augment import ViewAugmentation
    from scrl_d2.data.demo import write_synthetic_jpegs

    from scrl_d2.data.datasets import PretrainDataset

    folder = write_synthetic_jpegs(str(tmp_path / "jpegs"), 6)
    dicts = [{"file_name": os.path.join(folder, f)} for f in sorted(os.listdir(folder)) if f.endswith(".jpg")]
    datasets = []  # (colours left to the device?, that dataset's ViewAugmentations), in the rows' order
    init = PretrainDataset.__init__

    def recorded(self, *a, **k):
        init(self, *a, **k)
        datasets.append((k.get("photometric_on_device", False), {id(v) for v in self.augmentation.views}))
    monkeypatch.setattr(PretrainDataset, "__init__", recorded)
    calls = []  # (what, which ViewAugmentation)
    for name, what in (("_photometric", "colour"), ("apply_geometry", "geometry")):
        orig = getattr(ViewAugmentation, name)

        def counted(self, *a, _orig=orig, _what=what, **k):
            calls.append((_what, id(self)))
            return _orig(self, *a, **k)
        monkeypatch.setattr(ViewAugmentation, name, counted)
    cfg = tiny_cfg("unused")
    rows = bench_per_core(cfg, dicts, rounds=2)
    assert [r["settings"]["generator"] for r in rows] == ["scrl_d2 cpu", "scrl_d2 split (CPU side)"]
    assert [split for split, _ in datasets] == [False, True]  # the rows' datasets, in the rows' order
    for (split, views), want in zip(datasets, ({"colour": 36}, {"geometry": 36})):
        got = {}
        for what, view in calls:
            if view in views:
                got[what] = got.get(what, 0) + 1
        # 3 rounds (one warm-up) x 6 images x 2 views: the cpu row's colours, the split row's geometry only
        assert got == want, (split, got)

    fake = tmp_path / "scrl"
    (fake / "augment").mkdir(parents=True)
    (fake / "augment" / "getters.py").write_text(
        "from torchvision import transforms as T\n"
        "def _views(input_size=224, crop_scale=(0.08, 1.0), with_trans_info=False):\n"
        "    return T.Compose([T.RandomResizedCrop(input_size, scale=crop_scale), T.ToTensor(), T.Normalize((0.5,), (0.5,))])\n"
        "get_simclr_transforms_for_view_1 = get_simclr_transforms_for_view_2 = _views\n")
    monkeypatch.syspath_prepend(str(fake))
    full, pil = official_two_views(cfg, str(fake))(dicts[0]["file_name"]), \
        official_two_views(cfg, str(fake), tensor_steps=False)(dicts[0]["file_name"])
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in full)
    assert all(v.size == (64, 64) and v.mode == "RGB" for v in pil)  # PIL images: neither step ran
    (fake / "augment" / "getters.py").write_text(
        "from torchvision import transforms as T\n"
        "def _views(input_size=224, crop_scale=(0.08, 1.0), with_trans_info=False):\n"
        "    return T.Compose([T.RandomResizedCrop(input_size, scale=crop_scale), T.ToTensor()])\n"
        "get_simclr_transforms_for_view_1 = get_simclr_transforms_for_view_2 = _views\n")
    import sys as _sys
    for m in ("augment.getters", "augment"):
        _sys.modules.pop(m, None)
    with pytest.raises(ValueError, match="do not end in ToTensor \\+ Normalize"):
        official_two_views(cfg, str(fake), tensor_steps=False)
    for m in ("augment.getters", "augment"):
        _sys.modules.pop(m, None)


@pytest.mark.parametrize("args,says", [
    (["data", "--per-core", "--rounds", "0"], "argument --rounds: 0: expected 1 or more"),
    (["data", "--per-core", "--per-core-images", "0"], "argument --per-core-images: 0: expected 1 or more"),
    (["data", "--per-core", "--workers", "2"], "--workers applies to data mode without --per-core only"),
    (["data", "--per-core", "--num-images", "8"], "--num-images 8: fewer than --per-core-images 256"),
    (["model", "--num-images", "8"], "--num-images applies to train and data mode without --data only"),
    (["boxes", "--rounds", "3"], "--rounds applies to data --per-core only"),
    (["train", "--index-files", "10"], "--index-files applies to index mode only"),
    (["data", "--workers", "2", "-1"], "argument --workers: 2 -1: expected worker counts of 0 (the main process)"),
    (["train", "--per-core"], "--per-core applies to data mode only"),
    (["model", "--official-scrl", "/nowhere"], "--official-scrl applies to boxes and data mode only"),
    (["train", "--data", "/no/such/folder"], "--data /no/such/folder: no such folder"),
    (["model", "--config-file", "/no/such.yaml"], "--config-file /no/such.yaml: no such file"),
    (["model", "--batch", "-1"], "argument --batch: -1: expected 0 or more"),
])
def test_bad_benchmark_arguments_get_one_line_and_status_2(args, says, capsys):
    """The checks run before anything heavy: in-process here (a process start costs ~8 s of
    imports on a CI core); the script itself says the same, below."""
    from scrl_d2.cli.benchmark import main

    with pytest.raises(SystemExit) as e:
        main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines


def test_the_script_reports_a_bad_argument_in_one_line_with_status_2():
    r = subprocess.run([sys.executable, BENCH, "data", "--per-core", "--rounds", "0"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines == ["error: argument --rounds: 0: expected 1 or more"], r.stderr


def test_bad_input_found_during_a_run_is_one_line_and_status_2(tmp_path):
    """Past the argument checks: a folder without images (found when the run lists it)."""
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    r = subprocess.run([sys.executable, BENCH, "data", *TINY, "--data", str(folder), "--workers", "0"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "no images (.jpg, .jpeg, .png" in lines[0] and str(folder) in lines[0], lines


def test_official_data_needs_per_core_and_a_checkout(tmp_path):
    (tmp_path / "augment").mkdir()
    (tmp_path / "augment" / "getters.py").write_text("")
    for args, says in ((["--official-scrl", str(tmp_path)], "add --per-core"),
                       (["--per-core", "--official-scrl", str(tmp_path / "none")], "no augment/getters.py there")):
        r = subprocess.run([sys.executable, BENCH, "data", *args], capture_output=True, text=True, cwd=ROOT)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "--official-scrl" in lines[0] and says in lines[0], r.stderr
