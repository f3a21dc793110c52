"""The device data path (INPUT.AUGMENT_DEVICE device), run here on the CPU: same
parameters and box pairs as the PIL path, nearly the same pixels."""
import numpy as np
import pytest
import torch
from conftest import remove_unless_failed, tiny_cfg
from PIL import Image

from scrl_d2.data import DatasetCatalog, PretrainDataset, TwoViewAugmentation
from scrl_d2.data.boxes import BoxPairGenerator
from scrl_d2.data.datasets import PretrainCollate
from scrl_d2.data.gpu_augment import BatchedAugmentation

OFF = ["INPUT.COLOR_JITTER_PROB", "0.0", "INPUT.GRAYSCALE_PROB", "0.0", "INPUT.BLUR_PROB", "(0.0, 0.0)",
       "INPUT.SOLARIZE_PROB", "(0.0, 0.0)"]


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory, request):
    d = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(6):
        arr = np.stack([(xx * (i + 1) // 3) % 256, (yy * 2) % 256, ((xx + yy) // (i + 2)) % 256], -1)
        arr = (arr * 0.6 + rng.integers(0, 100, arr.shape)).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{i}.jpg", quality=92)
    Image.fromarray(arr[:200, :300]).save(d / "png_one.png")  # not a JPEG: decoded by the worker
    yield d
    remove_unless_failed(request, d)


def both_paths(folder, opts, n=7):
    cfg = tiny_cfg(f"images:{folder}")
    cfg.merge_from_list(["INPUT.CROP_SIZE", "96"] + opts)
    dicts = DatasetCatalog.get(f"images:{folder}")
    aug, gen = TwoViewAugmentation.from_config(cfg), BoxPairGenerator.from_config(cfg)
    keys = [(i % len(dicts), 7 + i) for i in range(n)]
    cpu = PretrainCollate(gen)([PretrainDataset(dicts, aug, jpeg_draft=False)[k] for k in keys])
    dev = PretrainCollate(gen)([PretrainDataset(dicts, aug, decode_on_device=True)[k] for k in keys])
    return cpu, BatchedAugmentation(aug, "cpu")(dev)


@pytest.mark.parametrize("opts", [
    OFF,  # geometry only
    OFF[:4] + ["INPUT.BLUR_PROB", "(0.0, 0.0)", "INPUT.SOLARIZE_PROB", "(1.0, 1.0)", "INPUT.GRAYSCALE_PROB", "1.0"],
    OFF[2:] + ["INPUT.COLOR_JITTER_PROB", "1.0"],
    OFF[:4] + ["INPUT.SOLARIZE_PROB", "(0.0, 0.0)", "INPUT.BLUR_PROB", "(1.0, 1.0)"],
    OFF[:4] + ["INPUT.SOLARIZE_PROB", "(0.0, 0.0)", "INPUT.BLUR_PROB", "(1.0, 1.0)", "INPUT.BLUR_TYPE", "gaussian"],
], ids=["geometry", "gray+solarize", "jitter", "resize-blur", "gaussian-blur"])
def test_device_path_renders_the_same_views(jpeg_folder, opts):
    cpu, dev = both_paths(jpeg_folder, opts)
    for k in ("geom1", "geom2", "boxes1", "boxes2", "box_valid", "pair_index", "label"):
        assert torch.equal(cpu[k], dev[k]), k  # same draws: same crops, flips and box pairs
    for v in ("view1", "view2"):
        assert dev[v].dtype == torch.uint8 and dev[v].shape == cpu[v].shape
        diff = (cpu[v].float() - dev[v].float()).abs()
        # bilinear/area resampling and another JPEG decoder instead of PIL's bicubic
        assert diff.mean() < 3.0 and diff.flatten().quantile(0.99) <= 16, (v, diff.mean())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_device_path_is_float32_inside_autocast(jpeg_folder, dtype):
    """Called from mixed-precision code, the crops (rectangles and batch indices through
    RoIAlign) and every pixel are still those of the float32 rendering."""
    cfg = tiny_cfg(f"images:{jpeg_folder}")
    cfg.merge_from_list(["INPUT.CROP_SIZE", "96", "INPUT.BLUR_TYPE", "gaussian"])
    dicts = DatasetCatalog.get(f"images:{jpeg_folder}")
    aug, gen = TwoViewAugmentation.from_config(cfg), BoxPairGenerator.from_config(cfg)
    keys = [(i % len(dicts), 3 + i) for i in range(7)]

    def render():
        batch = PretrainCollate(gen)([PretrainDataset(dicts, aug, decode_on_device=True)[k] for k in keys])
        return BatchedAugmentation(aug, "cpu")(batch)

    plain = render()
    with torch.autocast("cpu", dtype=dtype):
        mixed = render()
    for k in ("view1", "view2"):
        assert torch.equal(plain[k], mixed[k]), k


def test_flip_on_the_device_mirrors_the_crop(jpeg_folder):
    cpu, dev = both_paths(jpeg_folder, OFF)
    flipped = dev["geom1"][:, 4] > 0.5
    assert flipped.any() and (~flipped).any()
    # a wrong flip would differ by far more than resampling does
    for i in np.flatnonzero(flipped.numpy()):
        same = (cpu["view1"][i].float() - dev["view1"][i].float()).abs().mean()
        mirrored = (cpu["view1"][i].float() - dev["view1"][i].flip(-1).float()).abs().mean()
        assert same < mirrored / 2


def test_undecodable_file_is_replaced_counted_and_named(jpeg_folder, tmp_path, caplog):
    import shutil

    for f in jpeg_folder.iterdir():
        shutil.copy(f, tmp_path / f.name)
    good = (tmp_path / "0.jpg").read_bytes()
    (tmp_path / "bad.jpg").write_bytes(good[:200] + bytes(2000))  # header parses, data does not decode
    cfg = tiny_cfg(f"images:{tmp_path}")
    dicts = DatasetCatalog.get(f"images:{tmp_path}")
    bad = next(i for i, d in enumerate(dicts) if d["file_name"].endswith("bad.jpg"))
    aug = TwoViewAugmentation.from_config(cfg)
    ds = PretrainDataset(dicts, aug, decode_on_device=True)
    batch = PretrainCollate(BoxPairGenerator.from_config(cfg))([ds[(i, i)] for i in range(len(dicts))])
    with caplog.at_level("WARNING", logger="scrl_d2.data"):
        out = BatchedAugmentation(aug, "cpu")(batch)
    assert "bad.jpg" in caplog.text  # the warning names the file
    assert out["view1"].shape[0] == len(dicts)  # the batch keeps its size
    assert int(out["skipped"][bad]) == 1 and int(out["skipped"].sum()) == 1
    np.testing.assert_array_equal(out["pair_index"].numpy(), np.flatnonzero(out["box_valid"].numpy().ravel()))
