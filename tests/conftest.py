import importlib.util
import json
import os
import re
import shutil
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


def remove_unless_failed(request, path) -> None:
    """A fixture's teardown for its ``tmp_path_factory`` folder: removed as pytest removes a
    passing test's ``tmp_path`` (pytest.ini: tmp_path_retention_policy = failed), kept when
    a test of the session has failed so far (for the post-mortem) or the policy is "all"."""
    policy = request.config.getini("tmp_path_retention_policy")
    if policy == "none" or (policy == "failed" and not request.session.testsfailed):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory, request) -> str:
    path = tmp_path_factory.mktemp("imgs")
    yield make_image_folder(str(path))
    remove_unless_failed(request, path)


@pytest.fixture(scope="session")
def batch_scale_folder(tmp_path_factory, request) -> str:
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
    yield path
    remove_unless_failed(request, path)


# The shipped pretraining configs shrunk only where it costs time: the shipped ResNet-50
# (bottleneck blocks, depth as shipped) at 1/16 of its width, small heads, 32 px views; the
# batch (256 per process), SyncBN, AMP and the rest stay as shipped. Narrow, not shallow: on a
# CPU without native bf16/fp16 (AVX2 only) autocast's convolutions run ~40x slower than fp32,
# and a full-width ResNet-18 took 12 minutes per 2-step run there.
SHIPPED_TINY = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
                "MODEL.RESNETS.WIDTH_PER_GROUP", "4", "MODEL.RESNETS.STEM_OUT_CHANNELS", "16",
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


# ---------------------------------------------------------------------------- disk footprint
# The disk use under pytest's temporary folder (the basetemp: every tmp_path and
# tmp_path_factory folder), sampled after each test's call (before its teardown removes its
# tmp_path); the terminal summary prints
#   tmp_path footprint: peak <size> (<bytes> bytes) during <nodeid>; left after the session
#     <size> (<bytes> bytes) in <basetemp>                                   (one line)
#   tmp_path footprint: largest tests: <size> <nodeid>, ...    (the 5 largest, each the
#     whole basetemp after that test ran: its tmp_path and the fixtures' folders then)
# No sampling thread: DataLoader workers fork from the pytest process, and a fork while a
# thread runs can leave the child waiting forever on a lock the thread held (seen in CI).
_scandir = os.scandir  # bound now: a test that monkeypatches os.scandir does not change the measurement


def disk_use(root) -> int:
    """Bytes allocated under ``root`` (as ``du``: st_blocks, hard links once, symlinks not followed)."""
    total, seen, stack = 0, set(), [str(root)]
    while stack:
        try:
            it = _scandir(stack.pop())
        except OSError:  # removed meanwhile, or unreadable
            continue
        with it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                    is_dir = e.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if is_dir:
                    stack.append(e.path)
                elif st.st_nlink > 1:
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


class _Footprint:
    def __init__(self, config):
        self.config = config
        self.peak, self.peak_test, self.per_test, self.test = 0, "", {}, ""

    def basetemp(self):
        factory = getattr(self.config, "_tmp_path_factory", None)
        base = getattr(factory, "_basetemp", None)  # None until a test asks for a temporary folder
        if base is not None and hasattr(self.config, "workerinput"):
            # a pytest-xdist worker's folder (<base>/popen-gwN): sample the controller's base,
            # which holds every worker's, so the peak is the disk use of all at once
            base = base.parent
        return base

    def as_dict(self) -> dict:
        base = self.basetemp()
        return {"peak": self.peak, "peak_test": self.peak_test, "per_test": self.per_test,
                "base": str(base) if base is not None else None}

    def sample(self) -> None:
        base = self.basetemp()
        if base is None:
            return
        n = disk_use(base)
        if n > self.peak:
            self.peak, self.peak_test = n, self.test
        if self.test and n > self.per_test.get(self.test, -1):
            self.per_test[self.test] = n


def pytest_configure(config):
    config._scrl_footprint = _Footprint(config)  # in each pytest-xdist worker too (CI runs -n 2)
    config._scrl_worker_footprints = []


