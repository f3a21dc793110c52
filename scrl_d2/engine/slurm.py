"""SLURM submission with submitit: one task per GPU, rendezvous from the SLURM
environment, preemption and time limits answered with a checkpoint and a requeue.

Each task runs ``python -m scrl_d2.cli.train_net`` with the submitted arguments in its own process;
submitit's ``TorchDistributedEnvironment`` exports ``RANK`` / ``WORLD_SIZE`` /
``MASTER_ADDR`` ..., so ``launch`` initialises from ``env://`` as under torchrun. On the
signal SLURM sends before a time limit or a preemption (submitit's ``USR2``), the
trainer finishes its step and writes a checkpoint (:mod:`.preemption`); then submitit's
handler calls :meth:`TrainJob.checkpoint` and requeues the job, which resumes from that
checkpoint (OUTPUT_DIR is fixed at submission). ``--dry-run`` builds the same executor
and prints the sbatch script submitit would pass to ``sbatch``.
"""
import argparse
import os
import shlex
import sys
from typing import Dict, List

from ..utils.errors import InputImportError

__all__ = ["TrainJob", "submit_argument_parser", "executor_parameters", "slurm_parameters", "job_name",
           "make_executor", "sbatch_script", "submit"]

INSTALL_HINT = "tools/submit_slurm.py needs submitit: pip install submitit (or pip install -e '.[slurm]')"


