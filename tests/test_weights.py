import pytest
import torch
import torchvision

from conftest import tiny_cfg
from scrl_d2.engine import PretrainTrainer
from scrl_d2.modeling import torchvision_to_d2


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
