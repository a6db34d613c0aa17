"""Features of every image under a folder tree, in shards with an index:

    mlx-aim extract-features --model M --out DIR IMAGE_DIR [--features embedding|tokens|both]

"embedding" is the trained probe's attention-pooled vector (width,), which a model without one (an AIMv2 encoder, an
AIM trunk) refuses; "tokens" the probe layers' averaged patch tokens (patches, width), any trunk's; a
native-resolution model's tokens are stored ragged (one (patches_i, width) block per image, its grid in the
shard's .json). Shards of --shard-size images are written as .npy (or one .safetensors each);
DIR/index.json maps every row to its image. A re-run with the same settings skips finished shards.
Unreadable files are skipped and listed; the exit status is 1 when no image could be used.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..data import preprocessing_for
from ..tasks.encode import peak_memory
from ..tasks.features import FEATURE_KINDS, extract_features
from ..tasks.inference import open_model
from ..tasks.shards import SHARD_SIZE
from ..models.model import dtype_name
from .options import MODEL_HELP, add_inference_options, add_output_options, positive_int, precision
from .output import EXIT_EMPTY, EXIT_OK, memory_line, print_json, reported_as, run_command


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_DIR", help="folders (searched recursively), files or globs")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output folder for the shards and index.json")
    p.add_argument("--features", choices=FEATURE_KINDS, default="embedding")
    p.add_argument("--format", choices=["npy", "safetensors"], default="npy", dest="file_format")
    p.add_argument("--save-dtype", choices=["float32", "float16"], default="float32", help="dtype on disk")
    p.add_argument("--shard-size", type=positive_int, default=SHARD_SIZE, help="images per shard")
    add_inference_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace features written with other settings")
    add_output_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Writes the shards and index, prints where and how fast; returns the exit status."""
    with reported_as("cannot load the model"):
        aim = open_model(args.model, **precision(args), probe_layers=args.probe_layers, max_patches=args.max_patches)
        preprocessing = preprocessing_for(aim.config, aim.source.folder)
    result = extract_features(aim, args.inputs, args.out, features=args.features, shard_size=args.shard_size,
                              file_format=args.file_format, save_dtype=args.save_dtype, batch_size=args.batch_size,
                              num_workers=args.num_workers, model_name=str(args.model), overwrite=args.overwrite,
                              progress=not args.no_progress, preprocessing=preprocessing)
    summary = result.to_dict()
    summary.update(peak_memory(), model=str(args.model), batch_size=args.batch_size,
                   features=result.index["features"], dtype=dtype_name(aim.dtype),
                   quantization=aim.config.quantization)
    rate = summary["images_per_second"]
    print(f"features of {summary['num_images']} image(s) in {summary['num_shards']} shard(s) under {result.out} "
          f"({summary['shards_reused']} shard(s) reused; {result.num_new} image(s) processed in "
          f"{result.seconds:.2f} s" + (f", {rate:.2f} images/s" if rate else "") + ")")
    print(f"index: {summary['index']}")
    print(result.skipped.report())
    print(memory_line(summary))
    if args.json:
        print_json(summary)
    return EXIT_OK if summary["num_images"] else EXIT_EMPTY


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    return run_command(run, build_parser(prog).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