def submit_argument_parser() -> argparse.ArgumentParser:
    from .defaults import ArgumentParser

    p = ArgumentParser(
        description="Submit pretraining, linear evaluation or detection fine-tuning to SLURM (submitit).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""Examples:
    python tools/submit_slurm.py --config-file configs/scrl_pretrain.yaml --nodes 4 --gpus-per-node 8 \\
        --partition learnlab --time 4320 OUTPUT_DIR /checkpoint/me/scrl
    python tools/submit_slurm.py --config-file configs/scrl_pretrain.yaml --nodes 4 --dry-run
""")
    p.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    p.add_argument("--resume", action="store_true", help="passed to train_net.py")
    p.add_argument("--eval-only", action="store_true", help="passed to train_net.py")
    p.add_argument("--nodes", type=int, default=1, help="machines")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per machine: one task each")
    p.add_argument("--cpus-per-task", type=int, default=10, help="CPU cores per task (data loading)")
    p.add_argument("--mem-gb", type=int, default=0, help="memory per machine in GB (0: the partition's default)")
    p.add_argument("--time", type=int, default=4320, metavar="MINUTES", help="time limit of one job in minutes")
    p.add_argument("--partition", default="", help="SLURM partition")
    p.add_argument("--account", default="", help="SLURM account")
    p.add_argument("--qos", default="", help="SLURM quality of service")
    p.add_argument("--constraint", default="", help="SLURM constraint, e.g. volta32gb")
    p.add_argument("--comment", default="", help="SLURM comment")
    p.add_argument("--job-name", default="", help="job name (default: the config's name)")
    p.add_argument("--signal-delay", type=int, default=120, metavar="SECONDS",
                   help="how long before the time limit SLURM signals the job to checkpoint")
    p.add_argument("--dist-timeout", type=float, default=600, metavar="SECONDS",
                   help="passed to train_net.py: how long a process waits for a peer that stopped")
    p.add_argument("--cluster", default=None, choices=["slurm", "local", "debug"],
                   help="submitit's executor (default: SLURM where sbatch exists, else local)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the sbatch script submitit would submit and the command; submit nothing")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return p


TRAIN_NET = ("-m", "scrl_d2.cli.train_net")  # what every task runs: the package's entry point


class TrainJob:
    """What each SLURM task runs: :mod:`scrl_d2.cli.train_net` with ``argv``, distributed from the
    environment submitit exports. Checkpointable: requeued as it was submitted."""

    def __init__(self, argv: List[str], dist_timeout: float = 600):
        self.argv = list(argv)
        self.dist_timeout = dist_timeout

    def __call__(self) -> None:
        import submitit  # noqa: F401  (only: is it installed?)

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        os.environ["SCRL_D2_DIST_TIMEOUT"] = str(self.dist_timeout)
        from ..cli.train_net import cli

        sys.argv = [sys.executable, *TRAIN_NET, *self.argv]  # what log.txt's "command line" shows
        cli(self.argv)

    def checkpoint(self):
        """Called by submitit on preemption / time limit, after the trainer wrote its
        checkpoint: the same job again, which resumes from OUTPUT_DIR."""
        import submitit  # noqa: F401  (only: is it installed?)

        return submitit.helpers.DelayedSubmission(TrainJob(self.argv, self.dist_timeout))


def job_name(args) -> str:
    """``--job-name``, else the config's name (its file name without the extension)."""
    if args.job_name:
        return args.job_name
    return os.path.splitext(os.path.basename(args.config_file))[0] if args.config_file else "scrl_d2"


def slurm_parameters(args) -> Dict:
    """The job's sbatch parameters under SLURM's names (submitit's ``SlurmExecutor``): one
    task per GPU on each node, the preemption signal ``--signal-delay`` seconds early."""
    params = dict(job_name=job_name(args), time=args.time, nodes=args.nodes, ntasks_per_node=args.gpus_per_node,
                  gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                  signal_delay_s=args.signal_delay)
    if args.mem_gb:
        params["mem"] = f"{args.mem_gb}GB"
    for key in ("partition", "account", "qos", "constraint", "comment"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    return params


def executor_parameters(args) -> Dict:
    """The same job for submitit's other executors (``--cluster local`` / ``debug``)."""
    return dict(nodes=args.nodes, tasks_per_node=args.gpus_per_node, gpus_per_node=args.gpus_per_node,
                cpus_per_task=args.cpus_per_task, timeout_min=args.time, name=job_name(args))


def _slurm_executor_class(dry_run: bool):
    """submitit's SlurmExecutor; for a dry run the same class without its check that
    ``srun`` exists (it submits nothing), so that the script is built as submitting builds it."""
    from submitit import SlurmExecutor

    if not dry_run:
        return SlurmExecutor

    class DryRunSlurmExecutor(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 1

    return DryRunSlurmExecutor


def make_executor(args, folder: str, dry_run: bool = False):
    """``(executor, cluster)`` the job goes to: on SLURM submitit's ``SlurmExecutor`` with
    :func:`slurm_parameters` (a dry run builds the very same one), else submitit's local
    or debug executor. Job folders are ``folder/<job id>``."""
    import submitit

    cluster = args.cluster or ("slurm" if dry_run else submitit.AutoExecutor.which())
    if cluster == "slurm":
        executor = _slurm_executor_class(dry_run)(folder=os.path.join(folder, "%j"))
        executor.update_parameters(**slurm_parameters(args))
        return executor, cluster
    executor = submitit.AutoExecutor(folder=os.path.join(folder, "%j"), cluster=cluster)
    executor.update_parameters(**executor_parameters(args))
    return executor, cluster


def sbatch_script(executor) -> str:
    """The file a SLURM executor passes to ``sbatch``, made by the method its submission
    calls, with the command it submits."""
    return executor._make_submission_file_text(executor._submitit_command_str, "")


def _job_argv(args, output_dir: str) -> List[str]:
    argv = ["--config-file", args.config_file] if args.config_file else []
    argv += ["--resume"] if args.resume else []
    argv += ["--eval-only"] if args.eval_only else []
    opts = list(args.opts or [])
    if "OUTPUT_DIR" in opts[::2]:
        i = opts[::2].index("OUTPUT_DIR") * 2
        del opts[i:i + 2]
    return argv + opts + ["OUTPUT_DIR", output_dir]


def submit(args, output_dir: str) -> int:
    """Submit (or with ``--dry-run`` print) the job. Logs and the submitted command go to
    ``OUTPUT_DIR/slurm``. A job on submitit's local executor (``--cluster local``) runs on
    this machine: wait for it and return its exit status; else 0."""
    argv = _job_argv(args, output_dir)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *TRAIN_NET, *argv])
    folder = os.path.join(output_dir, "slurm")
    try:
        import submitit  # noqa: F401  (only: is it installed?)
    except ImportError:
        raise InputImportError(INSTALL_HINT) from None
    executor, cluster = make_executor(args, folder, dry_run=args.dry_run)
    if args.dry_run:
        if cluster == "slurm":
            script = sbatch_script(executor)
            print("sbatch script (what submitit passes to sbatch):")
            print(script, end="" if script.endswith("\n") else "\n")
        else:
            print(f"{cluster} executor (no sbatch script): parameters {executor.parameters}")
        print(f"command (every task, distributed from the SLURM environment):\n{command}")
        return 0
    os.makedirs(folder, exist_ok=True)
    job = executor.submit(TrainJob(argv, args.dist_timeout))
    with open(os.path.join(folder, "submitted.txt"), "a") as f:
        f.write(f"job {job.job_id} ({cluster}): {args.nodes} node(s) x {args.gpus_per_node} task(s)\n"
                f"parameters: {executor.parameters}\ncommand: {command}\n")
    print(f"submitted job {job.job_id} ({cluster}); logs: {os.path.join(folder, str(job.job_id))}; "
          f"output: {output_dir}", flush=True)
    if cluster not in ("local", "debug"):
        return 0
    try:
        job.results()
    except Exception as e:  # submitit re-raises the task's failure; its own line is in the task's log
        print(f"job {job.job_id} failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e}",
              file=sys.stderr)
        return 1
    print(f"job {job.job_id} done; output: {output_dir}")
    return 0
