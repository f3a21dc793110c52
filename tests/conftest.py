import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from scrl_d2.config import get_cfg  # noqa: E402
from scrl_d2.data.demo import render_demo_image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_image_folder(path: str, n: int = 48, seed: int = 0, classes: bool = True) -> str:
    rng = np.random.default_rng(seed)
    for i in range(n):
        img, label = render_demo_image(rng)
        d = os.path.join(path, f"c{label}") if classes else path
        os.makedirs(d, exist_ok=True)
        img.save(os.path.join(d, f"{i:04d}.jpg"), quality=90)
    return path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> str:
    return make_image_folder(str(tmp_path_factory.mktemp("imgs")))


@pytest.fixture(scope="session")
def batch_scale_folder(tmp_path_factory) -> str:
    """544 small JPEGs (random sizes, 40-64 px): two processes x the shipped 256 images
    per process, with tiny images so a real-batch step stays within seconds on CPU."""
    from PIL import Image

    path = str(tmp_path_factory.mktemp("imgs544"))
    rng = np.random.default_rng(0)
    for i in range(544):
        h, w = rng.integers(40, 65, 2)
        blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(blocks).resize((int(w), int(h)), Image.BILINEAR)
        img.save(os.path.join(path, f"{i:04d}.jpg"), quality=85)
    return path


# The shipped pretraining configs shrunk only where it costs time: ResNet-18, small heads,
# 32 px views; the batch (256 per process), SyncBN, AMP and the rest stay as shipped.
SHIPPED_TINY = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                "MODEL.BYOL.PROJECTOR_HIDDEN_DIM", "64", "MODEL.BYOL.PROJECTION_DIM", "32",
                "MODEL.BYOL.PREDICTOR_HIDDEN_DIM", "64", "MODEL.SCRL.MIN_SIZE", "8", "INPUT.CROP_SIZE", "32",
                "DATALOADER.NUM_WORKERS", "1", "MODEL.CHANNELS_LAST", "False", "SEED", "3"]


def flat_items(node, prefix: str = ""):
    """``(dotted key, value)`` of every leaf of a config."""
    for k, v in node.items():
        if isinstance(v, dict):
            yield from flat_items(v, prefix + k + ".")
        else:
            yield prefix + k, v


def cfg_at(node, key: str):
    """The value at a dotted key, or ``KeyError`` (the class) when a part is missing."""
    for part in key.split("."):
        if part not in node:
            return KeyError
        node = node[part]
    return node


def tiny_cfg(train: str, arch: str = "SCRL", out: str = ""):
    """ResNet-18 at 64 px, small heads, CPU: a step takes a fraction of a second."""
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", arch, "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18",
        "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.BYOL.PROJECTOR_HIDDEN_DIM", "64",
        "MODEL.BYOL.PROJECTION_DIM", "32", "MODEL.BYOL.PREDICTOR_HIDDEN_DIM", "64", "MODEL.SCRL.MIN_SIZE", "16",
        "INPUT.CROP_SIZE", "64", "DATASETS.TRAIN", f"('{train}',)", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_GPU", "8", "SOLVER.EPOCHS", "2", "SOLVER.WARMUP_EPOCHS", "1", "SOLVER.AMP.ENABLED", "False",
        "SOLVER.SNAPSHOT_INTERVAL", "1", "LOG_PERIOD", "1", "SEED", "7", "OUTPUT_DIR", out,
        "MODEL.CHANNELS_LAST", "False",
    ])
    return cfg


def tiny_opts(train: str, out: str, arch: str = "SCRL"):
    """The same tiny config as command-line overrides."""
    cfg = tiny_cfg(train, arch, out)
    keys = ["MODEL.META_ARCHITECTURE", "MODEL.DEVICE", "MODEL.RESNETS.DEPTH", "MODEL.RESNETS.RES2_OUT_CHANNELS",
            "MODEL.BYOL.PROJECTOR_HIDDEN_DIM", "MODEL.BYOL.PROJECTION_DIM", "MODEL.BYOL.PREDICTOR_HIDDEN_DIM",
            "MODEL.SCRL.MIN_SIZE", "INPUT.CROP_SIZE", "DATASETS.TRAIN", "DATALOADER.NUM_WORKERS",
            "SOLVER.IMS_PER_GPU", "SOLVER.EPOCHS", "SOLVER.WARMUP_EPOCHS", "SOLVER.AMP.ENABLED",
            "SOLVER.SNAPSHOT_INTERVAL", "LOG_PERIOD", "SEED", "OUTPUT_DIR", "MODEL.CHANNELS_LAST"]
    opts = []
    for k in keys:
        v = cfg
        for part in k.split("."):
            v = v[part]
        opts += [k, repr(v) if isinstance(v, (tuple, str)) and k != "OUTPUT_DIR" and k != "MODEL.DEVICE"
                 and k != "MODEL.META_ARCHITECTURE" else str(v)]
    return opts
