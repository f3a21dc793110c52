#!/usr/bin/env python
"""Submit pretraining, linear evaluation or detection fine-tuning to SLURM with submitit.

    python tools/submit_slurm.py --config-file configs/scrl_pretrain.yaml --nodes 4 --dry-run

A thin script over :mod:`scrl_d2.cli.submit_slurm` (the same as ``python -m scrl_d2.cli.submit_slurm``);
``--help`` and the module's docstring say the rest."""
from scrl_d2.cli.submit_slurm import main

if __name__ == "__main__":
    main()
