"""Convert Apple's AIM PyTorch checkpoints (or any source mlx_aim.load takes) into an MLX model folder.

    python convert/convert.py aim-600M --out mlx-aim-600M
    python convert/convert.py backbone.pth head_best_layers.pth --out DIR --dtype bfloat16
    python convert/convert.py apple/AIM-1B --out DIR --quantize --q-bits 4

No PyTorch needed: pickles are read by an allow-listing reader that executes nothing.
"""

import argparse
import json
import resource
import sys
import time

import mlx_aim


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="+", help="preset name, hub repo id, local folder, or checkpoint files (backbone and head)")
    p.add_argument("--out", required=True, help="the MLX model folder to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default: as stored")
    p.add_argument("--quantize", action="store_true", help="quantize the trunk's linear layers")
    p.add_argument("--q-bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=64)
    p.add_argument("--probe-layers", choices=["best", "last"], default=None,
                   help="where the source does not say (Apple's file names and configs do)")
    p.add_argument("--upload-repo", default=None, help="also upload the folder to this hub repo")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--json", action="store_true", help="print one JSON object with the figures last")
    args = p.parse_args(argv)

    start = time.perf_counter()
    try:
        out = mlx_aim.convert(
            args.src[0] if len(args.src) == 1 else args.src, args.out, dtype=args.dtype,
            quantize=args.q_bits if args.quantize else None, q_group_size=args.q_group_size,
            probe_layers=args.probe_layers, force=args.force, upload_repo=args.upload_repo,
        )
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError; the output folder is atomic
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024**2)
    size_mb = sum(f.stat().st_size for f in out.iterdir()) / 1024**2
    print(f"wrote {out} ({size_mb:.1f} MB) in {seconds:.1f} s, peak RSS {peak_mb:.0f} MB")
    if args.json:
        print(json.dumps({"out": str(out), "seconds": round(seconds, 2), "peak_rss_mb": round(peak_mb, 1), "size_mb": round(size_mb, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
