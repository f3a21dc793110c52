"""Convert a pretraining checkpoint's encoder into detection backbone weights.

    python tools/convert.py output/scrl_pretrain_0/checkpoint_last.pth scrl_r50.pkl    # Detectron2
    python tools/convert.py scrl_200ep.pth scrl_r50_tv.pth                            # torchvision
    python tools/convert.py checkpoint_last.pth target.pkl --encoder target

Inputs: scrl_d2 checkpoints (either backend), the official SCRL/BYOL release files, plain
torchvision ResNet state dicts. The projector, predictor, target (or online) network,
probe and optimizer state are dropped; the summary says what was. The input is read
without running code (``weights_only``); a file that needs full unpickling is refused
unless --unsafe-load is given. Bad input: one line, exit status 2, nothing written.
"""
import argparse
import sys

from scrl_d2.checkpoint.convert import convert_checkpoint
from scrl_d2.engine.defaults import EXIT_BAD_INPUT, ArgumentParser, add_unsafe_load_argument
from scrl_d2.utils.errors import is_bad_input


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="checkpoint to read")
    p.add_argument("output", help=".pkl for Detectron2, .pth for torchvision")
    p.add_argument("--encoder", choices=["online", "target"], default="online",
                   help="which encoder to keep (default: online)")
    p.add_argument("--format", choices=["detectron2", "torchvision"], default=None,
                   help="output format (default: from the output's extension)")
    add_unsafe_load_argument(p)
    args = p.parse_args(argv)
    try:
        s = convert_checkpoint(args.input, args.output, args.encoder, args.format)
    except Exception as e:
        if not is_bad_input(e):  # a bug or an unexpected library error: its traceback
            raise
        print(f"error: {args.input}: {e}; nothing was written", file=sys.stderr)
        return EXIT_BAD_INPUT
    dropped = ", ".join(f"{k} ({n})" for k, n in s["dropped"].items()) or "nothing"
    print(f"read {s['input']} ({s['layout']} layout), {s['encoder']} encoder: ResNet-{s['resnet_depth']}\n"
          f"converted {s['tensors']} tensors -> {s['output']} ({s['format']} format)\n"
          f"dropped: {dropped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
