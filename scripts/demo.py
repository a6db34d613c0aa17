"""The main job on a built-in default, nothing to download: pre-train a small AIM on synthetic shapes,
train attentive probes on it and on a randomly initialised trunk, print the comparison, draw a figure.

    python scripts/demo.py                     # the default run: a few minutes on a laptop CPU
    python scripts/demo.py --seed 1 --json     # another seed; one JSON object with the figures last
    python scripts/demo.py --model aim-600M    # classify the bundled sample images with a released model

Everything lands under --out (default ./mlx_aim_demo): the image folder, the run (checkpoint, exported
trunk, probes), demo.json and demo.png. See mlx_aim/demo.py for the recipe and its decisions.
"""

import sys

import mlx_aim  # noqa: F401  (before mlx: loads the optimized BLAS where there is one)
from mlx_aim.demo import main

if __name__ == "__main__":
    sys.exit(main())
