"""Next-patch predictions of a pre-trained AIM, as a PNG grid: each image next to what the model predicts.

    python scripts/visualize.py --model OUT IMAGE... [--out grid.png] [--prefix N]

--model is a pre-training run folder (scripts/pretrain.py's OUT: its newest checkpoint is used) or one of
its checkpoints/step_* folders: the pixel head is needed, and OUT/model (the exported trunk) has none.
IMAGE: files, folders (searched recursively) or glob patterns. Each predicted patch is shown un-normalised
with the true patch's mean and standard deviation; the first --prefix patches are shown as they are.
"""

import argparse
import json
import sys

import mlx_aim  # noqa: F401  (before mlx: loads the optimized BLAS where there is one)
from mlx_aim.data import list_images
from mlx_aim.train import load_pretraining_checkpoint
from mlx_aim.visualize import save_prediction_grid


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    p.add_argument("--model", required=True, help="pre-training run folder or checkpoint folder")
    p.add_argument("--out", default="predictions.png", help="PNG to write (default predictions.png)")
    p.add_argument("--prefix", type=int, default=1, help="patches given as context before predicting (default 1)")
    p.add_argument("--max-images", type=int, default=16, help="at most this many images (default 16)")
    p.add_argument("--json", action="store_true", help="also print one JSON object with the results, last")
    args = p.parse_args(argv)
    try:
        paths = list_images(args.images)[: args.max_images]
        model, state = load_pretraining_checkpoint(args.model)
        out = save_prediction_grid(model, paths, args.out, prefix_len=args.prefix)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {len(paths)} image(s), model at step {state['step']}")
    if args.json:
        print(json.dumps({"out": str(out), "images": [str(x) for x in paths], "step": state["step"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
