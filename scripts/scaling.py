"""`mlx-aim scaling` from a clone (`--help` for its options); the command line is mlx_aim/cli/scaling.py."""

import sys

from mlx_aim.cli.scaling import main

if __name__ == "__main__":
    sys.exit(main())
