import os
import pickle
import subprocess
import sys

import pytest
import torch
import torchvision

from conftest import ROOT
from scrl_d2.checkpoint import LayoutError, d2_to_torchvision, extract_encoder, torchvision_to_d2
from scrl_d2.checkpoint.convert import convert_checkpoint
from scrl_d2.modeling import ResNet

CONVERT = os.path.join(ROOT, "tools", "convert.py")


def tv_resnet(depth):
    torch.manual_seed(depth)
    m = getattr(torchvision.models, f"resnet{depth}")()
    with torch.no_grad():  # non-trivial BN statistics, so a wrong mapping shows
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
                mod.weight.uniform_(0.5, 1.5)
    return m


def official_checkpoint(tv):
    """The release's layout: encoder = Sequential(*children[:-1]), plus projector/predictor."""
    enc = torch.nn.Sequential(*list(tv.children())[:-1])
    online = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    online.update({"projector.net.0.weight": torch.zeros(8, 2048), "projector.net.3.weight": torch.zeros(4, 8)})
    return {"epoch": 200, "max_eval_score": 0.0, "max_eval_epoch": 0, "online_network_state_dict": online,
            "target_network_state_dict": {f"encoder.{k}": v * 0 for k, v in enc.state_dict().items()},
            "predictor_state_dict": {"net.0.weight": torch.zeros(2, 2)}, "optimizer_state_dict": {}}


def ours_checkpoint(tv):
    enc = {f"backbone.{torchvision_to_d2(k)}": v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    tgt = {f"target_backbone.{torchvision_to_d2(k)}": v + 1 for k, v in tv.state_dict().items()
           if not k.startswith("fc.") and v.is_floating_point()}
    return {"model": {**enc, **tgt, "projector.net.0.weight": torch.zeros(3, 3)}, "optimizer": {}, "trainer": {}}


@pytest.mark.parametrize("depth", [50, 101])
@pytest.mark.parametrize("layout", ["torchvision", "official", "scrl_d2"])
def test_every_backbone_tensor_lands_under_the_right_name(tmp_path, depth, layout):
    tv = tv_resnet(depth)
    ckpt = {"torchvision": tv.state_dict(), "official": official_checkpoint(tv), "scrl_d2": ours_checkpoint(tv)}[layout]
    src = str(tmp_path / "in.pth")
    torch.save(ckpt, src)
    expected = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}

    s = convert_checkpoint(src, str(tmp_path / "out.pkl"))
    assert s["layout"] == layout and s["resnet_depth"] == depth and s["tensors"] == len(expected)
    d2 = pickle.load(open(tmp_path / "out.pkl", "rb"))
    assert d2["matching_heuristics"] is True
    for k, v in expected.items():
        got = d2["model"][torchvision_to_d2(k)]
        assert got.shape == tuple(v.shape) and (torch.from_numpy(got) == v).all(), k

    convert_checkpoint(src, str(tmp_path / "out.pth"))
    tvout = torch.load(tmp_path / "out.pth")
    assert tvout.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(tvout[k], v), k
    if layout != "torchvision":
        assert s["dropped"]  # projector etc. reported


def test_target_encoder_can_be_chosen(tmp_path):
    tv = tv_resnet(50)
    src = str(tmp_path / "in.pth")
    torch.save(official_checkpoint(tv), src)
    convert_checkpoint(src, str(tmp_path / "t.pth"), encoder="target")
    assert torch.count_nonzero(torch.load(tmp_path / "t.pth")["conv1.weight"]) == 0


def test_torchvision_faster_rcnn_backbone_loads_the_pth_strictly(tmp_path):
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    tv = tv_resnet(50)
    src = str(tmp_path / "in.pth")
    torch.save(ours_checkpoint(tv), src)
    convert_checkpoint(src, str(tmp_path / "out.pth"))
    det = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3).eval()
    det.backbone.body.load_state_dict(torch.load(tmp_path / "out.pth"), strict=True)
    x = torch.randn(1, 3, 64, 64)
    tv.eval()
    body = torch.nn.Sequential(*list(tv.children())[:-2])
    torch.testing.assert_close(det.backbone.body(x)["3"], body(x), atol=1e-4, rtol=1e-4)


