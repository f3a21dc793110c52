#!/usr/bin/env python
"""Convert a pretraining checkpoint's encoder into detection backbone weights.

    python tools/convert.py output/scrl_pretrain_0/checkpoint_last.pth scrl_r50.pkl

A thin script over :mod:`scrl_d2.cli.convert` (the same as ``python -m scrl_d2.cli.convert``);
``--help`` and the module's docstring say the rest."""
import sys

from scrl_d2.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
