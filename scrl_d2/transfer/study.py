"""The small-scale study: does pretraining with this code transfer, and does SCRL beat BYOL?

    python tools/transfer.py --study small      # 69 minutes on a quiet 2-core machine; resumable

One design per row of ``STUDIES`` (fixed before any result was seen; ``smoke`` is its
miniature, for CI). For a design:

1. the scene set (:mod:`scrl_d2.data.scenes`): unlabelled pretraining scenes, a labelled
   scene-classification split and a label-scarce detection split, from disjoint seeds;
2. BYOL and SCRL pretrained on the unlabelled scenes with the same budget
   (``configs/study/{byol,scrl}_pretrain.yaml``: the release's recipe on a ResNet-18);
3. each pretraining's online encoder, and a randomly initialised one, probed on the
   scene-classification split: linear probe and k-NN top-1 (representation quality);
4. random init, BYOL and SCRL fine-tuned ``trials`` times each
   (``configs/study/faster_rcnn_R18_FPN.yaml``; trial k is SEED k in every arm, so trials are
   paired: same head initialisation and data order) and evaluated with COCO AP;
5. ``table.{md,csv,json}`` and ``figure.png`` (:mod:`.study_report`): mean ± std per arm, the
   paired differences with 95% Student-t intervals, the probes, machine, versions, seeds
   and wall times.

Every step is skipped when complete and resumed otherwise (pretraining and fine-tuning
from their checkpoints), so a rerun of the same command finishes an interrupted study.
"""
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

from ..utils.errors import InputKeyError, InputValueError
from ..utils.fs import atomic_write
from .protocols import CONFIGS_DIR, Protocol
from .suite import RANDOM_INIT, TRAIN_NET, TransferSuite, call_forwarding_signals, timed, wall_time

__all__ = ["StudyDesign", "STUDIES", "Study", "StudyStepFailed", "ARMS", "get_study"]

logger = logging.getLogger("scrl_d2.study")

ARMS = ("random", "byol", "scrl")  # fine-tuning arms; "random" = no pretraining
PAIRS = (("scrl", "random"), ("byol", "random"), ("scrl", "byol"))  # paired differences reported
METRICS = ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm", "bbox/APl")


@dataclass(frozen=True)
class StudyDesign:
    """What a study runs. The configs hold the recipes; these are the study's choices on top."""

    name: str
    scenes: str  # row of scrl_d2.data.scenes.SCENE_SETS
    trials: int  # fine-tuning trials per arm (SEED 1..trials, the same in every arm)
    pretrain_seed: int  # SEED of both pretrainings
    probe_seed: int  # SEED of the probes (and of the random encoder probed)
    pretrain_opts: Tuple[str, ...] = ()  # overrides of both pretraining configs
    finetune_opts: Tuple[str, ...] = ()  # overrides of the fine-tuning config
    probe_opts: Tuple[str, ...] = ()  # overrides of the probes' config

    def pretrain_config(self, arch: str) -> str:
        return os.path.join(CONFIGS_DIR, "study", f"{arch}_pretrain.yaml")

    @property
    def finetune_config(self) -> str:
        return os.path.join(CONFIGS_DIR, "study", "faster_rcnn_R18_FPN.yaml")


# The linear probe: the release's protocol shape (frozen encoder, linear classifier on the
# pooled C5 feature, centre crops) with features extracted once and SGD, as the demo's;
# k-NN: weighted 20-NN (InstDisc's, as the release's monitor).
_PROBE = ("LINEAR_EVAL.ENABLED", "True", "LINEAR_EVAL.PRECOMPUTE_FEATURES", "True", "LINEAR_EVAL.OPTIMIZER", "SGD",
          "LINEAR_EVAL.BASE_LR", "2.0", "LINEAR_EVAL.EPOCHS", "30", "LINEAR_EVAL.WARMUP_EPOCHS", "2",
          "LINEAR_EVAL.IMS_PER_GPU", "64", "LINEAR_EVAL.EVAL_PERIOD", "10", "KNN.K", "20", "KNN.PERIOD", "1",
          "TEST.IMS_PER_GPU", "128")

