"""What a rerun of a command does with the run already in OUTPUT_DIR: continue it, refuse
a different one, or (--fresh) move it aside without losing a file."""
import argparse
import logging
import os

import pytest

from scrl_d2.config import config_from_args
from scrl_d2.engine.defaults import TrainingDiverged, _known_stops, archive_run, resolve_resume
from scrl_d2.engine.preemption import TrainingInterrupted
from scrl_d2.utils.errors import BadInput

pytestmark = pytest.mark.plain
DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo",
                    "faster_rcnn_demo.yaml")


def _cfg(out, *opts):
    cfg = config_from_args(DEMO, ["OUTPUT_DIR", str(out), "SEED", "3", *opts])
    cfg.freeze()
    return cfg


def _run_dir(tmp_path, *opts):
    """An OUTPUT_DIR as a fine-tuning run leaves it: config.yaml, checkpoints, results."""
    cfg = _cfg(tmp_path, *opts)
    (tmp_path / "config.yaml").write_text(cfg.dump())
    for name, data in (("model_0000003.pth", b"a"), ("model_final.pth", b"b"), ("last_checkpoint", b"model_final.pth"),
                       ("metrics.json", b"{}\n"), ("results.json", b"{}")):
        (tmp_path / name).write_bytes(data)
    (tmp_path / "log.txt").write_text("log\n")
    return cfg


ARGS = argparse.Namespace(resume=False, eval_only=False, fresh=False)


def test_a_rerun_continues_its_own_run_and_a_new_one_starts_fresh(tmp_path):
    assert resolve_resume(_cfg(tmp_path / "empty"), ARGS) is False
    cfg = _run_dir(tmp_path)
    assert resolve_resume(cfg, ARGS) is True
    # how it runs may change (workers, logging): still the same run
    assert resolve_resume(_cfg(tmp_path, "DATALOADER.NUM_WORKERS", "0", "LOG_PERIOD", "1"), ARGS) is True


def test_a_run_with_other_weights_is_not_resumed_silently(tmp_path):
    _run_dir(tmp_path, "MODEL.WEIGHTS", "scrl.pkl")
    with pytest.raises(BadInput, match=r"MODEL.WEIGHTS: 'scrl.pkl' there, 'byol.pkl' now.*--resume.*--fresh"):
        resolve_resume(_cfg(tmp_path, "MODEL.WEIGHTS", "byol.pkl"), ARGS)
    # --resume is the explicit choice to continue it anyway
    assert resolve_resume(_cfg(tmp_path, "MODEL.WEIGHTS", "byol.pkl"), argparse.Namespace(**{**vars(ARGS),
                                                                                            "resume": True}))


def test_fresh_moves_the_old_run_aside_and_never_overwrites(tmp_path):
    _run_dir(tmp_path)
    first = archive_run(str(tmp_path))
    assert first == str(tmp_path / "previous_0")
    assert sorted(os.listdir(first)) == ["config.yaml", "last_checkpoint", "metrics.json", "model_0000003.pth",
                                         "model_final.pth", "results.json"]
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "previous_0"]
    assert archive_run(str(tmp_path)) is None  # nothing left to move
    _run_dir(tmp_path)
    assert archive_run(str(tmp_path)) == str(tmp_path / "previous_1")
    assert (tmp_path / "previous_0" / "model_final.pth").read_bytes() == b"b"


def test_fresh_is_not_repeated_by_a_restart_of_the_same_job(tmp_path, monkeypatch):
    """torchrun --max-restarts and a SLURM requeue rerun the same argv: the restart resumes."""
    import sys
    from types import SimpleNamespace

    from scrl_d2.engine.defaults import default_setup

    import random

    import numpy as np
    import torch

    cfg = _run_dir(tmp_path).clone()
    monkeypatch.setattr(sys, "argv", ["train_net.py"])
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()  # default_setup seeds them
    try:
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        default_setup(cfg, SimpleNamespace(config_file=DEMO, resume=False, fresh=True))
        assert not (tmp_path / "previous_0").exists() and (tmp_path / "model_final.pth").exists()
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
        default_setup(cfg, SimpleNamespace(config_file=DEMO, resume=False, fresh=True))
        assert (tmp_path / "previous_0" / "model_final.pth").exists()
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        for name in ("scrl_d2", "fvcore", "detectron2"):  # default_setup's file handlers into tmp_path
            log = logging.getLogger(name)
            for h in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
                log.removeHandler(h)
                h.close()


@pytest.mark.parametrize("error,kept", [(TrainingInterrupted("stopped", 12), False),
                                        (TrainingDiverged("diverged"), False), (RuntimeError("a bug"), True)])
def test_detectron2s_training_traceback_is_dropped_for_stops_reported_in_one_line(error, kept):
    try:
        raise error
    except Exception:
        import sys

        record = logging.LogRecord("detectron2.engine.train_loop", logging.ERROR, __file__, 1,
                                   "Exception during training:", None, sys.exc_info())
    assert _known_stops(record) is kept
