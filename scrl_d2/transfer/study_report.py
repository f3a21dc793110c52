"""The study's report: statistics over paired trials, ``table.{md,csv,json}``, ``figure.png``.

Per arm: mean ± sample std over trials and the 95% Student-t interval of the mean. Per pair
of arms: the mean of the per-trial differences (trial k of one arm minus trial k of the
other: same SEED, so same data order and head initialisation) with its 95% Student-t
interval (n - 1 degrees of freedom). An interval that excludes 0 is a difference the
fine-tuning trials resolve; one that includes 0 is not. What the intervals do not cover: each
method is pretrained once (one pretraining seed), so they compare these two pretrained
checkpoints, not the methods over pretraining seeds; and they are per comparison (3 pairs x 6
metrics, no correction for multiple comparisons).
"""
import csv
import io
import math
import os
import platform
from typing import Dict, Optional, Sequence

from ..utils.fs import atomic_write, checkout_root, finite_json
from .study import ARMS, METRICS, PAIRS
from .suite import mean_std

__all__ = ["t_interval", "summarize", "write_report"]


def t_interval(values: Sequence[float], level: float = 0.95) -> Dict[str, float]:
    """Mean, sample std and the Student-t interval of the mean of ``values`` (NaN where
    fewer than 2 values or any value is missing)."""
    from scipy import stats

    n = len(values)
    nan = float("nan")
    if n == 0 or any(v is None or not math.isfinite(v) for v in values):
        return {"mean": nan, "std": nan, "lo": nan, "hi": nan, "n": n}
    mean, std = mean_std(values)
    if n < 2:
        return {"mean": mean, "std": nan, "lo": nan, "hi": nan, "n": n}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "lo": mean - half, "hi": mean + half, "n": n}


def summarize(collected: Dict) -> Dict:
    """Per-arm statistics and paired differences over the trials every arm completed."""
    runs = collected["runs"]
    paired = sorted(set.intersection(*(set(runs[a]) for a in ARMS))) if all(runs[a] for a in ARMS) else []
    arms = {}
    for arm in ARMS:
        trials = sorted(runs[arm])
        arms[arm] = {"trials": trials, "metrics": {m: dict(t_interval([runs[arm][t].get(m, float("nan"))
                                                                       for t in trials]),
                                                            values=[runs[arm][t].get(m) for t in trials])
                                                   for m in METRICS}}
    pairs = []
    for a, b in PAIRS:
        cells = {}
        for m in METRICS:
            diffs = [runs[a][t].get(m, float("nan")) - runs[b][t].get(m, float("nan")) for t in paired]
            cells[m] = dict(t_interval(diffs), values=diffs)
        pairs.append({"pair": f"{a} - {b}", "a": a, "b": b, "trials": paired, "metrics": cells})
    return {"arms": arms, "pairs": pairs}


def environment(backend: str) -> Dict[str, str]:
    import numpy
    import torch
    import torchvision

    import matplotlib
    import scipy

    env = {"machine": platform.machine(), "cpu": _cpu_model(), "cores": str(os.cpu_count()),
           "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "numpy": numpy.__version__, "scipy": scipy.__version__,
           "matplotlib": matplotlib.__version__, "scrl_d2": _commit(), "backend": backend}
    if backend == "detectron2":
        import detectron2

        env["detectron2"] = detectron2.__version__
    return env


def _commit() -> str:
    """The checkout's git commit (``+dirty`` with uncommitted changes to tracked files)."""
    import subprocess

    root = checkout_root()
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=30)
        if head.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _pm(c: Dict, digits: int = 2) -> str:
    if c["n"] == 0:
        return "—"
    if not math.isfinite(c["mean"]):
        return "n/a"
    return f"{c['mean']:.{digits}f} ± {c['std']:.{digits}f}" if math.isfinite(c["std"]) else f"{c['mean']:.{digits}f}"


def _ci(c: Dict) -> str:
    if c["n"] == 0:
        return "—"
    if not math.isfinite(c["mean"]):
        return "n/a"
    if not math.isfinite(c["lo"]):
        return f"{c['mean']:+.2f}"
    return f"{c['mean']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}]"


def _minutes(s: float) -> str:
    return f"{s / 60:.1f} min"


