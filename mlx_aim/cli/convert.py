"""Convert Apple's AIM PyTorch checkpoints (or any source mlx_aim.load takes) into an MLX model folder.

    mlx-aim convert aim-600M --out mlx-aim-600M
    mlx-aim convert backbone.pth head_best_layers.pth --out DIR --dtype bfloat16
    mlx-aim convert apple/AIM-1B --out DIR --quantize 4
    mlx-aim convert aimv2-large-patch14-224 --out DIR        (AIMv2: a released name, hub id or folder in any layout)

No PyTorch needed: pickles are read by an allow-listing reader that executes nothing. The output folder is
written under a temporary name: a failure leaves nothing behind.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from .. import platforms
from ..checkpoints.loading import convert
from .options import add_model_options, add_output_options, precision
from .output import EXIT_OK, print_json, run_command


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="+",
                   help="preset name, hub repo id, local folder, or checkpoint files (backbone and head)")
    p.add_argument("--out", required=True, help="the MLX model folder to write")
    add_model_options(p, dtype_help="dtype of the written weights (default: as stored)")
    p.add_argument("--probe-layers", choices=["best", "last"], default=None,
                   help="where the source does not say (Apple's file names and configs do)")
    p.add_argument("--upload-repo", default=None, help="also upload the folder to this hub repo")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    add_output_options(p, json_help="also print one JSON object with the figures, on the last line")
    return p


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = convert(args.src[0] if len(args.src) == 1 else args.src, args.out, **precision(args),
                  probe_layers=args.probe_layers, force=args.force, upload_repo=args.upload_repo)
    seconds = time.perf_counter() - start
    peak_mb = platforms.peak_rss_bytes() / 1024**2
    size_mb = sum(f.stat().st_size for f in out.iterdir()) / 1024**2
    print(f"wrote {out} ({size_mb:.1f} MB) in {seconds:.1f} s, peak RSS {peak_mb:.0f} MB")
    if args.json:
        print_json({"out": str(out), "seconds": round(seconds, 2), "peak_rss_mb": round(peak_mb, 1),
                    "size_mb": round(size_mb, 1)})
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    return run_command(run, build_parser(prog).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
