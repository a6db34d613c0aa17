"""`mlx-aim fuse` from a clone (`--help` for its options); the command line is mlx_aim/cli/fuse.py."""

import sys

from mlx_aim.cli.fuse import main

if __name__ == "__main__":
    sys.exit(main())
