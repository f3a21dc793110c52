"""Transfer suite: fine-tune and evaluate pretrained backbones on downstream protocols and
tabulate the results (mean ± std over trials) beside the published numbers.

    python tools/transfer.py --list
    python tools/transfer.py --output-dir output/transfer --num-gpus 8 \
        --weights scrl200=output/scrl_200ep/checkpoint_last.pth --weights byol200=byol_200ep.pth \
        --weights random=random --protocols coco_faster_rcnn_R50_FPN_1x,voc0712_faster_rcnn_R50_FPN
    python tools/transfer.py ... --launcher print          # only the commands
    python tools/transfer.py ... --launcher slurm --slurm-args "--nodes 1 --partition learnlab"
    python tools/transfer.py --output-dir output/transfer --table-only ...   # tabulate what is done
    python tools/transfer.py --preset demo                  # CPU, generated data, minutes
    python tools/transfer.py --study small                  # the small-scale study (CPU, ~70 min)

Checkpoints: ours, the official release's, torchvision's (converted once to Detectron2's
.pkl under OUTPUT/weights/), or a Detectron2 .pkl (used as is); ``random`` = no pretraining.
A rerun skips complete runs and resumes the others. Extra KEY VALUE pairs after ``--``
override every run's config. Exit status: 0 all complete, 1 some run failed, 2 bad input.
"""
import argparse
import logging
import os
import shlex
import sys

