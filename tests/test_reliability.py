"""What real runs hit: several processes with loader workers and every evaluation on,
divergence, restarts without a seed, interruptions between checkpoint and evaluation,
a full disk, bad input, interrupted writes."""
import glob
import hashlib
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
    # every file the run wrote (pretraining, probe, linear evaluation) loads without the unsafe unpickler
    assert len(all_checkpoint_tensors_finite(out)) >= 4


def all_checkpoint_tensors_finite(directory):
    files = glob.glob(os.path.join(directory, "**", "*.pth"), recursive=True)
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=True)["model"]
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        assert not bad, (f, bad[:3])
    return files


def checkpoint_digests(directory):
    return {f: hashlib.sha256(open(os.path.join(directory, f), "rb").read()).hexdigest()
            for f in os.listdir(directory) if f.endswith(".pth")}


@pytest.mark.parametrize("lr", ["1e30", "1e6"])
def test_divergence_stops_the_run_without_a_non_finite_checkpoint(tmp_path, image_folder, test_split, lr):
    """The run diverges after checkpoints exist (it resumes epoch 2 of 3 at the huge LR):
    it stops naming the last good one, writes no non-finite tensor and leaves every
    checkpoint written before as it was."""
    out = str(tmp_path / "div")
    opts = [*evaluating(image_folder, test_split, out), "SOLVER.EPOCHS", "3", "LINEAR_EVAL.ENABLED", "False",
            "KNN.PERIOD", "0"]
    run_cli(*opts, "SOLVER.MAX_ITER", "6")  # epoch 1 at the normal LR: checkpoint_1, checkpoint_best
    before = checkpoint_digests(out)
    assert "checkpoint_1.pth" in before and "checkpoint_best.pth" in before
    r = run_cli(*opts, "SOLVER.BASE_LR", lr, check=False)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "training diverged" in err[0] and "iteration" in err[0], err
    assert f"Last good checkpoint: {os.path.join(out, 'checkpoint_1.pth')}" in err[0], err
    after = checkpoint_digests(out)
    assert {f: after.get(f) for f in before} == before  # nothing written before was touched
    assert not set(after) - set(before) - {"checkpoint_last.pth"}, sorted(after)  # nor a new one written
    assert len(all_checkpoint_tensors_finite(out)) >= 3
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


def test_resume_with_only_iteration_checkpoints_keeps_the_run_seed(tmp_path, image_folder, monkeypatch):
    """SEED -1, killed after an iteration checkpoint (SOLVER.CHECKPOINT_PERIOD) but before
    any epoch checkpoint: the rerun resumes with the run's seed and keeps its config.yaml,
    and every checkpoint it reads and writes loads without the unsafe unpickler."""
    monkeypatch.delenv("SCRL_D2_UNSAFE_LOAD", raising=False)
    data = f"classes:{image_folder}"
    split, straight = str(tmp_path / "split"), str(tmp_path / "straight")
    unseeded = tiny_opts(data, split)
    unseeded[unseeded.index("SEED") + 1] = "-1"
    unseeded += ["SOLVER.CHECKPOINT_PERIOD", "2", "LINEAR_EVAL.ENABLED", "False"]
    run_cli(*unseeded, "SOLVER.MAX_ITER", "5")  # iteration checkpoints after steps 2 and 4
    # what a kill right after the iteration checkpoint of step 4 leaves: no checkpoint_* file
    for f in glob.glob(os.path.join(split, "checkpoint_*")):
        os.remove(f)
    with open(os.path.join(split, "last_checkpoint"), "w") as f:
        f.write("model_0000003.pth")
    assert sorted(f for f in os.listdir(split) if f.endswith(".pth")) == ["model_0000001.pth", "model_0000003.pth"]
    with open(os.path.join(split, "config.yaml")) as f:
        config_first = f.read()
    seed = int(next(line.split(":")[1] for line in config_first.splitlines() if line.startswith("SEED:")))
    r = run_cli(*unseeded)  # the same command again, SEED -1
    assert "resumed at epoch 0, iteration 4" in r.stdout, r.stdout[-3000:]
    assert f"with its seed {seed}" in r.stdout and "data order from here on differs" not in r.stdout
    with open(os.path.join(split, "config.yaml")) as f:
        assert f.read() == config_first  # the run's own config is kept
    seeded = tiny_opts(data, straight)
    seeded[seeded.index("SEED") + 1] = str(seed)
    run_cli(*seeded, "LINEAR_EVAL.ENABLED", "False")
    assert_same_weights(model_state(os.path.join(straight, "checkpoint_2.pth")),
                        model_state(os.path.join(split, "checkpoint_2.pth")))
    for f in glob.glob(os.path.join(split, "*.pth")):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(f) == [], f
        torch.load(f, map_location="cpu", weights_only=True)


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
    best_a = torch.load(os.path.join(straight, "checkpoint_best.pth"), weights_only=True)
    best_b = torch.load(os.path.join(split, "checkpoint_best.pth"), weights_only=True)
    assert best_a["trainer"]["best_probe_epoch"] == best_b["trainer"]["best_probe_epoch"]
    assert_same_weights(best_a["model"], best_b["model"])


