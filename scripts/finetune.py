"""`mlx-aim finetune` from a clone (`--help` for its options); the command line is mlx_aim/cli/finetune.py."""

import sys

from mlx_aim.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