from scrl_d2.engine.defaults import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED
from scrl_d2.transfer.miniature import make_miniature, miniature_formats
from scrl_d2.transfer.presets import PRESETS, get_preset
from scrl_d2.transfer.protocols import GROUPS, PROTOCOLS, get_protocol
from scrl_d2.transfer.suite import Interrupted, TransferSuite, check_backends, stop_signals_interrupt
from scrl_d2.utils.errors import InputValueError, is_bad_input


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="", help="suite folder (default output/transfer, demo: output/transfer_demo)")
    p.add_argument("--weights", action="append", default=[], metavar="NAME=PATH",
                   help="a pretrained checkpoint (repeat); PATH 'random' = random initialisation")
    p.add_argument("--protocols", default="", help="comma-separated protocol names, or a group: "
                   + ", ".join(GROUPS))
    p.add_argument("--trials", type=int, default=None, help="trials per (checkpoint, protocol); default: the "
                   "protocol's (VOC and COCO subsets 5, else 1)")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs per run")
    p.add_argument("--launcher", default="local", choices=["local", "torchrun", "slurm", "print"])
    p.add_argument("--slurm-args", default="", help="arguments for tools/submit_slurm.py, e.g. '--nodes 1 "
                   "--gpus-per-node 8 --partition P'")
    p.add_argument("--miniature", default="", metavar="ROOT", help="run on generated miniature datasets under "
                   "ROOT (ResNet-18, small images, few iterations): a check of the pipeline, not a result")
    p.add_argument("--table-only", action="store_true", help="write the table of what is complete; run nothing")
    p.add_argument("--preset", choices=list(PRESETS), help="; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()))
    p.add_argument("--study", metavar="NAME", help="run a study (random init vs BYOL vs SCRL, pretraining "
                   "included, paired trials, 95%% intervals): 'small' (CPU, ~70 min) or 'smoke' (its miniature); "
                   "default --output-dir output/study_NAME")
    p.add_argument("--list", action="store_true", help="list the protocols and exit")
    p.add_argument("opts", nargs="*", help="KEY VALUE config overrides for every run (after --)")
    return p


def list_protocols() -> None:
    for group, title in GROUPS.items():
        print(f"{title}:")
        for p in PROTOCOLS.values():
            if p.group == group:
                backends = "" if len(p.backends) == 2 else f"  [{'/'.join(p.backends)} only]"
                print(f"  {p.name:45s} {p.title}; configs/{p.config}; {p.trials} trial(s); "
                      f"~{p.gpu_hours():.1f} h on 8 V100s{backends}")


def select_protocols(spec: str):
    names = [s.strip() for s in spec.split(",") if s.strip()]
    out = []
    for n in names:
        out += [p for p in PROTOCOLS.values() if p.group == n] if n in GROUPS else [get_protocol(n)]
    return out


def parse_weights(items):
    out = {}
    for item in items:
        if "=" not in item:
            raise InputValueError(f"--weights {item!r}: expected NAME=PATH (PATH 'random' for random initialisation)")
        name, path = item.split("=", 1)
        if name in out:
            raise InputValueError(f"--weights: the name {name!r} is given twice")
        out[name] = path
    return out


def run_study(args) -> None:
    from scrl_d2.backend import backend_name
    from scrl_d2.transfer.study import Study, StudyStepFailed, get_study
    from scrl_d2.transfer.study_report import write_report

    try:
        others = [flag for flag, given in (("--weights", args.weights), ("--protocols", args.protocols),
                                           ("--preset", args.preset), ("--miniature", args.miniature),
                                           ("--trials", args.trials is not None), ("KEY VALUE overrides", args.opts),
                                           ("--launcher", args.launcher != "local"),
                                           ("--num-gpus", args.num_gpus != 1), ("--slurm-args", args.slurm_args))
                  if given]
        if others:
            raise InputValueError(f"--study {args.study}: {', '.join(others)} cannot be combined with a study "
                                  "(its design is fixed; see scrl_d2/transfer/study.py)")
        study = Study(get_study(args.study), args.output_dir or os.path.join("output", f"study_{args.study}"))
        study.check_design()
        with stop_signals_interrupt("the study's in-process steps (scenes, probes)"):
            failed = [] if args.table_only else study.run()
        with stop_signals_interrupt("the report"):
            md = write_report(study.collect(), study.output_dir, backend_name())
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except StudyStepFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except Exception as e:
        if not is_bad_input(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    print("\n" + md)
    print(f"written to {os.path.join(study.output_dir, 'table.md')} (and .csv, .json, figure.png)")
    if failed:
        print(f"{len(failed)} fine-tuning run(s) failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(EXIT_FAILED)


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.list:
        list_protocols()
        return
    if args.study:
        run_study(args)
        return
    try:
        if args.preset:
            preset = get_preset(args.preset)
            out = os.path.abspath(args.output_dir or preset.default_output)
            protocols = select_protocols(args.protocols) if args.protocols else [get_protocol(n) for n in
                                                                                 preset.protocols]
            if not args.table_only and args.launcher in ("local", "torchrun"):
                check_backends(protocols)  # before the demo pretraining and the miniature data
            formats = sorted({f for p in protocols for f in miniature_formats(p)})
            mini = make_miniature(args.miniature or os.path.join(out, "datasets"), formats) if preset.miniature else ""
            weights = parse_weights(args.weights) if args.weights else preset.weights(out)
            suite = TransferSuite(out, weights, protocols, trials=args.trials, max_trials=preset.max_trials,
                                  launcher=args.launcher, miniature_root=mini, opts=list(preset.opts) + args.opts)
        else:
            protocols = select_protocols(args.protocols)
            if not args.table_only and args.launcher in ("local", "torchrun"):
                check_backends(protocols)  # before the miniature data
            mini = ""
            if args.miniature:
                formats = sorted({f for p in protocols for f in miniature_formats(p)})
                mini = make_miniature(os.path.abspath(args.miniature), formats)
            suite = TransferSuite(args.output_dir or os.path.join("output", "transfer"), parse_weights(args.weights),
                                  protocols, trials=args.trials, num_gpus=args.num_gpus, launcher=args.launcher,
                                  miniature_root=mini, opts=args.opts, slurm_args=shlex.split(args.slurm_args))
    except Interrupted as e:  # during the preset's pretraining
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:
        if not is_bad_input(e):  # only what the project diagnosed; anything else keeps its traceback
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    failed = []
    if not args.table_only:
        try:
            state = suite.execute()
        except Interrupted as e:
            print(f"stopped: {e}", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        failed = state["failed"]
        if args.launcher == "print":
            return
    md = suite.write_table()
    print("\n" + md)
    print(f"written to {os.path.join(suite.output_dir, 'table.md')} (and .csv, .json)")
    if args.miniature or args.preset:
        print("miniature runs (ResNet-18, small images, a few iterations on generated data): these numbers check "
              "the pipeline end to end; they are not results")
    if failed:
        print(f"{len(failed)} run(s) failed: " + ", ".join(f"{r.protocol.name}/{r.checkpoint}/trial{r.trial}"
                                                          for r in failed), file=sys.stderr)
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
