"""`mlx-aim classify` from a clone (`--help` for its options); the command line is mlx_aim/cli/classify.py."""

import sys

from mlx_aim.cli.classify import main

if __name__ == "__main__":
    sys.exit(main())