def test_resnet_round_trip_names():
    sd = ResNet(depth=50).state_dict()
    assert all(torchvision_to_d2(d2_to_torchvision(k)) == k for k in sd)


def test_unrecognised_input_fails_and_writes_nothing(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a checkpoint")
    r = subprocess.run([sys.executable, CONVERT, str(bad), str(tmp_path / "o.pkl")], capture_output=True, text=True)
    assert r.returncode == 2 and "not a readable PyTorch checkpoint" in r.stderr and "nothing was written" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    odd = tmp_path / "odd.pth"
    torch.save({"weights": {"alpha.beta": torch.zeros(1)}, "step": 3}, odd)
    r = subprocess.run([sys.executable, CONVERT, str(odd), str(tmp_path / "o.pkl")], capture_output=True, text=True)
    assert r.returncode == 2 and "unrecognised checkpoint layout" in r.stderr and "'weights'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(tmp_path / "o.pkl")
    with pytest.raises(LayoutError):
        extract_encoder([1, 2, 3])


def test_cli_summary(tmp_path):
    src = str(tmp_path / "in.pth")
    tv = tv_resnet(50)
    torch.save(official_checkpoint(tv), src)
    r = subprocess.run([sys.executable, CONVERT, src, str(tmp_path / "o.pkl")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    n = len([k for k in tv.state_dict() if not k.startswith("fc.")])
    assert "official layout" in r.stdout and f"converted {n} tensors" in r.stdout and "projector" in r.stdout


class _Payload:
    """Unpickling it runs code: it writes the marker file (any command could run there)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import builtins

        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.plain
def test_a_checkpoint_that_would_run_code_is_refused_unless_asked(tmp_path):
    marker = tmp_path / "payload_ran"
    src = str(tmp_path / "in.pth")
    torch.save({**tv_resnet(18).state_dict(), "extra": _Payload(marker)}, src)
    env = {k: v for k, v in os.environ.items() if k != "SCRL_D2_UNSAFE_LOAD"}
    r = subprocess.run([sys.executable, CONVERT, src, str(tmp_path / "o.pkl")], capture_output=True, text=True,
                       env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "builtins.exec" in lines[0] and "--unsafe-load" in lines[0] and "nothing was written" in lines[0]
    assert not marker.exists() and not os.path.exists(tmp_path / "o.pkl")
    # asked for explicitly: loaded (the payload runs, as it would have before), with a warning
    r = subprocess.run([sys.executable, CONVERT, "--unsafe-load", src, str(tmp_path / "o.pkl")], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "full unpickling" in r.stderr and "only do it for files from a source you trust" in r.stderr
    assert marker.exists() and os.path.exists(tmp_path / "o.pkl")


@pytest.mark.plain
def test_pkl_files_are_read_without_running_code(tmp_path, monkeypatch):
    """Detectron2 .pkl weights (ours, its model zoo's, Caffe2's Python 2 pickles) load
    through an unpickler that only rebuilds numpy arrays; any other object is refused."""
    import numpy as np

    from scrl_d2.checkpoint import UnsafeCheckpointError, load_weights_file

    monkeypatch.delenv("SCRL_D2_UNSAFE_LOAD", raising=False)
    src = str(tmp_path / "in.pth")
    torch.save(official_checkpoint(tv_resnet(18)), src)
    convert_checkpoint(src, str(tmp_path / "ours.pkl"))
    ours = load_weights_file(str(tmp_path / "ours.pkl"))
    assert ours["__author__"] == "scrl_d2" and ours["model"]["stem.conv1.weight"].shape == (64, 3, 7, 7)
    with open(tmp_path / "caffe2.pkl", "wb") as f:  # protocol 2, as Python 2 wrote them
        pickle.dump({"blobs": {"conv1_w": np.ones((2, 3), np.float32), "conv1_w_momentum": np.zeros(1)}}, f,
                    protocol=2)
    caffe2 = load_weights_file(str(tmp_path / "caffe2.pkl"))
    assert list(caffe2["model"]) == ["conv1_w"] and caffe2["matching_heuristics"] is True
    marker = tmp_path / "payload_ran"
    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": _Payload(marker)}, "__author__": "x"}, f)
    with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        load_weights_file(str(tmp_path / "bad.pkl"))
    assert not marker.exists()
