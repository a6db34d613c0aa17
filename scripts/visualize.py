"""`mlx-aim visualize` from a clone (`--help` for its options); the command line is mlx_aim/cli/visualize.py."""

import sys

from mlx_aim.cli.visualize import main

if __name__ == "__main__":
    sys.exit(main())
