"""Top-k labels for images: python scripts/classify.py --model aim-600M [--top-k 5] [--json] PATH...

PATH: image files, folders (searched recursively) or glob patterns. Files that cannot be read are skipped,
listed at the end, and make the exit status non-zero only when no image could be classified.
"""

import argparse
import sys

from mlx_aim.cli import add_inference_options
from mlx_aim.inference import TOP_K, run_classify


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    p.add_argument("--model", required=True,
                   help="preset name, hub repo id, MLX model folder (e.g. a probe's OUT/model), pre-training run "
                        "folder (its model/) or checkpoint file")
    p.add_argument("--top-k", type=int, default=TOP_K)
    add_inference_options(p)
    p.add_argument("--json", action="store_true", help="also print one JSON object with the results, last")
    args = p.parse_args(argv)
    return run_classify(args.model, args.paths, top_k=args.top_k, batch_size=args.batch_size, dtype=args.dtype,
                        quantize=args.quantize, probe_layers=args.probe_layers,
                        num_workers=args.num_workers, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
