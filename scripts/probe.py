"""`mlx-aim probe` from a clone (`--help` for its options); the command line is mlx_aim/cli/probe.py."""

import sys

from mlx_aim.cli.probe import main

if __name__ == "__main__":
    sys.exit(main())
