"""Detection fine-tuning as users run it (2 processes, a loader worker each), on both
paths: preempted by a signal sent to every process of the job (as SLURM does) and rerun
with the same command, it ends with exactly the weights, metrics and results of an
uninterrupted run; a diverging run stops every process with exit status 3 and writes
nothing non-finite."""
import glob
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from test_detection import DEMO, FAST, datasets_env, needs_d2, r18_weights  # noqa: F401  (fixtures)

TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")
BACKENDS = [pytest.param("torchvision", marks=pytest.mark.plain), pytest.param("detectron2", marks=needs_d2)]
MAX_ITER = 12


def _command(out, weights, seed, *extra):
    """2 processes, 1 loader worker each, a checkpoint every 4 iterations, metrics every one."""
    return [sys.executable, TRAIN_NET, "--num-gpus", "2", "--config-file", DEMO, "OUTPUT_DIR", out,
            "MODEL.WEIGHTS", weights, "SOLVER.MAX_ITER", str(MAX_ITER), *FAST, "DATALOADER.NUM_WORKERS", "1",
            "SOLVER.CHECKPOINT_PERIOD", "4", "LOG_PERIOD", "1", "SEED", str(seed), *extra]


def _env(datasets_env, backend):
    # one intra-op thread: two processes share this machine's cores without oversubscription
    return dict(os.environ, **datasets_env, SCRL_D2_BACKEND=backend, OMP_NUM_THREADS="1")


def _start(cmd, env):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group, as a SLURM job step


def _finish(p, timeout=600):
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # whatever is left of the job
        except ProcessLookupError:
            pass
    return p.returncode, out, err


def _run(cmd, env):
    rc, out, err = _finish(_start(cmd, env))
    assert rc == 0, out[-3000:] + err[-3000:]
    return out, err


def _metrics(out):
    """metrics.json lines with an iteration, by iteration (each exactly once)."""
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.json")) if '"iteration"' in x]
    by_iter = {x["iteration"]: x for x in lines}
    assert len(by_iter) == len(lines), sorted(x["iteration"] for x in lines)
    return by_iter


def _progress(out):
    """The newest iteration in metrics.json so far (-1: none), read while it is written."""
    try:
        text = open(os.path.join(out, "metrics.json")).read()
    except FileNotFoundError:
        return -1
    return max((int(m) for m in re.findall(r'"iteration": (\d+)', text)), default=-1)


def _losses(out):
    """The training losses in metrics.json, by iteration (not the evaluation's lines)."""
    return {it: losses for it, x in _metrics(out).items()
            for losses in [{k: v for k, v in x.items() if k.startswith(("loss", "total_loss"))}] if losses}


def _checkpoints(out):
    return sorted(f for f in os.listdir(out) if re.fullmatch(r"model_\d{7}\.pth", f))


def _snapshot(out):
    return {f: hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest() for f in _checkpoints(out)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_preempted_job_rerun_with_the_same_command_ends_as_an_uninterrupted_run(tmp_path, datasets_env, r18_weights,
                                                                                backend):
    env = _env(datasets_env, backend)
    split, straight = str(tmp_path / "split"), str(tmp_path / "straight")
    cmd = _command(split, r18_weights, -1)  # SEED -1: drawn at the first start, kept by the rerun
    p = _start(cmd, env)
    try:
        t = time.time()
        while time.time() - t < 500 and p.poll() is None and _progress(split) < 4:  # past model_0000003.pth
            time.sleep(0.2)
        assert p.poll() is None, "the run ended before the signal"
        os.killpg(p.pid, signal.SIGUSR2)  # every process of the job: launcher, trainers, loader workers
    finally:
        rc, so, se = _finish(p)
    assert rc == 75, so[-2000:] + se[-3000:]
    assert "interrupted by SIGUSR2 after iteration" in se and "Traceback" not in se, se[-3000:]
    stopped = max(int(f[6:13]) for f in _checkpoints(split))
    assert 4 <= stopped < MAX_ITER - 1 and "model_0000003.pth" in _checkpoints(split)
    assert not os.path.exists(os.path.join(split, "model_final.pth"))
    before = _snapshot(split)
    config = open(os.path.join(split, "config.yaml")).read()
    seed = int(re.search(r"^SEED: (\d+)$", config, re.M).group(1))

    so, se = _run(cmd, env)  # what a requeue runs: the same command, no --resume
    assert f"resumed at iteration {stopped + 1}" in so, so[-3000:]
    after = _snapshot(split)
    assert {f: after.get(f) for f in before} == before  # the older checkpoints are kept, not rewritten
    assert open(os.path.join(split, "config.yaml")).read() == config

    for f in before:  # disk: the checkpoints are 200 MB each
        os.remove(os.path.join(split, f))
    # uninterrupted, with the drawn seed; no checkpoint before the last step (writing them changes nothing)
    _run(_command(straight, r18_weights, seed, "SOLVER.CHECKPOINT_PERIOD", "100"), env)
    a = torch.load(os.path.join(straight, "model_final.pth"), map_location="cpu", weights_only=True)["model"]
    b = torch.load(os.path.join(split, "model_final.pth"), map_location="cpu", weights_only=True)["model"]
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]
    assert _losses(split) == _losses(straight) and len(_losses(split)) == MAX_ITER
    with open(os.path.join(split, "results.json")) as f, open(os.path.join(straight, "results.json")) as g:
        assert json.load(f) == json.load(g)


