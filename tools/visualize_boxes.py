#!/usr/bin/env python
"""Draw SCRL's box pairs on two views of real images. A thin script over
:mod:`scrl_d2.cli.visualize_boxes` (also ``python -m scrl_d2.cli.visualize_boxes``)."""
from scrl_d2.cli.visualize_boxes import main

if __name__ == "__main__":
    main()
