"""`mlx-aim pretrain` from a clone (`--help` for its options); the command line is mlx_aim/cli/pretrain.py."""

import sys

from mlx_aim.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
