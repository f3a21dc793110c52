import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SHIPPED_TINY, tiny_opts
from scrl_d2.checkpoint import Checkpointer, atomic_torch_save

TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")


def run_cli(*args, env_extra=None, check=True):
    env = dict(os.environ, **(env_extra or {}))
    # 20 minutes: the shipped scale under bf16 took over 10 on a 2-core CPU without native bf16 (no AVX-512)
    r = subprocess.run([sys.executable, TRAIN_NET, *args], capture_output=True, text=True, env=env, timeout=1200)
    if check and r.returncode != 0:
        raise AssertionError(f"train_net failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def model_state(path):
    """The model of a checkpoint, read as the project reads it: without running code."""
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


@pytest.mark.parametrize("arch", ["SCRL", "BYOL"])
def test_resume_in_a_fresh_process_equals_an_uninterrupted_run(tmp_path, image_folder, arch):
    data = f"classes:{image_folder}"  # 48 images, batch 8: 6 iterations per epoch, 2 epochs
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_cli(*tiny_opts(data, straight, arch))
    r = run_cli(*tiny_opts(data, split, arch), "SOLVER.MAX_ITER", "6")  # "interrupted" after epoch 1
    assert os.path.exists(os.path.join(split, "checkpoint_1.pth")) and not os.path.exists(
        os.path.join(split, "checkpoint_2.pth"))
    r = run_cli(*tiny_opts(data, split, arch))  # a fresh process picks up checkpoint_last
    assert "resumed at epoch 1, iteration 6" in r.stdout
    a, b = model_state(os.path.join(straight, "checkpoint_2.pth")), model_state(os.path.join(split, "checkpoint_2.pth"))
    assert_same_weights(a, b)
    full = torch.load(os.path.join(split, "checkpoint_last.pth"), weights_only=True)
    assert {"model", "optimizer", "scaler", "trainer"} <= set(full) and full["trainer"]["iter"] == 12
    lines = [json.loads(x) for x in open(os.path.join(straight, "metrics.json"))]
    assert lines[-1]["iteration"] == 11  # Detectron2's numbering: the last step's 0-based index
    assert os.path.islink(os.path.join(split, "checkpoint_last.pth"))


def test_mid_epoch_stop_resumes_mid_epoch(tmp_path, image_folder):
    data = f"classes:{image_folder}"
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_cli(*tiny_opts(data, straight))
    run_cli(*tiny_opts(data, split), "SOLVER.MAX_ITER", "4")
    assert os.path.exists(os.path.join(split, "checkpoint_0_iter4.pth"))
    r = run_cli(*tiny_opts(data, split))
    assert "iteration 4" in r.stdout
    assert_same_weights(model_state(os.path.join(straight, "checkpoint_2.pth")),
                        model_state(os.path.join(split, "checkpoint_2.pth")))


def test_two_processes_with_gloo_train_and_agree(tmp_path, image_folder):
    out = str(tmp_path / "ddp")
    opts = tiny_opts(f"classes:{image_folder}", out)
    r = run_cli("--num-gpus", "2", *opts, "SOLVER.IMS_PER_GPU", "4", "SOLVER.EPOCHS", "1", "SOLVER.WARMUP_EPOCHS", "0")
    assert "global batch 8" in r.stdout and "rank 0 of 2" in r.stdout
    assert "weights identical on all 2 processes" in r.stdout  # all parameters compared across ranks
    assert os.path.exists(os.path.join(out, "checkpoint_1.pth")) and os.path.exists(os.path.join(out, "log.txt.rank1"))
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.json"))]
    assert lines[-1]["iteration"] == 5


@pytest.mark.parametrize("norm,stats", [("SyncBN", "identical"), ("BN", "different")])
def test_shipped_config_on_two_cpu_processes_synchronises_batch_norm(tmp_path, batch_scale_folder, norm, stats):
    """The shipped config as a user runs it on two processes (256 images each, a loader
    worker, bf16): SyncBN as the release, so every process ends with the same running
    statistics; with per-process BN (and unbroadcast buffers, as the release) they differ."""
    out = str(tmp_path / "shipped")
    opts = [*SHIPPED_TINY, "DATASETS.TRAIN", f"('images:{batch_scale_folder}',)", "DATASETS.TEST", "()",
            "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", out]
    if norm != "SyncBN":
        opts += ["MODEL.RESNETS.NORM", norm, "MODEL.BYOL.HEAD_NORM", norm]
    r = run_cli("--config-file", os.path.join(ROOT, "configs", "scrl_pretrain.yaml"), "--num-gpus", "2", *opts)
    assert "global batch 512" in r.stdout and "mixed precision: torch.bfloat16" in r.stdout
    if norm == "SyncBN":
        assert "batch-norm layers take their statistics from the global batch (2 processes, over gloo on CPU)" \
            in r.stdout
    else:
        assert "use per-process statistics" in r.stdout + r.stderr
    assert "weights identical on all 2 processes" in r.stdout
    assert f"batch-norm running statistics {stats} on the 2 processes" in r.stdout
    # stopped by SOLVER.MAX_ITER at the end of epoch 2 (1 step per epoch): its checkpoint is written
    state = model_state(os.path.join(out, "checkpoint_2.pth"))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert any(k.endswith("running_var") for k in state)


def test_demo_config_runs_from_the_command_line(tmp_path):
    out = str(tmp_path / "demo")
    r = run_cli("--config-file", os.path.join(ROOT, "configs", "demo", "scrl_demo.yaml"), "OUTPUT_DIR", out,
                "SOLVER.MAX_ITER", "3", "LOG_PERIOD", "1", env_extra={"SCRL_DATASETS": str(tmp_path / "ds")})
    if torch.cuda.is_available():
        assert "CUDA available: " in r.stdout and "no GPU is visible" not in r.stdout
    else:  # the config asks for cuda: the run says it falls back to the CPU
        assert "MODEL.DEVICE is 'cuda' but no GPU is visible: running on the CPU" in r.stdout
    assert os.path.exists(os.path.join(out, "checkpoint_0_iter3.pth"))
    assert os.path.exists(os.path.join(out, "config.yaml")) and os.path.exists(os.path.join(out, "log.txt"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))


def test_bad_config_key_fails_cleanly_from_the_cli(tmp_path):
    r = run_cli("--config-file", os.path.join(ROOT, "configs", "demo", "scrl_demo.yaml"), "SOLVER.BASE_LRR", "1",
                check=False)
    assert r.returncode == 2 and "SOLVER.BASE_LRR" in r.stderr and "Traceback" not in r.stderr


def test_checkpoint_is_never_half_written(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint_1.pth")
    atomic_torch_save({"a": torch.ones(3)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint_1.pth"]


def test_resume_picks_newest_complete_checkpoint_without_tag(tmp_path):
    model = torch.nn.Linear(2, 2)
    ck = Checkpointer(model, str(tmp_path))
    ck.save("checkpoint_1")
    ck.save("checkpoint_2")
    os.remove(tmp_path / "last_checkpoint")
    os.remove(tmp_path / "checkpoint_last.pth")
    assert ck.get_checkpoint_file().endswith("checkpoint_2.pth")


def _train_in_process(cfg):
    from scrl_d2.engine import PretrainTrainer
    from scrl_d2.utils.logger import setup_logger

    setup_logger(cfg.OUTPUT_DIR)
    trainer = PretrainTrainer(cfg)
    trainer.resume_or_load()
    trainer.train()
    return trainer


def test_steps_without_any_box_pair_are_skipped_and_logged(tmp_path, image_folder, caplog):
    from conftest import tiny_cfg

    # crops of 1-2 % of the image almost never share a 60 px region: no box pairs at all
    cfg = tiny_cfg(f"classes:{image_folder}", out=str(tmp_path / "nobox"))
    cfg.merge_from_list(["INPUT.CROP_SCALE", "(0.01, 0.02)", "MODEL.SCRL.MIN_SIZE", "60", "SOLVER.MAX_ITER", "3"])
    before = {n: p.detach().clone() for n, p in _fresh_params(cfg)}
    trainer = _train_in_process(cfg)
    assert trainer.iter == 3 and trainer.skipped_steps == 3
    for n, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n])  # no update, no EMA on a skipped step
    lines = [json.loads(x) for x in open(os.path.join(cfg.OUTPUT_DIR, "metrics.json"))]
    assert lines[-1]["skipped_steps"] == 3


def _fresh_params(cfg):
    from scrl_d2.engine.defaults import seed_all_rng
    from scrl_d2.modeling import build_model

    seed_all_rng(123)
    m = build_model(cfg)
    seed_all_rng(123)
    return list(m.named_parameters())


@pytest.mark.parametrize("arch", ["SCRL", "BYOL"])
def test_mixed_precision_step_on_cpu(tmp_path, image_folder, arch):
    from conftest import tiny_cfg

    cfg = tiny_cfg(f"classes:{image_folder}", arch, out=str(tmp_path / "amp"))
    cfg.merge_from_list(["SOLVER.AMP.ENABLED", "True", "MODEL.CHANNELS_LAST", "True", "SOLVER.MAX_ITER", "2"])
    trainer = _train_in_process(cfg)
    assert trainer.dtype == torch.bfloat16 and trainer.iter == 2
    lines = [json.loads(x) for x in open(os.path.join(cfg.OUTPUT_DIR, "metrics.json"))]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in lines)


@pytest.mark.plain
def test_the_gloo_side_group_gets_the_run_dist_timeout(monkeypatch):
    """Beside NCCL, small CPU exchanges use a gloo group: it must time out with
    --dist-timeout (launch exports it), not after torch's 30 minutes."""
    from datetime import timedelta

    import torch.distributed as dist

    from scrl_d2.backend import use_detectron2
    from scrl_d2.utils import comm

    made = []
    monkeypatch.setenv("SCRL_D2_DIST_TIMEOUT", "42")
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(dist, "new_group", lambda *a, **k: made.append(k) or object())
    comm._cpu_group.cache_clear()
    try:
        comm._cpu_group()
    finally:
        comm._cpu_group.cache_clear()
    assert made == [{"backend": "gloo", "timeout": timedelta(seconds=42)}]
    if use_detectron2(quiet=True):  # Detectron2's all_gather (its evaluators') takes the same group
        from detectron2.utils import comm as d2_comm

        assert d2_comm._get_global_gloo_group is comm._cpu_group
    else:  # the per-machine group too
        comm.create_local_process_group(1)
        assert made[1]["timeout"] == timedelta(seconds=42)


@pytest.mark.plain
def test_a_lost_peer_is_a_collective_failure_not_any_mention_of_nccl(monkeypatch):
    import torch.distributed as dist

    from scrl_d2.engine import defaults

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(defaults.comm, "get_world_size", lambda: 2)
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:4")
    assert defaults.peer_lost(gloo) and defaults._exit_code(gloo) == defaults.EXIT_PEER_LOST
    assert defaults.peer_lost(dist.DistBackendError("NCCL communicator was aborted on rank 1"))
    for e in (RuntimeError("CUDA error: an illegal memory access (NCCL_DEBUG=INFO for details)"),
              RuntimeError("NCCL version 2.21 is too old for this feature")):
        assert not defaults.peer_lost(e) and defaults._exit_code(e) is None  # a bug: traceback, exit 1


@pytest.mark.plain
def test_only_diagnosed_bad_input_is_exit_status_2():
    from scrl_d2.config import ConfigError
    from scrl_d2.engine.defaults import EXIT_BAD_INPUT, _exit_code
    from scrl_d2.utils.errors import InputFileNotFoundError, InputKeyError, InputValueError

    for e in (ValueError("math domain error"), KeyError("res5"), FileNotFoundError("/tmp/x"), ImportError("y"),
              PermissionError("z")):
        assert _exit_code(e) is None, e  # unexpected: the traceback is shown
    for e in (ConfigError("SOLVER.BASE_LR: -1"), InputValueError("v"), InputKeyError("dataset 'x' is not registered"),
              InputFileNotFoundError("/no/such")):
        assert _exit_code(e) == EXIT_BAD_INPUT, e
    assert str(InputKeyError("dataset 'x' is not registered")) == "dataset 'x' is not registered"
    try:  # a diagnosis re-raised with the key added stays one
        try:
            raise InputFileNotFoundError("checkpoint not found: /w.pth")
        except FileNotFoundError as inner:
            raise FileNotFoundError(f"MODEL.WEIGHTS /w.pth: {inner}") from inner
    except FileNotFoundError as outer:
        assert _exit_code(outer) == EXIT_BAD_INPUT


@pytest.mark.plain
def test_a_bad_argument_is_one_line_without_the_usage_block(tmp_path):
    r = run_cli("--num-gpus", "0", "--config-file", "x.yaml", check=False)
    assert r.returncode == 2 and r.stderr.splitlines() == ["error: argument --num-gpus: 0: expected 1 or more"], \
        r.stderr


def _fault_env(tmp_path, fault: str) -> dict:
    """A sitecustomize that makes every process of the run (spawned workers too) raise
    ``fault`` where training starts: an unexpected error inside a run, as a bug raises it."""
    d = tmp_path / "fault"
    d.mkdir()
    (d / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('SCRL_TEST_FAULT'):\n"
        "    from scrl_d2.engine import trainer\n"
        "    def train(self):\n"
        f"        raise {fault}\n"
        "    trainer.PretrainTrainer.train = train\n")
    return {"PYTHONPATH": os.pathsep.join([str(d), os.environ.get("PYTHONPATH", "")]), "SCRL_TEST_FAULT": "1"}


@pytest.mark.parametrize("fault", ["ValueError('an internal value a bug produced')",
                                   "KeyError('res5.2.conv3.weight')"])
def test_an_unexpected_error_inside_a_run_exits_1_with_its_traceback(tmp_path, image_folder, fault):
    out = str(tmp_path / "bug")
    r = run_cli(*tiny_opts(f"classes:{image_folder}", out), env_extra=_fault_env(tmp_path, fault), check=False)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback (most recent call last)" in r.stderr and fault.split("(")[0] in r.stderr
    assert not r.stderr.strip().splitlines()[-1].startswith("error: ")  # not disguised as bad input
    log = open(os.path.join(out, "log.txt")).read()
    assert "fatal error: " + fault.split("(")[0] in log and "Traceback (most recent call last)" in log


def test_an_unexpected_error_is_in_every_process_log(tmp_path, image_folder):
    out = str(tmp_path / "bug2")
    r = run_cli("--num-gpus", "2", *tiny_opts(f"classes:{image_folder}", out), "SOLVER.IMS_PER_GPU", "4",
                env_extra=_fault_env(tmp_path, "KeyError('an internal key')"), check=False)
    assert r.returncode == 1 and "Traceback" in r.stderr, r.stderr[-3000:]
    for name in ("log.txt", "log.txt.rank1"):
        log = open(os.path.join(out, name)).read()
        assert "fatal error: KeyError" in log and "Traceback (most recent call last)" in log, name
