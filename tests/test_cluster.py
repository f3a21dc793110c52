"""Where the paper ran: torchrun (elastic restarts included), several machines, SLURM
through submitit, preemption signals, a peer that dies or hangs. CPU, gloo, loopback;
every process is cleaned up."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, remove_unless_failed, tiny_opts
from test_detection import DEMO, FAST, datasets_env, r18_weights  # noqa: F401  (fixtures)
from test_engine import assert_same_weights, model_state

TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")
SUBMIT = os.path.join(ROOT, "tools", "submit_slurm.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# One intra-op thread everywhere (torchrun's default for its workers), so that runs
# started by different launchers do the same arithmetic.
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _opts(image_folder, out, *extra):
    # 2 processes x 4 images, a loader worker each: 6 iterations per epoch, 2 epochs
    return [*tiny_opts(f"classes:{image_folder}", out), "SOLVER.IMS_PER_GPU", "4", "DATALOADER.NUM_WORKERS", "1",
            *extra]


def _start(cmd, **kw):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=kw.pop("env", ENV),
                            start_new_session=True, **kw)


def _finish(p, timeout=300):
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # whatever is left of its session
        except ProcessLookupError:
            pass
    return p.returncode, out, err


def _run(cmd, timeout=300):
    return _finish(_start(cmd), timeout)


def _wait_for(pred, timeout=120, what=""):
    t = time.time()
    while time.time() - t < timeout:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _log_has(out, text):
    def pred():
        try:
            return text in open(os.path.join(out, "log.txt")).read()
        except OSError:
            return False
    return pred


def _procs(env_key, env_value=None, cmd_has=""):
    """pids whose environment has ``env_key`` (= ``env_value``) and command line ``cmd_has``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        want = f"{env_key}={env_value}".encode() if env_value is not None else None
        if (want in env if want else any(e.startswith(env_key.encode() + b"=") for e in env)) and cmd_has in cmd:
            found.append(int(pid))
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory, image_folder, request):
    """An uninterrupted 2-process run through train_net's own launcher."""
    root = tmp_path_factory.mktemp("cluster")
    out = str(root / "reference")
    rc, so, se = _run([sys.executable, TRAIN_NET, "--num-gpus", "2", *_opts(image_folder, out)])
    assert rc == 0, se[-3000:]
    state = model_state(os.path.join(out, "checkpoint_2.pth"))
    for f in os.listdir(out):  # the weights are in memory: its checkpoints (270 MB) need not stay (the logs do)
        if f.endswith(".pth"):
            os.remove(os.path.join(out, f))
    yield state
    remove_unless_failed(request, root)


def test_torchrun_workers_agree_and_equal_the_launcher(tmp_path, image_folder, reference):
    out = str(tmp_path / "torchrun")
    rc, so, se = _run([*TORCHRUN, "--nproc-per-node", "2", TRAIN_NET, *_opts(image_folder, out)])
    assert rc == 0, se[-3000:]
    log = open(os.path.join(out, "log.txt")).read()
    assert "2 processes started by torchrun" in so + se and "weights identical on all 2 processes" in log
    assert "starting 2 processes" not in so + se  # it spawned nothing of its own
    # the dataset index: listed by the main process only, the other received it
    assert "indexed " in log and "indexed " not in open(os.path.join(out, "log.txt.rank1")).read()
    assert_same_weights(reference, model_state(os.path.join(out, "checkpoint_2.pth")), atol=0)


def test_torchrun_restarts_a_killed_worker_and_ends_as_an_uninterrupted_run(tmp_path, image_folder, reference):
    out = str(tmp_path / "elastic")
    p = _start([*TORCHRUN, "--nproc-per-node", "2", "--max-restarts", "1", TRAIN_NET,
                *_opts(image_folder, out, "SOLVER.CHECKPOINT_PERIOD", "2")])
    try:
        _wait_for(lambda: os.path.exists(os.path.join(out, "model_0000003.pth")), what="model_0000003.pth")
        victims = _procs("RANK", "1", cmd_has=out)
        assert victims
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
    finally:
        rc, so, se = _finish(p)
    assert rc == 0, se[-3000:]
    log = open(os.path.join(out, "log.txt")).read()
    # The survivor said why it stopped: torchrun's agent also sent SIGTERM to its process
    # group, loader workers included, and none of them may end it first (mid-checkpoint).
    first, lost, restarted = log.partition("lost contact with another process")
    assert lost and "killed by signal" not in log, log[-3000:]
    # The restart resumes from the newest checkpoint the first attempt completed (at
    # least model_0000003.pth; later if the kill landed later), whatever it was doing.
    saved = re.findall(r"saved checkpoint (\S+)", first)
    assert os.path.join(out, "model_0000003.pth") in saved, first[-2000:]
    assert f"resuming from {saved[-1]}" in restarted, restarted[-2000:]
    assert_same_weights(reference, model_state(os.path.join(out, "checkpoint_2.pth")), atol=0)


