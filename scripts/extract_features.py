"""`mlx-aim extract-features` from a clone (`--help` for its options); the command line is
mlx_aim/cli/extract_features.py."""

import sys

from mlx_aim.cli.extract_features import main

if __name__ == "__main__":
    sys.exit(main())
