"""transformers' Aimv2VisionModel alone in its process: one forward's time and the process's peak resident memory, to
set beside an MLX-only `scripts/benchmark.py` run's (whose --compare-torch figure holds both frameworks' memory).
Random weights (normal, std 0.02): time and memory do not depend on their values. Reference tool (needs torch and transformers).

    python benchmarks/long_sequences_torch.py --image-size 896 --threads 1
"""

import argparse
import json
import os
import time

import torch  # before mlx_aim: torch keeps its own BLAS (mlx_aim/_blas.py)

from mlx_aim import platforms
from mlx_aim.models.config import get_config

import transformers_reference  # noqa: E402  (benchmarks/, beside this file)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="aimv2-large-patch14-native")
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--threads", type=int, default=0, help="torch's threads (0: its own default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = transformers_reference.build_reference(get_config(args.preset))  # allocated, not initialised
    with torch.no_grad():
        for parameter in model.parameters():  # every page written, as loaded weights are; no nan or denormal
            parameter.normal_(0.0, 0.02)
    images = torch.randn(1, 3, args.image_size, args.image_size)
    rss_before = platforms.peak_rss_bytes()
    with torch.inference_mode():
        start = time.perf_counter()
        model(pixel_values=images)
        seconds = time.perf_counter() - start
    print(json.dumps({"preset": args.preset, "image_size": args.image_size, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "forward_s": seconds, "peak_rss_after_load_bytes": rss_before,
                      "peak_rss_bytes": platforms.peak_rss_bytes(), "cpu": platforms.probe_cpu_record(),
                      "load_average_1min": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
