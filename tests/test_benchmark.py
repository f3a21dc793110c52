"""tools/benchmark.py: every mode runs on a CPU and writes the documented JSON keys."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

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
    res, _ = bench(tmp_path, mode, *TINY, "--iters", "2", "--warmup", "1", "--num-images", "24", *extra)
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