def test_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(tmp_path, image_folder, monkeypatch):
    from scrl_d2.checkpoint import io
    from scrl_d2.utils.fs import WriteError
    from scrl_d2.engine import PretrainTrainer

    out = str(tmp_path / "full")
    cfg = tiny_cfg(f"classes:{image_folder}", out=out)
    trainer = PretrainTrainer(cfg)
    trainer.train()  # 2 epochs: checkpoint_1, checkpoint_2
    good = torch.load(os.path.join(out, "checkpoint_last.pth"), weights_only=True)
    real_save = torch.save

    def full(obj, f, *a, **k):  # what torch.save raises when the disk fills up mid-write
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(io.torch, "save", full)
    with pytest.raises(WriteError) as e:
        trainer.save_checkpoint("checkpoint_2")
    msg = str(e.value)
    assert os.path.join(out, "checkpoint_2.pth") in msg and "free in" in msg and "needed" in msg
    # a non-essential file (checkpoint_best) only warns
    trainer.save_checkpoint("checkpoint_best", essential=False)
    monkeypatch.setattr(io.torch, "save", real_save)
    again = torch.load(os.path.join(out, "checkpoint_last.pth"), weights_only=True)
    assert_same_weights(good["model"], again["model"])
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_atomic_files_take_the_umask_mode_and_stale_temporaries_go(tmp_path):
    """The mode is the umask's at the time of the write (as open() gives), whatever it
    was when the module was imported."""
    from scrl_d2.checkpoint import Checkpointer, atomic_torch_save

    for mask, mode in [(0o027, 0o640), (0o002, 0o664), (0o022, 0o644)]:
        old = os.umask(mask)
        try:
            atomic_torch_save({"x": torch.zeros(2)}, str(tmp_path / "a.pth"))
            with open(tmp_path / "plain", "w"):
                pass
        finally:
            os.umask(old)
        assert stat.S_IMODE(os.stat(tmp_path / "a.pth").st_mode) == mode, oct(mask)
        assert stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == mode  # what open() gives
        os.remove(tmp_path / "plain")
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
    (["INPUT.AUGMENT_DEVICE", "gpu"], "INPUT.AUGMENT_DEVICE: 'gpu' is not valid; expected one of 'cpu', 'split', 'device'"),
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
    assert r.returncode == 2 and r.stderr.splitlines() == [f"error: argument --num-gpus: {n}: expected 1 or more"], \
        r.stderr
    assert not os.path.exists(tmp_path / "o")


def test_a_value_refused_at_start_up_writes_nothing(tmp_path, image_folder):
    """docs/troubleshooting.md's example of bad input: stopped before any process starts, so there is
    no log.txt to hold a traceback (nor anything else)."""
    out = tmp_path / "o"
    r = run_cli(*tiny_opts(f"classes:{image_folder}", str(out)), "SOLVER.IMS_PER_GPU", "0", check=False)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "error: SOLVER.IMS_PER_GPU: 0 is not valid; expected an integer >= 1 (images per process)"], r.stderr
    assert not os.path.exists(out)


@pytest.mark.parametrize("debug", [False, True])
def test_bad_input_inside_a_run_is_in_every_process_log_with_its_traceback(tmp_path, image_folder, debug):
    """A bad input found inside the run (MODEL.WEIGHTS, read by every process): one line
    per process and exit status 2; each process's log.txt has the traceback;
    SCRL_D2_DEBUG=1 prints it on stderr too, the status unchanged."""
    out, missing = str(tmp_path / "o"), str(tmp_path / "no_such_weights.pth")
    r = run_cli("--num-gpus", "2", *tiny_opts(f"classes:{image_folder}", out), "SOLVER.IMS_PER_GPU", "4",
                "MODEL.WEIGHTS", missing, env_extra={"SCRL_D2_DEBUG": "1"} if debug else {"SCRL_D2_DEBUG": ""},
                check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith(("[rank", "error:"))]
    assert len(lines) == 2 and all(f"error: MODEL.WEIGHTS {missing}: checkpoint not found" in x for x in lines), lines
    assert ("Traceback (most recent call last)" in r.stderr) == debug, r.stderr[-3000:]
    for name in ("log.txt", "log.txt.rank1"):
        log = open(os.path.join(out, name)).read()
        assert "fatal error: " in log and "Traceback (most recent call last)" in log and missing in log, name


def _payload_checkpoint(tmp_path):
    """A .pth whose unpickling would write a marker file (any code could run there),
    beside real ResNet-18 weights."""
    import builtins

    import torchvision

    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return builtins.exec, (f"open({str(marker)!r}, 'w').close()",)

    path = tmp_path / "weights.pth"
    torch.save({**torchvision.models.resnet18().state_dict(), "extra": Payload()}, path)
    return str(path), marker


def test_model_weights_that_would_run_code_are_refused(tmp_path, image_folder):
    path, marker = _payload_checkpoint(tmp_path)
    r = run_cli(*tiny_opts(f"classes:{image_folder}", str(tmp_path / "out")), "MODEL.WEIGHTS", path,
                "SOLVER.MAX_ITER", "1", check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(f"error: MODEL.WEIGHTS {path}") and "builtins.exec" in lines[0] and \
        "--unsafe-load" in lines[0], lines
    assert not marker.exists()
