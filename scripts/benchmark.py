"""Speed and memory of mlx-aim, optionally against PyTorch in the same run (see mlx_aim/benchmark.py).

    python scripts/benchmark.py --preset aim-600M --batch-size 2 --compare-torch
    python scripts/benchmark.py --preset aim-small --train-only --batch-size 4 --compare-torch
    python scripts/benchmark.py --memory-suite
"""

import sys

if "--compare-torch" in sys.argv[1:]:
    # Before mlx_aim: on Linux it loads an optimized BLAS globally, and torch imported after it would call
    # that library instead of its own. Imported first, torch runs as its users have it.
    import torch  # noqa: F401

from mlx_aim.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
