"""The pretraining loop speaks Detectron2's engine contract: its EventStorage, its writers'
files, its hooks (HookBase subclasses, PeriodicCheckpointer), its iteration numbering."""
import json
import logging
import os
import shutil

import pytest
import torch

from conftest import tiny_cfg
from scrl_d2.backend import detectron2_available
from scrl_d2.utils import events

needs_d2 = pytest.mark.skipif(not detectron2_available(), reason="Detectron2 is not installed")


def _feed(impl, json_path):
    """The same scalars, as a trainer puts them: smoothed and not, several per iteration,
    some iterations written late (cur_iter), an evaluation at an epoch end."""
    storage = impl["EventStorage"](start_iter=0)
    printer = impl["CommonMetricPrinter"](max_iter=30)
    writer = impl["JSONWriter"](json_path)
    with storage:
        for it in range(30):
            storage.iter = it
            if it % 7 == 3:
                continue  # a step that put nothing (skipped)
            storage.put_scalars(loss=1.0 / (it + 1) + 0.01 * (it % 3), time=0.25 + 0.001 * it, data_time=0.01,
                                num_pairs=400 + it % 5)
            storage.put_scalars(lr=0.1 * it, epoch=it / 10, smoothing_hint=False)
            if it % 10 == 9:
                storage.put_scalar("probe/top1", 10.0 + it, smoothing_hint=False)
            if it % 4 == 3 or it == 29:
                impl["get_event_storage"]().put_scalar("late", it * 2.0, cur_iter=it - 1)
                printer.write()
                writer.write()
        storage.iter = 30
        printer.write()  # after training: prints nothing
        writer.write()
        writer.close()
    return storage


def _d2_impl():
    from detectron2.utils import events as d2

    return {k: getattr(d2, k) for k in ("EventStorage", "CommonMetricPrinter", "JSONWriter", "get_event_storage")}


