"""What running a model over images shares: the batch size default, model outputs as numpy (`to_numpy`), and the
peak memory each command reports beside its timings (`peak_memory`).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .. import platforms

BATCH_SIZE = 32  # the default of the library functions and the command lines


def to_numpy(a: mx.array, dtype=np.float32) -> np.ndarray:
    """numpy copy of an MLX array; bfloat16 goes through float32 (numpy has no bfloat16)."""
    if a.dtype == mx.bfloat16:
        a = a.astype(mx.float32)
    return np.asarray(a).astype(dtype, copy=False)


def peak_memory() -> dict:
    """Peak resident memory of this process (ru_maxrss) and MLX's peak allocation, both in bytes."""
    return {"peak_rss_bytes": platforms.peak_rss_bytes(), "peak_mlx_bytes": int(mx.get_peak_memory())}
