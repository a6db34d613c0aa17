"""Features of every image under a folder tree, in shards with an index:

    python scripts/extract_features.py --model M --out DIR IMAGE_DIR [--features embedding|tokens|both]

"embedding" is the probe's attention-pooled vector (width,); "tokens" the probe layers' averaged patch
tokens (patches, width). Shards of --shard-size images are written as .npy (or one .safetensors each);
DIR/index.json maps every row to its image. A re-run with the same settings skips finished shards.
"""

import argparse
import sys

from mlx_aim.cli import add_inference_options
from mlx_aim.inference import SHARD_SIZE, run_extract_features


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_DIR", help="folders (searched recursively), files or globs")
    p.add_argument("--model", required=True,
                   help="preset name, hub repo id, MLX model folder, pre-training run folder (its model/) or "
                        "checkpoint file")
    p.add_argument("--out", required=True, help="output folder for the shards and index.json")
    p.add_argument("--features", choices=["embedding", "tokens", "both"], default="embedding")
    p.add_argument("--format", choices=["npy", "safetensors"], default="npy", dest="file_format")
    p.add_argument("--save-dtype", choices=["float32", "float16"], default="float32", help="dtype on disk")
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="images per shard")
    add_inference_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace features written with other settings")
    p.add_argument("--json", action="store_true", help="also print one JSON object with the results, last")
    args = p.parse_args(argv)
    return run_extract_features(
        args.model, args.inputs, args.out, features=args.features, shard_size=args.shard_size,
        file_format=args.file_format, save_dtype=args.save_dtype, batch_size=args.batch_size, dtype=args.dtype,
        quantize=args.quantize, probe_layers=args.probe_layers, num_workers=args.num_workers,
        overwrite=args.overwrite, as_json=args.json,
    )


if __name__ == "__main__":
    sys.exit(main())