def _hand_footprint_to_controller(session) -> None:
    """A pytest-xdist worker hands its footprint to the controller (``workeroutput``)."""
    fp = getattr(session.config, "_scrl_footprint", None)
    if fp is not None and hasattr(session.config, "workeroutput"):
        session.config.workeroutput["scrl_footprint"] = json.dumps(fp.as_dict())


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):  # pytest-xdist, in the controller
    out = getattr(node, "workeroutput", {}).get("scrl_footprint")
    if out:
        node.config._scrl_worker_footprints.append(json.loads(out))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    fp = getattr(item.config, "_scrl_footprint", None)
    if fp is not None:
        fp.test = item.nodeid


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    """After the test's call, before its fixtures' teardown removes their folders."""
    fp = getattr(item.config, "_scrl_footprint", None)
    if fp is not None:
        fp.sample()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    _report_false_skips(terminalreporter)
    fp = getattr(config, "_scrl_footprint", None)
    if fp is None or hasattr(config, "workerinput"):
        return
    # this process's samples, or (under pytest-xdist) every worker's, each taken over the
    # controller's base that holds all workers' folders
    runs = [fp.as_dict(), *config._scrl_worker_footprints]
    bases = [r["base"] for r in runs if r["base"]]
    if not bases:
        terminalreporter.write_line("tmp_path footprint: no temporary folder was used")
        return
    base = os.path.commonpath(bases)
    peak = max(runs, key=lambda r: r["peak"])
    per_test = {t: n for r in runs for t, n in r["per_test"].items()}
    left = disk_use(base) if os.path.isdir(base) else 0
    terminalreporter.write_line(
        f"tmp_path footprint: peak {_human(peak['peak'])} ({peak['peak']} bytes) during "
        f"{peak['peak_test'] or '-'}; left after the session {_human(left)} ({left} bytes) in {base}")
    largest = sorted(per_test.items(), key=lambda kv: -kv[1])[:5]
    if largest:
        terminalreporter.write_line("tmp_path footprint: largest tests: "
                                    + ", ".join(f"{_human(n)} {t}" for t, n in largest))


# ---------------------------------------------------------------------------- optional dependencies
# A test that skips because Detectron2, cityscapesscripts or lvis "is not installed" while it
# is installed fails the session: a broken Detectron2 path must not land green (CI installs
# all three; see docs/detectron2.md, "Tests and CI: both paths"). Skip reasons name the package:
# "<name> is not installed".
_OPTIONAL = {"detectron2": "detectron2", "cityscapesscripts": "cityscapesscripts", "lvis": "lvis"}
_MISSING = re.compile(r"\b(detectron2|cityscapesscripts|lvis) is not installed", re.IGNORECASE)


def _installed(name: str) -> bool:
    """Installed at all: a Detectron2 that is installed but does not import (a broken build,
    which scrl_d2 treats as absent) also fails the session instead of skipping its tests."""
    return importlib.util.find_spec(_OPTIONAL[name]) is not None


def pytest_runtest_logreport(report):
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return
    m = _MISSING.search(str(report.longrepr[2]))
    if m and _installed(m.group(1).lower()):
        _FALSE_SKIPS.append(f"{report.nodeid}: {report.longrepr[2]}")


_FALSE_SKIPS: list = []


def pytest_collection_modifyitems(config, items):
    """A test CI runs only in its plain pass must be in that pass: plain_pass_only needs plain."""
    lost = [i.nodeid for i in items if i.get_closest_marker("plain_pass_only") and not i.get_closest_marker("plain")]
    if lost:
        raise pytest.UsageError(f"marked plain_pass_only but not plain (CI would run them in no pass): {lost}")


def pytest_sessionfinish(session, exitstatus):
    _hand_footprint_to_controller(session)
    if _FALSE_SKIPS:
        session.exitstatus = 1


def _report_false_skips(terminalreporter) -> None:
    for line in _FALSE_SKIPS:
        terminalreporter.write_line(f"error: skipped although installed: {line}", red=True)
