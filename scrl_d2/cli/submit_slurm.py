"""Submit pretraining, linear evaluation or detection fine-tuning to SLURM with submitit.

    python tools/submit_slurm.py --config-file configs/scrl_pretrain.yaml --nodes 4 --gpus-per-node 8 \
        --partition learnlab --time 4320 OUTPUT_DIR /checkpoint/$USER/scrl_200ep
    python tools/submit_slurm.py --config-file configs/scrl_pretrain.yaml --nodes 4 --dry-run

One task per GPU; each runs tools/train_net.py with these arguments, distributed from the
SLURM environment. Before a time limit or on preemption the job checkpoints after its
current step and is requeued; the requeued job resumes. See docs/clusters.md.
"""
import os
import sys

from scrl_d2.config import check_config, config_from_args
from scrl_d2.engine.defaults import EXIT_BAD_INPUT, resolve_output_dir
from scrl_d2.engine.slurm import submit, submit_argument_parser
from scrl_d2.utils.errors import InputValueError, is_bad_input


def main(argv=None) -> None:
    args = submit_argument_parser().parse_args(argv)
    try:
        cfg = config_from_args(args.config_file, args.opts)
        check_config(cfg)
        for name in ("nodes", "gpus_per_node", "cpus_per_task", "time"):
            if getattr(args, name) < 1:
                raise InputValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected 1 or more")
        # fixed now (absolute: tasks may start elsewhere), so that a requeued job resumes it
        output_dir = os.path.abspath(resolve_output_dir(cfg, args.config_file, args.resume))
        code = submit(args, output_dir)
    except Exception as e:
        if not is_bad_input(e):  # a bug or an unexpected library error: its traceback
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
