"""What real runs hit: several processes with loader workers and every evaluation on,
divergence, restarts without a seed, interruptions between checkpoint and evaluation,
a full disk, bad input, interrupted writes."""
import glob
import json
import os
import stat

import pytest
import torch

from conftest import make_image_folder, remove_unless_failed, tiny_cfg, tiny_opts
from test_engine import assert_same_weights, model_state, run_cli

LE_FAST = ["LINEAR_EVAL.EPOCHS", "2", "LINEAR_EVAL.WARMUP_EPOCHS", "0", "LINEAR_EVAL.IMS_PER_GPU", "8",
           "LINEAR_EVAL.EVAL_PERIOD", "1"]


@pytest.fixture(scope="module")
def test_split(tmp_path_factory, request):
    d = tmp_path_factory.mktemp("test_split")
    yield f"classes:{make_image_folder(str(d), n=24, seed=5)}"
    remove_unless_failed(request, d)


def evaluating(image_folder, test_split, out):
    """Pretraining with the probe evaluation and k-NN every epoch (and the linear evaluation at the end)."""
    return [*tiny_opts(f"classes:{image_folder}", out), "MODEL.PROBE.ENABLED", "True", "DATASETS.TEST",
            f"('{test_split}',)", "TEST.EVAL_PERIOD", "1", "KNN.PERIOD", "1", "KNN.K", "5", "TEST.IMS_PER_GPU", "8"]


def test_two_processes_with_loader_workers_evaluate(tmp_path, image_folder, test_split):
    """Spawned processes' loader workers pickle every dataset (probe, k-NN, linear evaluation)."""
    out = str(tmp_path / "ddp")
    r = run_cli("--num-gpus", "2", *evaluating(image_folder, test_split, out), "SOLVER.IMS_PER_GPU", "4",
                "DATALOADER.NUM_WORKERS", "1", *LE_FAST, "LINEAR_EVAL.IMS_PER_GPU", "4", "LINEAR_EVAL.EPOCHS", "3")
    assert "rank 0 of 2" in r.stdout and "online probe top-1" in r.stdout and "k-NN" in r.stdout
    res = json.load(open(os.path.join(out, "linear_eval", "linear_eval.json")))
    assert len(res["history"]) == 3
    assert len(json.load(open(os.path.join(out, "probe_eval.json")))) == 2
    # the linear evaluation keeps its last and best checkpoints only
    kept = {f for f in os.listdir(os.path.join(out, "linear_eval")) if f[11:-4].isdigit()}
    assert kept == {"checkpoint_3.pth", f"checkpoint_{res['best_epoch']}.pth"}, kept


def all_checkpoint_tensors_finite(directory):
    files = glob.glob(os.path.join(directory, "**", "*.pth"), recursive=True)
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=False)["model"]
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        assert not bad, (f, bad[:3])
    return files


@pytest.mark.parametrize("lr", ["1e30", "1e6"])
def test_divergence_stops_the_run_without_a_non_finite_checkpoint(tmp_path, image_folder, test_split, lr):
    out = str(tmp_path / "div")
    r = run_cli(*evaluating(image_folder, test_split, out), "SOLVER.BASE_LR", lr, "SOLVER.EPOCHS", "3", check=False)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "training diverged" in err[0] and "Last good checkpoint" in err[0], err
    assert "iteration" in err[0]
    all_checkpoint_tensors_finite(out)
    assert "training diverged" in open(os.path.join(out, "log.txt")).read()  # the log has it too


def test_resume_without_a_seed_continues_the_run_seed(tmp_path, image_folder):
    data = f"classes:{image_folder}"
    split, straight = str(tmp_path / "split"), str(tmp_path / "straight")
    unseeded = [o for o in tiny_opts(data, split)]
    unseeded[unseeded.index("SEED") + 1] = "-1"
    run_cli(*unseeded, "SOLVER.MAX_ITER", "6")  # interrupted after epoch 1
    with open(os.path.join(split, "config.yaml")) as f:
        config_first = f.read()
    seed = int(next(line.split(":")[1] for line in config_first.splitlines() if line.startswith("SEED:")))
    r = run_cli(*unseeded)  # the same command again, SEED -1
    assert f"with its seed {seed}" in r.stdout and "data order from here on differs" not in r.stdout
    with open(os.path.join(split, "config.yaml")) as f:
        assert f.read() == config_first  # the run's own config is kept
    seeded = tiny_opts(data, straight)
    seeded[seeded.index("SEED") + 1] = str(seed)
    run_cli(*seeded)
    assert_same_weights(model_state(os.path.join(straight, "checkpoint_2.pth")),
                        model_state(os.path.join(split, "checkpoint_2.pth")))