@needs_d2
def test_metrics_json_and_console_line_equal_detectron2_byte_for_byte(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    _feed(_d2_impl(), str(tmp_path / "d2.json"))
    theirs = [r.getMessage() for r in caplog.records if r.name == "detectron2.utils.events"]
    caplog.clear()
    _feed(events.OWN, str(tmp_path / "own.json"))
    ours = [r.getMessage() for r in caplog.records if r.name == "scrl_d2.utils.events"]
    assert open(tmp_path / "own.json", "rb").read() == open(tmp_path / "d2.json", "rb").read()
    assert len(ours) == len(theirs) == 7
    strip_eta = lambda m: m.split("iter: ", 1)[1]  # noqa: E731  (the ETA depends on the clock)
    assert [strip_eta(m) for m in ours] == [strip_eta(m) for m in theirs]


def test_metrics_json_follows_detectron2s_rules(tmp_path):
    import numpy as np

    storage = _feed(events.OWN, str(tmp_path / "m.json"))
    lines = open(tmp_path / "m.json").read().splitlines()
    rows = [json.loads(x) for x in lines]
    assert all(x == json.dumps(r, sort_keys=True) for x, r in zip(lines, rows))  # keys sorted, one object a line
    its = [r["iteration"] for r in rows]
    assert len(its) == len(set(its))  # nothing written twice
    row = next(r for r in rows if r["iteration"] == 15)
    # noisy scalars: the median of the values put in the last 20 iterations; others: the latest
    vals = [1.0 / (i + 1) + 0.01 * (i % 3) for i in range(16) if i % 7 != 3]
    assert row["loss"] == pytest.approx(float(np.median(vals)))
    assert row["lr"] == pytest.approx(1.5) and row["epoch"] == pytest.approx(1.5)
    assert row["eta_seconds"] == pytest.approx(float(np.median([0.25 + 0.001 * i for i in range(16) if i % 7 != 3]))
                                               * (30 - 15 - 1))
    assert {r["iteration"] for r in rows if "late" in r} == {6, 10, 14, 18, 22, 26, 28}
    assert [r["probe/top1"] for r in rows if "probe/top1" in r] == [19.0, 29.0, 39.0]
    assert storage.history("loss").latest() == pytest.approx(1.0 / 30 + 0.02)


class Recorder(events.HookBase):
    """A user's hook: Detectron2's HookBase when it is installed."""

    def __init__(self):
        self.calls, self.iters, self.count = [], [], 0

    def before_train(self):
        self.calls.append(("before_train", self.trainer.iter))

    def before_step(self):
        self.iters.append(self.trainer.iter)
        assert self.trainer.storage.iter == self.trainer.iter

    def after_backward(self):
        g = next(self.trainer.model.backbone.parameters()).grad
        self.calls.append(("after_backward", g is not None))

    def after_step(self):
        self.count += 1
        events.get_event_storage().put_scalar("user/steps", self.count, smoothing_hint=False)

    def after_train(self):
        self.calls.append(("after_train", self.trainer.iter))

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def _trainer(cfg, hooks=()):
    from scrl_d2.engine import PretrainTrainer
    from scrl_d2.engine.defaults import seed_all_rng
    from scrl_d2.utils.logger import setup_logger

    setup_logger(cfg.OUTPUT_DIR)
    seed_all_rng(cfg.SEED)  # as train_net does: each run starts from the same RNG state
    t = PretrainTrainer(cfg)
    t.register_hooks(list(hooks))
    t.resume_or_load()
    return t


def test_a_detectron2_hook_runs_in_our_loop_and_its_state_resumes(tmp_path, image_folder):
    cfg = tiny_cfg(f"classes:{image_folder}", out=str(tmp_path / "run"))  # 6 iterations/epoch, 2 epochs
    cfg.merge_from_list(["SOLVER.MAX_ITER", "8", "LOG_PERIOD", "4"])
    rec = Recorder()
    t = _trainer(cfg, [rec])
    assert type(t.hooks[-1]).__name__ == "EventWriters"  # writers stay last
    t.train()
    assert rec.iters == list(range(8))  # Detectron2's numbering
    assert rec.calls[0] == ("before_train", 0) and rec.calls[-1] == ("after_train", 8)
    assert [c for c in rec.calls if c[0] == "after_backward"] == [("after_backward", True)] * 8
    rows = [json.loads(x) for x in open(os.path.join(cfg.OUTPUT_DIR, "metrics.json"))]
    # written after iterations 3, 5 (epoch end) and 7; a user's scalar is written with ours
    assert [r["iteration"] for r in rows] == [3, 5, 7]
    assert [r["user/steps"] for r in rows] == [4, 6, 8]
    assert {"loss", "total_loss", "lr", "time", "data_time", "num_pairs", "momentum", "epoch"} <= set(rows[0])
    assert rows[1]["epoch"] == 1.0
    # the hook's state is in the checkpoint and comes back on resume
    state = torch.load(os.path.join(cfg.OUTPUT_DIR, "checkpoint_last.pth"), weights_only=False)["trainer"]
    assert state["hooks"] == {"Recorder": {"count": 8}} and state["iter"] == 8
    cfg.merge_from_list(["SOLVER.MAX_ITER", "0"])
    rec2 = Recorder()
    t2 = _trainer(cfg, [rec2])
    assert rec2.count == 8 and t2.iter == 8
    t2.train()
    assert rec2.iters == [8, 9, 10, 11] and rec2.count == 12


def test_iteration_checkpoints_resume_mid_epoch_to_the_same_weights(tmp_path, image_folder):
    from test_engine import assert_same_weights, model_state

    data = f"classes:{image_folder}"
    straight = tiny_cfg(data, out=str(tmp_path / "straight"))
    t = _trainer(straight)
    t.train()
    # every step's loss is in the storage (metrics.json holds Detectron2's medians): the
    # second epoch's mean is below the first's (single steps are too noisy to compare)
    losses = [v for v, _ in t.storage.history("loss").values()]
    assert len(losses) == 12 and sum(losses[6:]) < sum(losses[:6]), losses
    os.remove(os.path.join(straight.OUTPUT_DIR, "checkpoint_1.pth"))  # only checkpoint_2 is compared (disk)
    cfg = tiny_cfg(data, out=str(tmp_path / "split"))
    cfg.merge_from_list(["SOLVER.CHECKPOINT_PERIOD", "4", "SOLVER.CHECKPOINT_MAX_TO_KEEP", "1"])
    _trainer(cfg).train()
    d = cfg.OUTPUT_DIR
    # after iterations 3 and 7 (Detectron2's names), the older one pruned; none at the last iteration
    assert sorted(f for f in os.listdir(d) if f.startswith("model_")) == ["model_0000007.pth"]
    ck = torch.load(os.path.join(d, "model_0000007.pth"), weights_only=False)
    assert ck["iteration"] == 7 and ck["trainer"]["iter"] == 8
    # a run killed after iteration 7: only what existed then is left
    killed = str(tmp_path / "killed")
    os.makedirs(killed)
    for f in ("model_0000007.pth", "checkpoint_1.pth", "config.yaml"):
        if os.path.exists(os.path.join(d, f)):
            shutil.move(os.path.join(d, f), killed)  # moved, not copied: the split run is not read again (disk)
    shutil.rmtree(d)
    with open(os.path.join(killed, "last_checkpoint"), "w") as f:
        f.write("model_0000007.pth")
    cfg2 = tiny_cfg(data, out=killed)
    t = _trainer(cfg2)
    assert t.iter == 8 and t.epoch == 1
    t.train()
    assert_same_weights(model_state(os.path.join(straight.OUTPUT_DIR, "checkpoint_2.pth")),
                        model_state(os.path.join(killed, "checkpoint_2.pth")))


@needs_d2
def test_detectron2_periodic_checkpointer_and_writer_hooks_in_our_loop(tmp_path, image_folder):
    from detectron2.engine.hooks import PeriodicCheckpointer, PeriodicWriter
    from detectron2.utils.events import JSONWriter

    cfg = tiny_cfg(f"classes:{image_folder}", out=str(tmp_path / "run"))
    cfg.merge_from_list(["SOLVER.MAX_ITER", "4", "LOG_PERIOD", "2"])
    t = _trainer(cfg)
    theirs = os.path.join(cfg.OUTPUT_DIR, "d2_metrics.json")
    t.register_hooks([PeriodicCheckpointer(t.checkpointer, 2), PeriodicWriter([JSONWriter(theirs)], period=2)])
    t.train()
    d = cfg.OUTPUT_DIR
    assert {"model_0000001.pth", "model_final.pth"} <= set(os.listdir(d))
    assert torch.load(os.path.join(d, "model_0000001.pth"), weights_only=False)["iteration"] == 1
    ours = [json.loads(x) for x in open(os.path.join(d, "metrics.json"))]
    other = [json.loads(x) for x in open(theirs)]
    # the same scalars; eta_seconds is put by the console printer, which runs after their writer
    drop = lambda rows: [{k: v for k, v in r.items() if k != "eta_seconds"} for r in rows]  # noqa: E731
    assert drop(ours) == drop(other) and [r["iteration"] for r in ours] == [1, 3]
    # a resume from Detectron2's file (no trainer state) continues after its iteration
    with open(os.path.join(d, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")
    cfg.merge_from_list(["SOLVER.MAX_ITER", "0"])
    t2 = _trainer(cfg)
    assert t2.iter == 2


def test_a_failed_metrics_write_warns_and_training_goes_on(tmp_path, image_folder, monkeypatch):
    from scrl_d2.engine import hooks

    def full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hooks.JSONWriter, "write", full)
    cfg = tiny_cfg(f"classes:{image_folder}", out=str(tmp_path / "run"))
    cfg.merge_from_list(["SOLVER.MAX_ITER", "6"])
    t = _trainer(cfg)
    t.train()
    assert t.iter == 6 and os.path.exists(os.path.join(cfg.OUTPUT_DIR, "checkpoint_1.pth"))
    log = open(os.path.join(cfg.OUTPUT_DIR, "log.txt")).read().splitlines()
    warned = [x for x in log if "JSONWriter cannot write" in x]
    assert len(warned) == 1 and "No space left on device" in warned[0]
