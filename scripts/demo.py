"""`mlx-aim demo` from a clone (`--help` for its options); the command line is mlx_aim/cli/demo.py."""

import sys

from mlx_aim.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
