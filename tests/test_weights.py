import pytest
import torch
import torchvision

from conftest import tiny_cfg
from scrl_d2.engine import PretrainTrainer
from scrl_d2.checkpoint import torchvision_to_d2


def test_model_weights_initialise_the_online_encoder(tmp_path, image_folder):
    tv = torchvision.models.resnet18()
    path = str(tmp_path / "r18.pth")
    torch.save(tv.state_dict(), path)
    cfg = tiny_cfg(f"classes:{image_folder}", out=str(tmp_path / "run"))
    cfg.MODEL.WEIGHTS = path
    trainer = PretrainTrainer(cfg)
    assert trainer.resume_or_load(resume=True) is False  # nothing to resume: weights loaded instead
    ours = trainer.model.backbone.state_dict()
    for k, v in tv.state_dict().items():
        if not k.startswith("fc."):
            torch.testing.assert_close(ours[torchvision_to_d2(k)], v)


def test_model_weights_that_do_not_fit_are_rejected(tmp_path, image_folder):
    path = str(tmp_path / "bad.pth")
    torch.save({"something": torch.zeros(1)}, path)
    cfg = tiny_cfg(f"classes:{image_folder}", out=str(tmp_path / "run"))
    cfg.MODEL.WEIGHTS = path
    with pytest.raises(ValueError, match="bad.pth"):
        PretrainTrainer(cfg).resume_or_load(resume=True)
    cfg.MODEL.WEIGHTS = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        PretrainTrainer(cfg).resume_or_load(resume=True)


def _payload_weights(tmp_path):
    """ResNet-18 weights plus an object whose unpickling writes a marker file."""
    import builtins

    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return builtins.exec, (f"open({str(marker)!r}, 'w').close()",)

    tv = torchvision.models.resnet18()
    path = str(tmp_path / "r18_payload.pth")
    torch.save({**tv.state_dict(), "extra": Payload()}, path)
    return tv, path, marker


def test_model_weights_that_would_run_code_need_the_unsafe_load(tmp_path, image_folder, monkeypatch, caplog):
    import logging

    from scrl_d2.checkpoint import UnsafeCheckpointError

    monkeypatch.delenv("SCRL_D2_UNSAFE_LOAD", raising=False)
    tv, path, marker = _payload_weights(tmp_path)
    cfg = tiny_cfg(f"classes:{image_folder}", out=str(tmp_path / "run"))
    cfg.MODEL.WEIGHTS = path
    with pytest.raises(ValueError, match=f"MODEL.WEIGHTS {path}: .*builtins.exec.*--unsafe-load") as e:
        PretrainTrainer(cfg).resume_or_load(resume=True)
    assert isinstance(e.value.__cause__, UnsafeCheckpointError)
    assert not marker.exists()
    monkeypatch.setenv("SCRL_D2_UNSAFE_LOAD", "1")  # what --unsafe-load sets
    log = logging.getLogger("scrl_d2.checkpoint")
    log.addHandler(caplog.handler)
    try:
        trainer = PretrainTrainer(cfg)
        trainer.resume_or_load(resume=True)
    finally:
        log.removeHandler(caplog.handler)
    assert marker.exists()  # it ran: that is what the option allows
    assert any("full unpickling" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    ours = trainer.model.backbone.state_dict()
    torch.testing.assert_close(ours["stem.conv1.weight"], tv.state_dict()["conv1.weight"])


def test_detection_weights_pkl_that_would_run_code_is_refused(tmp_path, monkeypatch):
    import builtins
    import pickle

    from scrl_d2.detection.torchvision_model import load_detector_weights

    monkeypatch.delenv("SCRL_D2_UNSAFE_LOAD", raising=False)
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return builtins.exec, (f"open({str(marker)!r}, 'w').close()",)

    path = str(tmp_path / "w.pkl")
    with open(path, "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": Payload()}, "__author__": "x"}, f)
    with pytest.raises(ValueError, match="MODEL.WEIGHTS .*builtins.exec.*--unsafe-load"):
        load_detector_weights(None, path)
    assert not marker.exists()
