import json
import os
import re

import pytest
import torch

from conftest import make_image_folder, remove_unless_failed, tiny_opts
from scrl_d2.evaluation import knn_classify, knn_top1
from test_engine import run_cli

LE_FAST = ["LINEAR_EVAL.EPOCHS", "2", "LINEAR_EVAL.WARMUP_EPOCHS", "0", "LINEAR_EVAL.IMS_PER_GPU", "8",
           "LINEAR_EVAL.EVAL_PERIOD", "1"]


def test_knn_on_clustered_features_is_exact():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 5
    labels = torch.arange(5).repeat_interleave(40)
    feats = centers[labels] + 0.1 * torch.randn(200, 16, generator=g)
    test_labels = torch.arange(5).repeat(4)
    test = centers[test_labels] + 0.1 * torch.randn(20, 16, generator=g)
    assert knn_top1((feats, labels), (test, test_labels), 5, k=20) == 100.0


def test_knn_weights_votes_by_similarity():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # one class-0 point, two class-1 points
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.05]])  # nearly on the class-0 point
    # k=3, small T: the single very similar neighbour outweighs two dissimilar ones
    assert knn_classify(train, labels, q, 2, k=3, temperature=0.07).item() == 0
    # a large T makes the vote a plain majority
    assert knn_classify(train, labels, q, 2, k=3, temperature=100.0).item() == 1


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, image_folder, request):
    """A briefly pretrained SCRL checkpoint (ResNet-18, 64 px) and a labelled test split."""
    root = tmp_path_factory.mktemp("le")
    test_dir = make_image_folder(str(root / "test"), n=32, seed=5)
    out = str(root / "pre")
    run_cli(*tiny_opts(f"classes:{image_folder}", out), "LINEAR_EVAL.ENABLED", "False")
    os.remove(os.path.join(out, "checkpoint_1.pth"))  # only the last is used: 135 MB less for the module
    yield {"ckpt": os.path.join(out, "checkpoint_2.pth"), "train": f"classes:{image_folder}",
           "test": f"classes:{test_dir}", "root": str(root)}
    remove_unless_failed(request, root)


def _eval_opts(p, out, weights):
    return [*tiny_opts(p["train"], out), "DATASETS.TEST", f"('{p['test']}',)", "MODEL.WEIGHTS", weights]


def test_linear_eval_learns_above_chance_and_writes_results(pretrained):
    out = os.path.join(pretrained["root"], "le_run")
    r = run_cli("--eval-only", *_eval_opts(pretrained, out, pretrained["ckpt"]), "LINEAR_EVAL.EPOCHS", "30",
                "LINEAR_EVAL.WARMUP_EPOCHS", "2", "LINEAR_EVAL.IMS_PER_GPU", "8", "LINEAR_EVAL.EVAL_PERIOD", "10",
                "LINEAR_EVAL.PRECOMPUTE_FEATURES", "True", "LINEAR_EVAL.OPTIMIZER", "SGD", "LINEAR_EVAL.BASE_LR", "1.0",
                "KNN.PERIOD", "1", "KNN.K", "10", "TEST.RANDOM_BASELINE", "True")
    res = json.load(open(os.path.join(out, "linear_eval", "linear_eval.json")))
    assert res["top1_best"] > 45.0, res  # 4 classes: chance is 25 %
    assert res["protocol"]["train_augmentation"].startswith("none (precomputed-features")
    assert {"top1_last", "top1_best", "best_epoch"} <= set(res) and res["best_epoch"] in (10, 20, 30)
    # TEST.RANDOM_BASELINE: the same k-NN and linear evaluation of a random-init encoder, beside
    knn = re.search(r"k-NN \(k=10, T=0.07\) top-1 on \S+: ([0-9.]+)% \(random init: ([0-9.]+)%\)", r.stdout)
    assert knn, r.stdout[-2000:]
    base = json.load(open(os.path.join(out, "linear_eval_random_init", "linear_eval.json")))
    lines = open(os.path.join(out, "log_result.txt")).read().splitlines()
    assert len(lines) == 2 and "[random init]" in lines[1] and "[random init]" not in lines[0]
    assert f"random-init baseline {base['top1_last']:.2f}%" in r.stdout
    # the baseline is a seeded random encoder's (SEED), not the checkpoint's: recompute it here
    from conftest import tiny_cfg
    from scrl_d2.evaluation import random_encoder, run_knn

    cfg = tiny_cfg(pretrained["train"])
    cfg.merge_from_list(["DATASETS.TEST", f"('{pretrained['test']}',)", "KNN.K", "10"])
    assert f"{run_knn(cfg, random_encoder(cfg), torch.device('cpu'))['knn/top1']:.2f}" == knn.group(2)
    assert random_encoder(cfg).backbone.state_dict()["stem.conv1.weight"].equal(
        random_encoder(cfg).backbone.state_dict()["stem.conv1.weight"])


