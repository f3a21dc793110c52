"""SLURM submission with submitit: one task per GPU, rendezvous from the SLURM
environment, preemption and time limits answered with a checkpoint and a requeue.

Each task runs ``tools/train_net.py`` with the submitted arguments in its own process;
submitit's ``TorchDistributedEnvironment`` exports ``RANK`` / ``WORLD_SIZE`` /
``MASTER_ADDR`` ..., so ``launch`` initialises from ``env://`` as under torchrun. On the
signal SLURM sends before a time limit or a preemption (submitit's ``USR2``), the
trainer finishes its step and writes a checkpoint (:mod:`.preemption`); then submitit's
handler calls :meth:`TrainJob.checkpoint` and requeues the job, which resumes from that
checkpoint (OUTPUT_DIR is fixed at submission).
"""
import argparse
import os
import runpy
import shlex
import sys
from typing import Dict, List

__all__ = ["TrainJob", "submit_argument_parser", "executor_parameters", "submit"]

INSTALL_HINT = "tools/submit_slurm.py needs submitit: pip install submitit (or pip install -e '.[slurm]')"


def submit_argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    p.add_argument("--dry-run", action="store_true", help="print the sbatch parameters and the command; submit nothing")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return p


def _train_net() -> str:
    """tools/train_net.py of this checkout (the command every task runs)."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(here, "tools", "train_net.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: submit from a checkout of scrl_d2 (pip install -e .)")
    return path


class TrainJob:
    """What each SLURM task runs: ``train_net.py`` with ``argv``, distributed from the
    environment submitit exports. Checkpointable: requeued as it was submitted."""

    def __init__(self, argv: List[str], dist_timeout: float = 600):
        self.argv = list(argv)
        self.dist_timeout = dist_timeout

    def __call__(self) -> None:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        os.environ["SCRL_D2_DIST_TIMEOUT"] = str(self.dist_timeout)
        sys.argv = [_train_net(), *self.argv]
        runpy.run_path(sys.argv[0], run_name="__main__")

    def checkpoint(self):
        """Called by submitit on preemption / time limit, after the trainer wrote its
        checkpoint: the same job again, which resumes from OUTPUT_DIR."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.argv, self.dist_timeout))


def executor_parameters(args) -> Dict:
    """submitit parameters: one task per GPU on each node, the preemption signal early."""
    params = dict(nodes=args.nodes, tasks_per_node=args.gpus_per_node, gpus_per_node=args.gpus_per_node,
                  cpus_per_task=args.cpus_per_task, timeout_min=args.time, name=args.job_name,
                  slurm_signal_delay_s=args.signal_delay)
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    for key in ("partition", "account", "qos", "constraint", "comment"):
        if getattr(args, key):
            params[f"slurm_{key}"] = getattr(args, key)
    return params


def sbatch_preview(args, folder: str) -> str:
    """The sbatch script submitit would submit, with SLURM's names for the parameters."""
    from submitit.slurm import slurm

    p = dict(job_name=args.job_name or "scrl_d2", time=args.time, nodes=args.nodes,
             ntasks_per_node=args.gpus_per_node, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
             signal_delay_s=args.signal_delay)
    if args.mem_gb:
        p["mem"] = f"{args.mem_gb}GB"
    for key in ("partition", "account", "qos", "constraint", "comment"):
        if getattr(args, key):
            p[key] = getattr(args, key)
    submitted = f"{sys.executable} -u -m submitit.core._submit {folder}/%j"
    return slurm._make_sbatch_string(command=submitted, folder=os.path.join(folder, "%j"), **p)


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
    command = " ".join(shlex.quote(a) for a in [sys.executable, _train_net(), *argv])
    folder = os.path.join(output_dir, "slurm")
    try:
        import submitit
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    params = executor_parameters(args)
    if args.dry_run:
        print(f"sbatch script (as submitit writes it):\n{sbatch_preview(args, folder)}")
        print(f"command (every task, distributed from the SLURM environment):\n{command}")
        return 0
    os.makedirs(folder, exist_ok=True)
    executor = submitit.AutoExecutor(folder=os.path.join(folder, "%j"), cluster=args.cluster)
    executor.update_parameters(**params)
    job = executor.submit(TrainJob(argv, args.dist_timeout))
    with open(os.path.join(folder, "submitted.txt"), "a") as f:
        f.write(f"job {job.job_id} ({executor.cluster}): {args.nodes} node(s) x {args.gpus_per_node} task(s)\n"
                f"parameters: {params}\ncommand: {command}\n")
    print(f"submitted job {job.job_id} ({executor.cluster}); logs: {os.path.join(folder, str(job.job_id))}; "
          f"output: {output_dir}", flush=True)
    if executor.cluster not in ("local", "debug"):
        return 0
    try:
        job.results()
    except Exception as e:  # submitit re-raises the task's failure; its own line is in the task's log
        print(f"job {job.job_id} failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e}",
              file=sys.stderr)
        return 1
    print(f"job {job.job_id} done; output: {output_dir}")
    return 0
