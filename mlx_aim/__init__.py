"""mlx-aim: AIM (Autoregressive Image Models) in MLX."""

from .config import AIMConfig, PRESET_NAMES, get_config

__version__ = "0.1.0"