def markdown(report: Dict) -> str:
    d, s, env = report["design"], report["summary"], report["environment"]
    names = [m.split("/")[1] for m in METRICS]
    out = io.StringIO()
    out.write(f"### Study '{d['name']}': random init vs BYOL vs SCRL, COCO box AP on the scenes' held-out "
              f"detection split\n\n")
    out.write(f"{d['trials']} fine-tuning trials per arm (SEED 1..{d['trials']}, paired across arms); "
              "mean ± sample std over trials.\n\n")
    out.write("| arm | " + " | ".join(names) + " | trials |\n|" + "---|" * (len(names) + 2) + "\n")
    for arm in ARMS:
        a = s["arms"][arm]
        out.write(f"| {arm} | " + " | ".join(_pm(a["metrics"][m]) for m in METRICS) + f" | {len(a['trials'])} |\n")
    out.write("\nPaired differences (mean over trials of arm a's trial k minus arm b's trial k) "
              "with 95% Student-t intervals:\n\n")
    out.write("| a - b | " + " | ".join(names) + " |\n|" + "---|" * (len(names) + 1) + "\n")
    for p in s["pairs"]:
        out.write(f"| {p['pair']} | " + " | ".join(_ci(p["metrics"][m]) for m in METRICS) + " |\n")
    probes = report["probes"]
    out.write("\nRepresentation quality on the scene-classification split (top-1 %, labels = the class of "
              "each scene's largest object; random = a randomly initialised encoder):\n\n")
    out.write("| encoder | linear probe | k-NN |\n|---|---|---|\n")
    for arm in ARMS:
        p = probes.get(arm)
        out.write(f"| {arm} | {p['linear_top1']:.2f} | {p['knn_top1']:.2f} |\n" if p else f"| {arm} | — | — |\n")
    if report["no_detections"]:
        out.write("\nRuns whose final evaluation had no prediction at all (COCO AP 0 where the split has "
                  "objects, as pycocotools computes it): " + ", ".join(report["no_detections"]) + ".\n")
    if report["incomplete"]:
        out.write("\nRuns started but not complete (failed or interrupted; not in the statistics): "
                  + ", ".join(report["incomplete"]) + ".\n")
    w = report["wall_s"]
    out.write("\nWall time: " + ", ".join(f"{k} {_minutes(v)}" for k, v in w.items()) + ".\n\n")
    out.write("Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".\n")
    return out.getvalue()


def _csv(report: Dict) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["section", "row", "metric", "mean", "std", "ci95_lo", "ci95_hi", "n"])
    f = lambda v: "" if v is None or not math.isfinite(v) else f"{v:.4f}"  # noqa: E731
    for arm, a in report["summary"]["arms"].items():
        for m, c in a["metrics"].items():
            w.writerow(["arm", arm, m, f(c["mean"]), f(c["std"]), f(c["lo"]), f(c["hi"]), c["n"]])
    for p in report["summary"]["pairs"]:
        for m, c in p["metrics"].items():
            w.writerow(["paired_difference", p["pair"], m, f(c["mean"]), f(c["std"]), f(c["lo"]), f(c["hi"]), c["n"]])
    for arm, p in report["probes"].items():
        w.writerow(["probe", arm, "linear_top1", f(p["linear_top1"]), "", "", "", 1])
        w.writerow(["probe", arm, "knn_top1", f(p["knn_top1"]), "", "", "", 1])
    return out.getvalue()


def figure(report: Dict, collected: Dict, path: str) -> None:
    """AP / AP50 / AP75 per arm (mean, 95% interval, each trial) and the learning curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"random": "#7f7f7f", "byol": "#1f77b4", "scrl": "#d62728"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    shown = METRICS[:3]
    width = 0.26
    for i, arm in enumerate(ARMS):
        a = report["summary"]["arms"][arm]["metrics"]
        for j, m in enumerate(shown):
            c = a[m]
            x = j + (i - 1) * width
            if c["n"] == 0 or not math.isfinite(c["mean"]):
                continue
            err = [[c["mean"] - c["lo"]], [c["hi"] - c["mean"]]] if math.isfinite(c["lo"]) else None
            ax.bar(x, c["mean"], width * 0.9, color=colors[arm], alpha=0.75, yerr=err, capsize=3,
                   label=arm if j == 0 else None)
            ax.scatter([x] * len(c["values"]), c["values"], s=9, color="black", zorder=3)
    ax.set_xticks(range(len(shown)), [m.split("/")[1] for m in shown])
    ax.set_ylabel("COCO box AP (%)")
    ax.set_title("Fine-tuned detection (mean, 95% CI, trials)")
    _legend(ax)
    ax = axes[1]
    for arm in ARMS:
        curves = [c for c in collected["curves"][arm].values() if c]
        if not curves:
            continue
        its = sorted(set.intersection(*(set(i for i, _ in c) for c in curves)))
        mean = [sum(dict(c)[i] for c in curves) / len(curves) for i in its]
        ax.plot(its, mean, color=colors[arm], label=f"{arm} (mean of {len(curves)})")
    ax.set_xlabel("fine-tuning iteration")
    ax.set_ylabel("total loss")
    ax.set_title("Fine-tuning learning curves")
    _legend(ax)
    ax = axes[2]
    for arch, p in collected["pretrain"].items():
        if p["curve"]:
            ax.plot(*zip(*p["curve"]), color=colors[arch], label=arch.upper())
    ax.set_xlabel("pretraining iteration")
    ax.set_ylabel("BYOL loss (SCRL: over box pairs)")
    ax.set_title("Pretraining")
    _legend(ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def write_report(collected: Dict, output_dir: str, backend: str, figure_path: Optional[str] = None) -> str:
    """Write table.md / table.csv / table.json / figure.png; returns the markdown."""
    walls = {"scene generation": collected["data_wall_s"]}
    walls.update({f"{k.upper()} pretraining": v["wall_s"] for k, v in collected["pretrain"].items()})
    walls["probes"] = sum(p["wall_s"] for p in collected["probes"].values())
    walls.update({f"fine-tuning {arm}": v for arm, v in collected["finetune_wall_s"].items()})
    walls["total"] = sum(walls.values())
    report = {"design": collected["design"], "summary": summarize(collected), "probes":
              {k: {kk: vv for kk, vv in v.items()} for k, v in collected["probes"].items()},
              "per_trial": collected["runs"], "wall_s": walls, "environment": environment(backend),
              "no_detections": collected["no_detections"], "incomplete": collected["incomplete"]}
    md = markdown(report)
    atomic_write(os.path.join(output_dir, "table.md"), lambda f: f.write(md), mode="w")
    atomic_write(os.path.join(output_dir, "table.csv"), lambda f: f.write(_csv(report)), mode="w")
    atomic_write(os.path.join(output_dir, "table.json"),
                 lambda f: f.write(finite_json(report)), mode="w")
    figure(report, collected, figure_path or os.path.join(output_dir, "figure.png"))
    return md


