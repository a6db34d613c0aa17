"""`mlx-aim benchmark` from a clone (`--help` for its options); the command line is mlx_aim/cli/benchmark.py.

This shim is the way to run --compare-torch: it imports PyTorch first.
"""

import sys

if "--compare-torch" in sys.argv[1:]:
    # Before mlx_aim: on Linux it loads an optimized BLAS globally, and torch imported after it would call
    # that library instead of its own. Imported first, torch runs as its users have it.
    import torch  # noqa: F401

from mlx_aim.cli.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