def _finite_checkpoints(out):
    files = glob.glob(os.path.join(out, "*.pth"))
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=True)["model"]
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        assert not bad, (f, bad[:3])
    return files


@pytest.mark.parametrize("backend", BACKENDS)
def test_divergence_stops_every_process_with_status_3_and_no_non_finite_checkpoint(tmp_path, datasets_env,
                                                                                   r18_weights, backend):
    out = str(tmp_path / "div")
    # the learning rate jumps 1e12-fold after iteration 4, once model_0000003.pth is written
    cmd = _command(out, r18_weights, 5, "SOLVER.STEPS", "(5,)", "SOLVER.GAMMA", "1e12")
    rc, so, se = _finish(_start(cmd, _env(datasets_env, backend)))
    assert rc == 3, so[-2000:] + se[-3000:]
    assert "Traceback" not in se, se[-3000:]
    errors = [x for x in se.splitlines() if "error" in x.lower()]
    assert len(errors) == 2 and {x[:9] for x in errors} == {"[rank 0] ", "[rank 1] "}, se[-3000:]
    for line in errors:
        assert "training diverged" in line and "iteration" in line, line
        last = re.search(r"Last good checkpoint: (\S+\.pth)", line)
        assert last and os.path.isfile(last.group(1)), line
    assert "model_0000003.pth" in _checkpoints(out) and not os.path.exists(os.path.join(out, "model_final.pth"))
    _finite_checkpoints(out)
    assert "training diverged" in open(os.path.join(out, "log.txt")).read()


@pytest.mark.plain
def test_repeat_factor_order_resumes_and_holds_each_image_floor_or_ceil_times_per_pass():
    """Detectron2's RepeatFactorTrainingSampler (the LVIS protocol) in the resumable order."""
    from collections import Counter
    from itertools import islice

    from scrl_d2.data.datasets import sample_seed
    from scrl_d2.detection.sampler import TrainingBatches

    factors = [1.0] * 8 + [2.5] * 4 + [3.0] * 2

    def stream(rank, start=0, n=30):
        batches = TrainingBatches(len(factors), 1, 7, start_iter=start, rank=rank, world=2, repeat_factors=factors)
        return [item for batch in islice(iter(batches), n) for item in batch]

    for rank in (0, 1):
        assert stream(rank, start=11, n=19) == stream(rank)[11:]
    first_pass = {sample_seed(7, 0, position) for position in range(40)}  # each occurrence's seed names its pass
    counts = Counter(i for rank in (0, 1) for i, seed in stream(rank) if seed in first_pass)
    assert [counts[i] for i in range(8)] == [1] * 8 and [counts[i] for i in (12, 13)] == [3, 3]
    assert all(counts[i] in (2, 3) for i in range(8, 12)) and sum(counts.values()) < 30


@needs_d2
def test_detectron2_path_loader_workers_outlive_the_stop_signals(datasets_env, monkeypatch):
    """SLURM signals every process of a job: the Detectron2 path's training loader and the
    evaluation loaders it builds keep their workers through SIGTERM / SIGUSR1 / SIGUSR2
    (Detectron2's own test loader has no worker_init_fn: its worker would die)."""
    from scrl_d2.config import config_from_args
    from scrl_d2.data.catalog import set_datasets_root
    from scrl_d2.detection.d2_finetune import _trainer_class
    from scrl_d2.detection.catalog import check_dataset_files
    from scrl_d2.engine.preemption import STOP_SIGNALS

    monkeypatch.setenv("SCRL_DATASETS", datasets_env["SCRL_DATASETS"])
    monkeypatch.setenv("SCRL_D2_BACKEND", "detectron2")
    set_datasets_root("")
    check_dataset_files("scrl_demo_det_val")  # generates the miniature data on first use
    cfg = config_from_args(DEMO, [*FAST, "DATALOADER.NUM_WORKERS", "1", "SEED", "3"])
    trainer = _trainer_class()
    for loader in (trainer.build_train_loader(cfg), trainer.build_test_loader(cfg, "scrl_demo_det_val")):
        it = iter(loader)
        next(it)  # the worker is up and past its worker_init_fn
        # sent by another process, as SLURM's (the worker's parent, the trainer, may end it with SIGTERM)
        pids, signums = [w.pid for w in it._workers], [int(s) for s in STOP_SIGNALS]
        kill = f"import os\nfor p in {pids}:\n    for s in {signums}:\n        os.kill(p, s)"
        subprocess.run([sys.executable, "-c", kill], check=True, timeout=60)
        time.sleep(0.5)
        assert all(w.is_alive() for w in it._workers), [w.exitcode for w in it._workers]
        next(it)
        it._shutdown_workers()
