"""The PyTorch reference of AIM the parity tests compare against: it lives in `mlx_aim.benchmark_torch`, which
the benchmark's `--compare-torch` times too, so both check the MLX model against one reference."""

from mlx_aim.benchmark_torch import *  # noqa: F401,F403
from mlx_aim.benchmark_torch import __all__  # noqa: F401
