"""`mlx-aim zero-shot` from a clone (`--help` for its options); the command line is mlx_aim/cli/zero_shot.py."""

import sys

from mlx_aim.cli.zero_shot import main

if __name__ == "__main__":
    sys.exit(main())
