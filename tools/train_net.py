#!/usr/bin/env python
"""SCRL / BYOL pretraining and detection fine-tuning, Detectron2-style command line: a thin
script over :mod:`scrl_d2.cli.train_net` (also ``python -m scrl_d2.cli.train_net``).

    python tools/train_net.py --config-file configs/scrl_pretrain.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/coco/faster_rcnn_R_50_FPN_1x_syncbn.yaml \
        --num-gpus 8 MODEL.WEIGHTS scrl_r50.pkl
"""
from scrl_d2.cli.train_net import cli

if __name__ == "__main__":
    cli()
