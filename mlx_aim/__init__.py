"""mlx-aim: AIM and AIMv2 (Autoregressive Image Models) in MLX."""

import logging

# First, before anything imports mlx.core: on Linux, bind MLX's matmul to an optimized CBLAS.
from ._blas import blas_info, preload_blas

preload_blas()

from .models.config import AIMConfig, AIMv2Config, AIMv2LiTConfig, PRESET_NAMES, get_config  # noqa: E402
from .checkpoints.loading import convert, load  # noqa: E402
from .models.model import (  # noqa: E402
    AIM, AIMEncoder, AIMForPretraining, AIMv2, AIMv2LiT, ProbedAIMv2, UntrainedHeadError, build_model, with_probe,
)

# A library logs (skipped images, ...) and leaves showing the records to its application: the command lines
# (`mlx_aim.cli`) print them; without a handler here Python's last-resort handler would print them anyway.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"
__all__ = [
    "AIM", "AIMConfig", "AIMEncoder", "AIMForPretraining", "AIMv2", "AIMv2Config", "AIMv2LiT", "AIMv2LiTConfig",
    "PRESET_NAMES", "ProbedAIMv2", "UntrainedHeadError", "blas_info", "build_model", "convert", "get_config", "load",
    "with_probe",
]
