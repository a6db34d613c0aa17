"""Next-patch predictions of a pre-trained AIM, as a PNG grid: each image next to what the model predicts.

    mlx-aim visualize --model OUT IMAGE... [--out grid.png] [--prefix N]

--model is a pre-training run folder (pretrain's OUT: its newest checkpoint is used) or one of its
checkpoints/step_* folders: the pixel head is needed, and OUT/model (the exported trunk) has none.
IMAGE: files, folders (searched recursively) or glob patterns. Each predicted patch is shown un-normalised
with the true patch's mean and standard deviation; the first --prefix patches are shown as they are.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..data import list_images
from ..training.pretrain import load_pretraining_checkpoint
from ..tasks.visualize import save_prediction_grid
from .options import add_output_options, positive_int
from .output import EXIT_OK, print_json, run_command


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    p.add_argument("--model", required=True, help="pre-training run folder or checkpoint folder")
    p.add_argument("--out", default="predictions.png", help="PNG to write (default predictions.png)")
    p.add_argument("--prefix", type=int, default=1, help="patches given as context before predicting (default 1)")
    p.add_argument("--max-images", type=positive_int, default=16, help="at most this many images (default 16)")
    add_output_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    paths = list_images(args.images)[: args.max_images]
    model, state = load_pretraining_checkpoint(args.model)
    out = save_prediction_grid(model, paths, args.out, prefix_len=args.prefix)
    print(f"wrote {out}: {len(paths)} image(s), model at step {state['step']}")
    if args.json:
        print_json({"out": str(out), "images": [str(x) for x in paths], "step": state["step"]})
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    return run_command(run, build_parser(prog).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
