"""`python -m mlx_aim.cli COMMAND ...`: the same as the installed `mlx-aim COMMAND ...`."""

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
