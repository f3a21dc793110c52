"""Draw a few images' two views with their matched box pairs in the same colours.

    python tools/visualize_boxes.py --config-file configs/demo/scrl_demo.yaml --output boxes.png
    python tools/visualize_boxes.py --output boxes_prefix.png MODEL.SCRL.REPRODUCE_FLIP_BUG True
"""
import argparse
import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw

from scrl_d2.config import get_cfg
from scrl_d2.data import PretrainDataset, TwoViewAugmentation, dataset_dicts_of
from scrl_d2.data.boxes import BoxPairGenerator
from scrl_d2.data.datasets import PretrainCollate


def render(sample: dict, scale: int) -> Image.Image:
    views = [Image.fromarray(sample[v].permute(1, 2, 0).numpy()) for v in ("view1", "view2")]
    S = views[0].width
    canvas = Image.new("RGB", (2 * S * scale + 8, S * scale), "white")
    for i, v in enumerate(views):
        canvas.paste(v.resize((S * scale, S * scale), Image.NEAREST), (i * (S * scale + 8), 0))
    draw = ImageDraw.Draw(canvas)
    valid = sample["box_valid"].numpy()
    for k in np.flatnonzero(valid):
        r, g, b = colorsys.hsv_to_rgb(k / max(1, len(valid)), 0.9, 1.0)
        color = (int(r * 255), int(g * 255), int(b * 255))
        for i, key in enumerate(("boxes1", "boxes2")):
            x1, y1, x2, y2 = (sample[key][k] * scale).tolist()
            off = i * (S * scale + 8)
            x1, x2 = sorted((x1, x2))  # REPRODUCE_FLIP_BUG can give inverted boxes
            draw.rectangle([x1 + off, y1, x2 + off, y2], outline=color, width=2)
    if not valid.any():
        draw.text((4, 4), "views do not overlap: no boxes", fill="red")
    return canvas


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="configs/demo/scrl_demo.yaml")
    p.add_argument("--output", default="boxes.png")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=0, help="pixel zoom (default: to about 300 px per view)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE")
    args = p.parse_args()
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    dicts, _ = dataset_dicts_of(cfg)
    gen = BoxPairGenerator.from_config(cfg)
    ds = PretrainDataset(dicts, TwoViewAugmentation.from_config(cfg), gen)
    collate = PretrainCollate(gen)
    scale = args.scale or max(1, 300 // cfg.INPUT.CROP_SIZE)
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(ds), generator=g)[: args.num_images].tolist()
    batch = collate([ds[(i, args.seed * 100003 + i)] for i in idx])
    rows = [render({k: batch[k][j] for k in ("view1", "view2", "boxes1", "boxes2", "box_valid")}, scale)
            for j in range(len(idx))]
    sheet = Image.new("RGB", (rows[0].width, sum(r.height + 8 for r in rows)), "white")
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height + 8
    sheet.save(args.output)
    print(f"wrote {args.output}: {len(rows)} images, view 1 left, view 2 right, pairs in matching colours")


if __name__ == "__main__":
    main()