STUDIES: Dict[str, StudyDesign] = {
    # 2 x 10 epochs of 2048 scenes (ResNet-18, 96 px); 3 arms x 5 trials x 100 iterations
    # at batch 8 on 300 scenes, COCO AP on 400 held-out scenes.
    "small": StudyDesign("small", "small", trials=5, pretrain_seed=0, probe_seed=0, probe_opts=_PROBE),
    # the same steps in miniature (CI's smoke test; its numbers mean nothing)
    "smoke": StudyDesign("smoke", "smoke", trials=2, pretrain_seed=0, probe_seed=0,
                         pretrain_opts=("SOLVER.EPOCHS", "2", "SOLVER.IMS_PER_GPU", "32", "SOLVER.WARMUP_EPOCHS",
                                        "1", "DATALOADER.NUM_WORKERS", "1", "LOG_PERIOD", "1"),
                         finetune_opts=("SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)", "SOLVER.WARMUP_ITERS", "1",
                                        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
                                        "TEST.PRECISE_BN.NUM_ITER", "2", "DATALOADER.NUM_WORKERS", "1",
                                        "LOG_PERIOD", "1", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"),
                         probe_opts=_PROBE + ("LINEAR_EVAL.EPOCHS", "2", "LINEAR_EVAL.WARMUP_EPOCHS", "1",
                                              "LINEAR_EVAL.EVAL_PERIOD", "1", "LINEAR_EVAL.IMS_PER_GPU", "16",
                                              "KNN.K", "5")),
}


def get_study(name: str) -> StudyDesign:
    if name not in STUDIES:
        raise InputKeyError(f"--study {name!r}: unknown; available: {', '.join(STUDIES)}")
    return STUDIES[name]


class StudyStepFailed(RuntimeError):
    """A step of the study failed (not bad input): its log is named."""


def _datasets(design: StudyDesign, *splits: str) -> str:
    return "(" + "".join(f'"scrl_scenes_{design.scenes}_{s}",' for s in splits) + ")"


class Study:
    """Runs one design into ``output_dir`` (see the module docstring for the steps)."""

    def __init__(self, design: StudyDesign, output_dir: str, python: str = sys.executable):
        self.design, self.python = design, python
        self.output_dir = os.path.abspath(output_dir)
        self.protocol = Protocol(
            name=f"study_{design.name}", title=f"Study '{design.name}': Faster R-CNN R18-FPN (SyncBN) on the "
            f"scenes' label-scarce detection split", config="study/faster_rcnn_R18_FPN.yaml", group="beyond",
            metrics=METRICS, family="faster_fpn", trials=design.trials)

    # ------------------------------------------------------------------ paths
    def step_dir(self, *parts: str) -> str:
        return os.path.join(self.output_dir, *parts)

    def pretrain_dir(self, arch: str) -> str:
        return self.step_dir("pretrain", arch)

    def pretrained_checkpoint(self, arch: str) -> str:
        with open(os.path.join(self.pretrain_dir(arch), "done.json")) as f:
            return os.path.join(self.pretrain_dir(arch), json.load(f)["checkpoint"])

    def suite(self) -> TransferSuite:
        weights = {"random": RANDOM_INIT}
        for arch in ("byol", "scrl"):
            weights[arch] = self.pretrained_checkpoint(arch)
        opts = ["DATASETS.TRAIN", _datasets(self.design, "det_train"), "DATASETS.TEST",
                _datasets(self.design, "det_val")] + list(self.design.finetune_opts)
        return TransferSuite(self.output_dir, weights, [self.protocol], trials=self.design.trials, opts=opts,
                             python=self.python)

    def finetune_runs(self):
        """The fine-tuning runs, trial-major (trial 1 of every arm, then trial 2, ...): an
        interrupted study has complete pairs."""
        return sorted(self.suite().runs(), key=lambda r: (r.trial, ARMS.index(r.checkpoint)))

    # ------------------------------------------------------------------ steps
    def run(self) -> List[str]:
        """Every step not yet complete; returns the failed fine-tuning runs (others raise)."""
        self.check_design()
        os.makedirs(self.output_dir, exist_ok=True)
        atomic_write(self.step_dir("design.json"), lambda f: f.write(json.dumps(asdict(self.design), indent=1)),
                     mode="w")
        self.make_data()
        for arch in ("byol", "scrl"):
            self.pretrain(arch)
        for arm in ARMS:
            self.probe(arm)
        return self.finetune()

    def check_design(self) -> None:
        """A folder holds one design's results: another design is refused (results of two
        designs would be mixed), before anything runs."""
        path = self.step_dir("design.json")
        if not os.path.isfile(path):
            return
        with open(path) as f:
            held = json.load(f)
        mine = json.loads(json.dumps(asdict(self.design)))
        if held != mine:
            diff = sorted(k for k in set(held) | set(mine) if held.get(k) != mine.get(k))
            raise InputValueError(f"--output-dir {self.output_dir} holds study {held.get('name')!r} with another "
                                  f"design ({', '.join(diff)} differ); give another --output-dir")

    def make_data(self) -> None:
        from ..data.scenes import ensure_scene_set

        with timed(self.step_dir()):  # the output folder's timing.json: the scene set's generation
            path = ensure_scene_set(self.design.scenes)
        logger.info(f"scene set {self.design.scenes!r}: {path}")

    def pretrain(self, arch: str) -> None:
        d = self.pretrain_dir(arch)
        if os.path.isfile(os.path.join(d, "done.json")):
            return
        os.makedirs(d, exist_ok=True)
        cmd = [self.python, *TRAIN_NET, "--config-file", self.design.pretrain_config(arch), "--resume",
               "OUTPUT_DIR", d, "SEED", str(self.design.pretrain_seed),
               "DATASETS.TRAIN", _datasets(self.design, "pretrain")] + list(self.design.pretrain_opts)
        logger.info(f"pretraining {arch.upper()} (log: {os.path.join(d, 'log.txt')})")
        with open(os.path.join(d, "log.txt"), "a") as log, timed(d):
            rc = call_forwarding_signals(cmd, log, f"the {arch.upper()} pretraining")
        if rc != 0:
            raise StudyStepFailed(f"the {arch.upper()} pretraining failed with exit status {rc}; see "
                                  f"{os.path.join(d, 'log.txt')}")
        from ..checkpoint import Checkpointer
        import torch

        last = Checkpointer(torch.nn.Module(), d, save_to_disk=False).get_checkpoint_file()
        atomic_write(os.path.join(d, "done.json"), lambda f: f.write(json.dumps(
            {"checkpoint": os.path.basename(last), "command": cmd}, indent=1)), mode="w")

    def probe_config(self):
        from ..config import config_from_args

        cfg = config_from_args(self.design.pretrain_config("scrl"), [
            "DATASETS.TRAIN", _datasets(self.design, "cls_train"), "DATASETS.TEST", _datasets(self.design, "cls_val"),
            "SEED", str(self.design.probe_seed)] + list(self.design.probe_opts))
        return cfg

    def probe(self, arm: str) -> Dict[str, float]:
        """Linear probe and k-NN top-1 of ``arm``'s encoder (random: a seeded random init)."""
        d = self.step_dir("probe", arm)
        out = os.path.join(d, "probe.json")
        if os.path.isfile(out):
            with open(out) as f:
                return json.load(f)
        import torch

        from ..evaluation import Encoder, LinearEvaluator, encoder_from_checkpoint, run_knn
        from ..modeling import build_backbone

        cfg = self.probe_config()
        cfg.OUTPUT_DIR = d
        cfg.freeze()
        os.makedirs(d, exist_ok=True)
        with timed(d):
            torch.manual_seed(self.design.probe_seed)
            if arm == "random":
                encoder = Encoder(build_backbone(cfg), cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD,
                                  cfg.MODEL.RESNETS.OUT_FEATURES[-1], cfg.MODEL.CHANNELS_LAST)
            else:
                encoder = encoder_from_checkpoint(cfg, self.pretrained_checkpoint(arm))
            device = torch.device("cpu")
            knn = run_knn(cfg, encoder, device)
            ev = LinearEvaluator(cfg, encoder, device, None)
            ev.resume()
            lin = ev.run()
        res = {"linear_top1": lin["top1_last"], "knn_top1": knn["knn/top1"], "knn_k": cfg.KNN.K,
               "linear_epochs": cfg.LINEAR_EVAL.EPOCHS}
        atomic_write(out, lambda f: f.write(json.dumps(res, indent=1)), mode="w")
        logger.info(f"probe {arm}: linear top-1 {res['linear_top1']:.2f}%, k-NN top-1 {res['knn_top1']:.2f}%")
        return res

    def finetune(self) -> List[str]:
        suite = self.suite()
        suite.convert_weights()
        runs = self.finetune_runs()
        todo = [r for r in runs if not r.complete()]
        if len(todo) < len(runs):
            logger.info(f"{len(runs) - len(todo)} fine-tuning run(s) already complete: skipped")
        failed = []
        for i, run in enumerate(todo, 1):
            if suite.execute_run(run, f"[{i}/{len(todo)}]") == "failed":
                failed.append(f"{run.checkpoint}/trial{run.trial}")
        return failed

    # ------------------------------------------------------------------ results
    def collect(self) -> Dict:
        """Everything the report needs, read from the output folder (complete steps only)."""
        runs = {arm: {} for arm in ARMS}
        curves = {arm: {} for arm in ARMS}
        walls = {arm: 0.0 for arm in ARMS}
        no_detections, incomplete = [], []
        have_pretraining = all(os.path.isfile(os.path.join(self.pretrain_dir(a), "done.json")) for a in ("byol", "scrl"))
        if have_pretraining:
            for r in self.finetune_runs():
                walls[r.checkpoint] += wall_time(r.output_dir)
                if not r.complete():
                    if os.path.isdir(r.output_dir):
                        incomplete.append(f"{r.checkpoint}/trial{r.trial}")
                    continue
                res = r.results()
                if predictions_empty(r.output_dir):
                    res = {**res, **empty_prediction_metrics(self.val_areas(), res)}
                    no_detections.append(f"{r.checkpoint}/trial{r.trial}")
                runs[r.checkpoint][r.trial] = res
                curves[r.checkpoint][r.trial] = read_curve(r.output_dir, "total_loss")
        probes = {}
        for arm in ARMS:
            p = self.step_dir("probe", arm, "probe.json")
            if os.path.isfile(p):
                with open(p) as f:
                    probes[arm] = dict(json.load(f), wall_s=wall_time(os.path.dirname(p)))
        pretrain = {}
        for arch in ("byol", "scrl"):
            d = self.pretrain_dir(arch)
            if os.path.isfile(os.path.join(d, "done.json")):
                pretrain[arch] = {"wall_s": wall_time(d), "curve": read_curve(d, "total_loss")}
        return {"design": asdict(self.design), "runs": runs, "curves": curves, "finetune_wall_s": walls,
                "probes": probes, "pretrain": pretrain, "data_wall_s": wall_time(self.output_dir),
                "no_detections": no_detections, "incomplete": incomplete}

    def val_areas(self) -> List[float]:
        """The areas of the held-out detection split's objects."""
        from ..data.scenes import ensure_scene_set

        with open(os.path.join(ensure_scene_set(self.design.scenes), "annotations", "det_val.json")) as f:
            return [a["area"] for a in json.load(f)["annotations"] if not a.get("iscrowd", 0)]


# COCO's area ranges (pycocotools' COCOeval.Params.areaRng)
_AREAS = {"APs": (0, 32 ** 2), "APm": (32 ** 2, 96 ** 2), "APl": (96 ** 2, 1e10)}


def predictions_empty(run_dir: str) -> bool:
    """Whether the run's final evaluation had no prediction at all (its
    ``coco_instances_results.json``, written by both fine-tuning paths, is an empty list)."""
    for dirpath, _, files in os.walk(run_dir):
        if "coco_instances_results.json" in files:
            with open(os.path.join(dirpath, "coco_instances_results.json")) as f:
                return json.load(f) == []
    return False


def empty_prediction_metrics(areas: List[float], res: Dict[str, float]) -> Dict[str, float]:
    """COCO AP of no prediction at all: 0 wherever the split has objects (what pycocotools
    computes: recall 0), NaN where it has none. Detectron2 and our evaluator report NaN for
    every metric instead ("no predictions"), which would drop the trial from its arm."""
    out = {}
    for m in METRICS:
        name = m.split("/")[1]
        if not math.isnan(res.get(m, float("nan"))):
            continue
        lo, hi = _AREAS.get(name, (0, 1e10))
        out[m] = 0.0 if any(lo <= a < hi for a in areas) else float("nan")
    return out


def read_curve(run_dir: str, key: str) -> List[Tuple[int, float]]:
    """``(iteration, value)`` of ``key`` in a run's metrics.json (Detectron2's JSON lines)."""
    out: Dict[int, float] = {}
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if key in rec and "iteration" in rec:
                out[int(rec["iteration"])] = float(rec[key])  # a resumed run rewrites: the last value wins
    return sorted(out.items())
