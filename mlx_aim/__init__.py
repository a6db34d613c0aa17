"""mlx-aim: AIM (Autoregressive Image Models) in MLX."""

from .config import AIMConfig, PRESET_NAMES, get_config
from .model import AIM, AIMForPretraining, build_model
from .loading import convert, load

__version__ = "0.1.0"