def test_sigterm_to_torchrun_stops_every_worker_after_its_step_with_a_checkpoint(tmp_path, image_folder):
    # torchrun's agent passes SIGTERM on to each worker's whole process group (SLURM signals
    # every process too): the loader workers leave it to the trainers, which checkpoint.
    out = str(tmp_path / "term")
    p = _start([*TORCHRUN, "--nproc-per-node", "2", TRAIN_NET, *_opts(image_folder, out)])
    try:
        _wait_for(_log_has(out, "epoch 0.50"), what="iteration 3")
        p.send_signal(signal.SIGTERM)
    finally:
        rc, so, se = _finish(p)
    assert all(f"[rank {r}] stopped: interrupted by SIGTERM after iteration" in se for r in (0, 1)), se[-3000:]
    assert "killed by signal" not in se
    ck = [f for f in os.listdir(out) if f.startswith("checkpoint_0_iter")]
    assert len(ck) == 1 and os.readlink(os.path.join(out, "checkpoint_last.pth")) == ck[0]
    done = torch.load(os.path.join(out, ck[0]), weights_only=False)["trainer"]["iter"]
    assert ck[0] == f"checkpoint_0_iter{done}.pth"


def test_sigterm_mid_epoch_writes_a_checkpoint_and_the_rerun_resumes(tmp_path, image_folder, reference):
    out = str(tmp_path / "preempted")
    cmd = [sys.executable, TRAIN_NET, "--num-gpus", "2", *_opts(image_folder, out)]
    p = _start(cmd)
    try:
        _wait_for(_log_has(out, "epoch 0.50"), what="iteration 3")
        p.send_signal(signal.SIGTERM)  # to the launcher: it passes it on to its workers
    finally:
        rc, so, se = _finish(p)
    assert rc == 75, se[-3000:]
    assert "stopped: interrupted by SIGTERM after iteration" in se and "rerun the same command to resume" in se
    ck = [f for f in os.listdir(out) if f.startswith("checkpoint_0_iter")]
    assert len(ck) == 1 and os.readlink(os.path.join(out, "checkpoint_last.pth")) == ck[0]
    stopped_at = torch.load(os.path.join(out, ck[0]), weights_only=False)["trainer"]["iter"]
    rc, so, se = _run(cmd)
    assert rc == 0, se[-3000:]
    assert f"resumed at epoch 0, iteration {stopped_at}" in so + se
    assert_same_weights(reference, model_state(os.path.join(out, "checkpoint_2.pth")), atol=0)


def _two_machines(image_folder, out, port, timeout_s):
    return [_start([sys.executable, TRAIN_NET, "--num-machines", "2", "--machine-rank", str(r), "--dist-url",
                    f"tcp://127.0.0.1:{port}", "--dist-timeout", str(timeout_s), *_opts(image_folder, out)])
            for r in (0, 1)]