def _official_and_torchvision(ckpt, root):
    from scrl_d2.checkpoint.layouts import d2_to_torchvision

    model = torch.load(ckpt, weights_only=False)["model"]
    tv = {d2_to_torchvision(k[len("backbone."):]): v for k, v in model.items() if k.startswith("backbone.")}
    inv = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    enc = {f"encoder.{inv[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in tv.items()}
    official = {"epoch": 2, "online_network_state_dict": enc, "target_network_state_dict": enc}
    paths = {"torchvision": os.path.join(root, "tv.pth"), "official": os.path.join(root, "official.pth")}
    torch.save(tv, paths["torchvision"])
    torch.save(official, paths["official"])
    return paths


def test_every_checkpoint_layout_gives_the_same_encoder(pretrained, monkeypatch):
    from conftest import tiny_cfg
    from scrl_d2.evaluation import encoder_from_checkpoint

    paths = {"scrl_d2": pretrained["ckpt"], **_official_and_torchvision(pretrained["ckpt"], pretrained["root"])}
    cfg = tiny_cfg(pretrained["train"])
    states = {k: encoder_from_checkpoint(cfg, p).backbone.state_dict() for k, p in paths.items()}
    for k in ("torchvision", "official"):
        for name, t in states["scrl_d2"].items():
            assert torch.equal(t, states[k][name]), (k, name)
    cfg.MODEL.RESNETS.DEPTH = 50
    with pytest.raises(ValueError, match="ResNet-18"):
        encoder_from_checkpoint(cfg, pretrained["ckpt"])


def test_eval_only_accepts_official_checkpoints_and_resumes(pretrained):
    paths = _official_and_torchvision(pretrained["ckpt"], pretrained["root"])
    out = os.path.join(pretrained["root"], "le_official")
    r = run_cli("--eval-only", *_eval_opts(pretrained, out, paths["official"]), *LE_FAST)
    assert "official layout" in r.stdout
    assert os.path.exists(os.path.join(out, "linear_eval", "checkpoint_2.pth"))
    r = run_cli("--eval-only", *_eval_opts(pretrained, out, paths["official"]), *LE_FAST[2:],
                "LINEAR_EVAL.EPOCHS", "3")
    assert "linear evaluation resumed from" in r.stdout and "at epoch 2" in r.stdout
    res = json.load(open(os.path.join(out, "linear_eval", "linear_eval.json")))
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3]


def test_probe_keeps_its_best_checkpoint_and_linear_eval_follows_pretraining(tmp_path, pretrained):
    out = str(tmp_path / "probe")
    r = run_cli(*tiny_opts(pretrained["train"], out), "MODEL.PROBE.ENABLED", "True", "DATASETS.TEST",
                f"('{pretrained['test']}',)", "TEST.EVAL_PERIOD", "1", *LE_FAST, "KNN.PERIOD", "1", "KNN.K", "5",
                "TEST.RANDOM_BASELINE", "True")
    assert os.path.exists(os.path.join(out, "checkpoint_best.pth")) and "online probe top-1" in r.stdout
    # the k-NN monitor's line of every epoch has the random-init baseline beside it (computed once)
    knn = re.findall(r"epoch (\d+): k-NN \(k=5, T=0.07\) top-1 [0-9.]+% \(random init: ([0-9.]+)%\)", r.stdout)
    assert [e for e, _ in knn] == ["1", "2"] and len({b for _, b in knn}) == 1, r.stdout[-3000:]
    assert os.readlink(os.path.join(out, "checkpoint_last.pth")) == "checkpoint_2.pth"
    best = torch.load(os.path.join(out, "checkpoint_best.pth"), weights_only=False)["trainer"]
    assert best["best_probe"] >= 0
    assert os.path.exists(os.path.join(out, "linear_eval", "linear_eval.json"))


def test_missing_checkpoint_for_eval_only_is_named(tmp_path, pretrained):
    r = run_cli("--eval-only", *_eval_opts(pretrained, str(tmp_path / "x"), "/no/such/ckpt.pth"), check=False)
    assert r.returncode != 0 and "/no/such/ckpt.pth" in r.stderr


def test_linear_eval_with_two_processes(tmp_path, pretrained):
    out = str(tmp_path / "ddp")
    r = run_cli("--num-gpus", "2", "--eval-only", *_eval_opts(pretrained, out, pretrained["ckpt"]), *LE_FAST,
                "LINEAR_EVAL.IMS_PER_GPU", "4")
    assert "rank 0 of 2" in r.stdout
    res = json.load(open(os.path.join(out, "linear_eval", "linear_eval.json")))
    assert res["protocol"]["global_batch"] == 8 and len(res["history"]) == 2
