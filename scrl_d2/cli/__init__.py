"""The command-line entry points (``python -m scrl_d2.cli.<name>``); ``tools/`` holds
thin scripts over them, as Detectron2's ``tools/``. The library starts its own runs
(SLURM jobs, the transfer suite's trials) through these modules, never by a file path."""