def test_two_machines_on_loopback_train_and_agree(tmp_path, image_folder, reference):
    from scrl_d2.engine.launch import find_free_port

    out = str(tmp_path / "machines")
    procs = _two_machines(image_folder, out, find_free_port(), 60)
    results = [_finish(p) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), [r[2][-2000:] for r in results]
    assert "weights identical on all 2 processes" in open(os.path.join(out, "log.txt")).read()
    assert_same_weights(reference, model_state(os.path.join(out, "checkpoint_2.pth")), atol=0)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_peer_that_dies_or_hangs_stops_the_survivor_within_the_timeout(tmp_path, image_folder, how):
    from scrl_d2.engine.launch import find_free_port

    out, timeout_s = str(tmp_path / "peer"), 10
    main, other = _two_machines(image_folder, out, find_free_port(), timeout_s)
    try:
        _wait_for(_log_has(out, "epoch 0.50"), what="iteration 3")
        before = set(os.listdir(out))
        os.killpg(other.pid, getattr(signal, how))  # the other "machine": killed, or frozen
        t0 = time.time()
        rc, so, se = _finish(main, timeout=timeout_s + 60)
        elapsed = time.time() - t0
    finally:
        for p in (main, other):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        other.communicate()
    assert rc == 4, se[-3000:]
    assert "lost contact with another process of this run" in se and f"--dist-timeout {timeout_s}s" in se
    assert elapsed < timeout_s + 30, elapsed
    # nothing written before was damaged; no temporary file left behind
    for f in before & {f for f in os.listdir(out) if f.endswith(".pth")}:
        torch.load(os.path.join(out, f), weights_only=False)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_submit_slurm_dry_run_prints_the_script_that_is_submitted(tmp_path):
    """The dry run prints the very script submitit hands to sbatch: checked against a real
    submission to a stand-in ``sbatch`` (and ``srun``, so that submitit takes this for a
    SLURM cluster) that keeps the script it is given."""
    pytest.importorskip("submitit")
    bin_dir, kept = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {kept}\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in ("sbatch", "srun"):
        os.chmod(bin_dir / f, 0o755)
    env = dict(ENV, PATH=f"{bin_dir}{os.pathsep}{ENV['PATH']}")
    out = str(tmp_path / "run")
    config = os.path.join(ROOT, "configs", "scrl_pretrain.yaml")
    cmd = [sys.executable, SUBMIT, "--config-file", config, "--nodes", "4", "--gpus-per-node", "8", "--partition",
           "learnlab", "--account", "vision", "--time", "600"]
    rc, so, se = _finish(_start([*cmd, "--dry-run", "OUTPUT_DIR", out], env=env))
    assert rc == 0, se
    assert not os.path.exists(out)  # nothing submitted, nothing written
    script = so.split("sbatch script (what submitit passes to sbatch):\n", 1)[1].split("command (every task", 1)[0]
    for line in ("#SBATCH --job-name=scrl_pretrain", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --partition=learnlab", "#SBATCH --account=vision",
                 "#SBATCH --time=600", "#SBATCH --signal=USR2@120"):
        assert line in script.splitlines(), script
    assert f"-m scrl_d2.cli.train_net --config-file {config} OUTPUT_DIR {out}" in so
    rc, so, se = _finish(_start([*cmd, "OUTPUT_DIR", out], env=env))  # submitted for real, to the stand-in
    assert rc == 0 and "submitted job 4242 (slurm)" in so, so + se
    assert kept.read_text() == script


def test_submit_slurm_without_submitit_says_how_to_install_it(tmp_path):
    fake = tmp_path / "nosubmitit" / "submitit"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = dict(ENV, PYTHONPATH=f"{fake.parent}{os.pathsep}{ENV.get('PYTHONPATH', '')}")
    p = _start([sys.executable, SUBMIT, "--dry-run", "OUTPUT_DIR", str(tmp_path / "run")], env=env)
    rc, so, se = _finish(p)
    assert rc == 2 and "pip install submitit" in se and len(se.strip().splitlines()) == 1, se


def test_submitit_job_is_preempted_requeued_and_resumes(tmp_path, image_folder, reference):
    pytest.importorskip("submitit")
    out = str(tmp_path / "slurm")
    p = _start([sys.executable, SUBMIT, "--cluster", "local", "--nodes", "1", "--gpus-per-node", "2", "--time", "30",
                *_opts(image_folder, out)])
    try:
        _wait_for(_log_has(out, "epoch 0.50"), what="iteration 3")
        tasks = _procs("SUBMITIT_LOCAL_GLOBALID", cmd_has=out)  # 2 tasks and their loader workers, of this job only
        assert len(tasks) >= 2
        for pid in tasks:  # what SLURM does before a time limit: the signal to every process of the tasks
            os.kill(pid, signal.SIGUSR2)
    finally:
        rc, so, se = _finish(p, timeout=400)
    assert rc == 0, so[-2000:] + se[-3000:]
    log = open(os.path.join(out, "log.txt")).read()
    assert "interrupted by SIGUSR2 after iteration" in log and "resumed at epoch 0, iteration" in log
    assert os.path.isdir(os.path.join(out, "slurm")) and "command:" in open(
        os.path.join(out, "slurm", "submitted.txt")).read()
    assert_same_weights(reference, model_state(os.path.join(out, "checkpoint_2.pth")), atol=0)