def test_interruption_between_checkpoint_and_evaluation_keeps_the_record(tmp_path, image_folder, test_split):
    """Evaluations run before the epoch's checkpoint and are part of it: stopping the run
    right after any checkpoint and resuming gives an uninterrupted run's record."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    no_le = ["LINEAR_EVAL.ENABLED", "False", "KNN.PERIOD", "0", "SOLVER.EPOCHS", "3"]
    run_cli(*evaluating(image_folder, test_split, straight), *no_le)
    for f in glob.glob(os.path.join(straight, "checkpoint_[0-9]*.pth")):  # only its checkpoint_best is read (disk)
        os.remove(f)
    run_cli(*evaluating(image_folder, test_split, split), *no_le, "SOLVER.MAX_ITER", "12")  # stop after epoch 2
    first = json.load(open(os.path.join(split, "probe_eval.json")))
    assert [h["epoch"] for h in first] == [1, 2]
    run_cli(*evaluating(image_folder, test_split, split), *no_le)
    a = json.load(open(os.path.join(straight, "probe_eval.json")))
    b = json.load(open(os.path.join(split, "probe_eval.json")))
    assert a == b and [h["epoch"] for h in b] == [1, 2, 3]
    best_a = torch.load(os.path.join(straight, "checkpoint_best.pth"), weights_only=False)
    best_b = torch.load(os.path.join(split, "checkpoint_best.pth"), weights_only=False)
    assert best_a["trainer"]["best_probe_epoch"] == best_b["trainer"]["best_probe_epoch"]
    assert_same_weights(best_a["model"], best_b["model"])


def test_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(tmp_path, image_folder, monkeypatch):
    from scrl_d2.checkpoint import CheckpointWriteError, io
    from scrl_d2.engine import PretrainTrainer

    out = str(tmp_path / "full")
    cfg = tiny_cfg(f"classes:{image_folder}", out=out)
    trainer = PretrainTrainer(cfg)
    trainer.train()  # 2 epochs: checkpoint_1, checkpoint_2
    good = torch.load(os.path.join(out, "checkpoint_last.pth"), weights_only=False)
    real_save = torch.save

    def full(obj, f, *a, **k):  # what torch.save raises when the disk fills up mid-write
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(io.torch, "save", full)
    with pytest.raises(CheckpointWriteError) as e:
        trainer.save_checkpoint("checkpoint_2")
    msg = str(e.value)
    assert os.path.join(out, "checkpoint_2.pth") in msg and "free in" in msg and "needed" in msg
    # a non-essential file (checkpoint_best) only warns
    trainer.save_checkpoint("checkpoint_best", essential=False)
    monkeypatch.setattr(io.torch, "save", real_save)
    again = torch.load(os.path.join(out, "checkpoint_last.pth"), weights_only=False)
    assert_same_weights(good["model"], again["model"])
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_atomic_files_take_the_umask_mode_and_stale_temporaries_go(tmp_path):
    from scrl_d2.checkpoint import Checkpointer, atomic_torch_save

    old = os.umask(0o022)
    try:
        atomic_torch_save({"x": torch.zeros(2)}, str(tmp_path / "a.pth"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.pth").st_mode) == 0o644
    (tmp_path / ".checkpoint_3.pth.eg0vupi7.tmp").write_bytes(b"half")  # a write a kill interrupted
    (tmp_path / "notes.tmp").write_text("not ours")
    Checkpointer(torch.nn.Linear(1, 1), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["a.pth", "notes.tmp"]


def test_snapshot_retention(tmp_path, image_folder):
    out = str(tmp_path / "keep")
    run_cli(*tiny_opts(f"classes:{image_folder}", out), "SOLVER.EPOCHS", "3", "SOLVER.SNAPSHOT_MAX_TO_KEEP", "1",
            "LINEAR_EVAL.ENABLED", "False")
    assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint_")) == ["checkpoint_3.pth",
                                                                                 "checkpoint_last.pth"]


@pytest.mark.parametrize("opts,expected", [
    (["SOLVER.IMS_PER_GPU", "0"], "SOLVER.IMS_PER_GPU: 0 is not valid; expected an integer >= 1"),
    (["SOLVER.BASE_LR", "-1.0"], "SOLVER.BASE_LR: -1.0 is not valid"),
    (["DATASETS.TRAIN", "('images:/no/such/folder',)"], "/no/such/folder"),
    (["DATASETS.TRAIN", "('no_such_dataset',)"], "'no_such_dataset' is not registered"),
    (["MODEL.WEIGHTS", "/no/such/weights.pth"], "MODEL.WEIGHTS /no/such/weights.pth: checkpoint not found"),
    (["MODEL.WEIGHTS", "NOT_A_CHECKPOINT"], "is not a readable PyTorch checkpoint"),
    (["MODEL.WEIGHTS", "R50"], "holds ResNet-50"),
])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, image_folder, opts, expected):
    if opts[1] == "NOT_A_CHECKPOINT":
        opts = [opts[0], str(tmp_path / "junk.pth")]
        (tmp_path / "junk.pth").write_text("not a checkpoint")
    if opts[1] == "R50":
        import torchvision

        opts = [opts[0], str(tmp_path / "r50.pth")]
        torch.save(torchvision.models.resnet50().state_dict(), opts[1])
    r = run_cli(*tiny_opts(f"classes:{image_folder}", str(tmp_path / "out")), *opts, check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert expected in lines[0], lines
    if opts[1] == str(tmp_path / "r50.pth"):
        assert "ResNet-18" in lines[0] and "MODEL.RESNETS.DEPTH" in lines[0]


@pytest.mark.parametrize("n", ["0", "-1"])
def test_num_gpus_must_be_positive(tmp_path, image_folder, n):
    r = run_cli("--num-gpus", n, *tiny_opts(f"classes:{image_folder}", str(tmp_path / "o")), check=False)
    assert r.returncode == 2 and "--num-gpus" in r.stderr and "expected 1 or more" in r.stderr
