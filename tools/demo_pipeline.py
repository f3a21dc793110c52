#!/usr/bin/env python
"""The whole path on built-in data: pretrain SCRL -> convert -> fine-tune Faster R-CNN ->
COCO AP. A thin script over :mod:`scrl_d2.cli.demo_pipeline` (also ``python -m
scrl_d2.cli.demo_pipeline``).

    python tools/demo_pipeline.py --output-dir output/pipeline
"""
from scrl_d2.cli.demo_pipeline import main

if __name__ == "__main__":
    main()