def test_submitit_fine_tuning_job_is_preempted_requeued_and_resumes(tmp_path, datasets_env, r18_weights):
    """A fine-tuning config through submitit's local executor, as on SLURM: 2 tasks with a
    loader worker each, SIGUSR2 to every process of the tasks; the job checkpoints, is
    requeued with the same command and finishes with its final evaluation."""
    pytest.importorskip("submitit")
    env = dict(ENV, **datasets_env, SCRL_D2_BACKEND="torchvision")
    out = str(tmp_path / "ft")
    p = _start([sys.executable, SUBMIT, "--cluster", "local", "--nodes", "1", "--gpus-per-node", "2", "--time", "30",
                "--config-file", DEMO, "OUTPUT_DIR", out, "MODEL.WEIGHTS", r18_weights, "SOLVER.MAX_ITER", "8", *FAST,
                "DATALOADER.NUM_WORKERS", "1", "SOLVER.CHECKPOINT_PERIOD", "100", "LOG_PERIOD", "1"], env=env)
    try:
        _wait_for(lambda: os.path.exists(os.path.join(out, "metrics.json"))
                  and '"iteration": 2' in open(os.path.join(out, "metrics.json")).read(), timeout=400,
                  what="iteration 2")
        tasks = _procs("SUBMITIT_LOCAL_GLOBALID", cmd_has=out)  # 2 tasks and their loader workers, of this job only
        assert len(tasks) >= 2
        for pid in tasks:
            os.kill(pid, signal.SIGUSR2)
    finally:
        rc, so, se = _finish(p, timeout=600)
    assert rc == 0, so[-2000:] + se[-3000:]
    log = open(os.path.join(out, "log.txt")).read()
    assert "interrupted by SIGUSR2 after iteration" in log and "resumed at iteration" in log, log[-3000:]
    assert "killed by signal" not in log
    assert os.path.exists(os.path.join(out, "model_final.pth")) and os.path.exists(os.path.join(out, "results.json"))
    iters = [int(x) for x in re.findall(r'"iteration": (\d+)', open(os.path.join(out, "metrics.json")).read())]
    assert max(iters) == 7 and len(iters) == len(set(iters))  # every step once, through the requeue


def test_torchrun_runs_detection_finetuning_and_linear_evaluation(tmp_path, image_folder, datasets_env,
                                                                 r18_weights):
    # the torchvision path: Detectron2's DefaultTrainer builds DDP with device_ids, which
    # several CPU processes cannot use (on GPUs it runs under torchrun the same way)
    env = dict(ENV, **datasets_env, SCRL_D2_BACKEND="torchvision")
    out = str(tmp_path / "det")
    p = _start([*TORCHRUN, "--nproc-per-node", "2", TRAIN_NET, "--config-file", DEMO, "OUTPUT_DIR", out,
                "MODEL.WEIGHTS", r18_weights, "SOLVER.MAX_ITER", "2", *FAST], env=env)
    rc, so, se = _finish(p)
    assert rc == 0, se[-3000:]
    assert "2 processes started by torchrun" in so + se and "rank 0 of 2" in so + se
    assert os.path.exists(os.path.join(out, "model_final.pth")) and os.path.exists(os.path.join(out, "results.json"))
    # the release's linear evaluation of a checkpoint, on 2 torchrun workers
    lin = str(tmp_path / "lin")
    rc, so, se = _run([*TORCHRUN, "--nproc-per-node", "2", TRAIN_NET, "--eval-only",
                       *_opts(image_folder, lin, "MODEL.WEIGHTS", os.path.join(os.path.dirname(r18_weights),
                                                                              "pretrain.pth"),
                              "LINEAR_EVAL.ENABLED", "True",
                              "LINEAR_EVAL.EPOCHS", "1", "LINEAR_EVAL.WARMUP_EPOCHS", "0", "LINEAR_EVAL.IMS_PER_GPU", "8",
                              "DATASETS.TEST", f"('classes:{image_folder}',)")])
    assert rc == 0, se[-3000:]
    assert "[Final result (linear eval.)]" in open(os.path.join(lin, "log.txt")).read()


def test_torchrun_on_two_machines_with_c10d_rendezvous(tmp_path, image_folder, reference):
    from scrl_d2.engine.launch import find_free_port

    out, port = str(tmp_path / "c10d"), find_free_port()
    procs = [_start([*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "scrl-test", TRAIN_NET,
                     *_opts(image_folder, out)]) for _ in range(2)]
    results = [_finish(p) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), [r[2][-2000:] for r in results]
    assert "2 processes started by torchrun, 1 per machine" in "".join(r[1] + r[2] for r in results)
    assert_same_weights(reference, model_state(os.path.join(out, "checkpoint_2.pth")), atol=0)
