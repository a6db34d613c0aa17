import sys
from pathlib import Path

import numpy as np
import pytest

import mlx_aim  # noqa: F401  (loads the optimized BLAS, where there is one, before anything imports mlx)
import mlx.core as mx
from mlx_aim.config import AIMConfig

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = str(ROOT / "benchmarks")  # the PyTorch reference lives with the developer tools, outside the package
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)


def rel_err(a, b) -> float:
    """max |a - b| relative to the reference's scale (max |b|)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.fixture
def tiny_config() -> AIMConfig:
    return AIMConfig(image_size=16, patch_size=4, width=64, depth=4, num_heads=4, num_classes=10,
                     probe_layers=[1, 2], head_width=32, head_depth=2)


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(0)
    np.random.seed(0)
