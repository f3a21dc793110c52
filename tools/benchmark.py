#!/usr/bin/env python
"""Throughput figures for SCRL and BYOL pretraining, and the speed options' parity with
the plain path: a thin script over :mod:`scrl_d2.cli.benchmark` (also
``python -m scrl_d2.cli.benchmark``; the library is :mod:`scrl_d2.benchmark`).

    python tools/benchmark.py train --config-file configs/scrl_pretrain.yaml --with-model
    python tools/benchmark.py parity --config-file configs/scrl_pretrain.yaml

Modes: train, model, data, boxes, parity, index; ``--help`` and the module's docstring say the rest.
"""
import sys

from scrl_d2.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
