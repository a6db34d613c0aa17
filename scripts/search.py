"""`mlx-aim search` from a clone (`--help` for its options); the command line is mlx_aim/cli/search.py."""

import sys

from mlx_aim.cli.search import main

if __name__ == "__main__":
    sys.exit(main())
