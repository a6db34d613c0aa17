"""`mlx-aim convert` from a clone (`--help` for its options); the command line is mlx_aim/cli/convert.py."""

import sys

from mlx_aim.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
