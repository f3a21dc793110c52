#!/usr/bin/env python
"""Transfer suite: fine-tune and evaluate pretrained backbones on downstream protocols.

    python tools/transfer.py --preset demo

A thin script over :mod:`scrl_d2.cli.transfer` (the same as ``python -m scrl_d2.cli.transfer``);
``--help`` and the module's docstring say the rest."""
from scrl_d2.cli.transfer import main

if __name__ == "__main__":
    main()
