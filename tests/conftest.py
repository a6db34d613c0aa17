"""What every test module shares: the tiny config, running a command-line script, reading its JSON, the
PyTorch reference (`benchmarks/torch_reference.py`, imported as `torch_reference`), a quantized model's dequantized
twin, and the `backend_path` fixture."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx_aim  # noqa: F401  (loads the optimized BLAS, where there is one, before anything imports mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_aim.backend import native
from mlx_aim import platforms
from mlx_aim.backend import cpu_workarounds, native_kernels
from mlx_aim.models.config import AIMConfig
from mlx_aim.models.model import Probed, build_model

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = str(ROOT / "benchmarks")  # the PyTorch reference lives with the developer tools, outside the package
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)


_PATH_IDS = {"native": "native", "ops": "cpu-workarounds", "portable": "portable"}
BACKEND_PATHS = platforms.backend_paths(platforms.current())


@pytest.fixture(params=BACKEND_PATHS, ids=[_PATH_IDS[p] for p in BACKEND_PATHS])
def backend_path(request) -> str:
    """Runs the test that takes it once per mlx_aim.backend path this platform has: "native" (the CPU workarounds with
    the native kernels; Linux, where they are built), "ops" (the workarounds without them: what runs where the
    extension could not be built) and "portable" (no workarounds: what Metal and CUDA run). The parity tests take it.
    The CPU paths run on the CPU stream, named, so that on a Mac they test the CPU and not Metal; the portable path
    runs on the default device (Metal on a Mac, the CPU here). The native path fails, not skips, where the extension
    is meant to exist and is missing: CI builds it, and a silent skip would hide a broken build."""
    if request.param == "native" and not native.available():
        pytest.fail(f"the native kernels are not available: {native.unavailable_reason()}")
    device = mx.default_device() if request.param == "portable" else mx.cpu
    with mx.stream(device), cpu_workarounds(request.param != "portable"), native_kernels(request.param == "native"):
        yield request.param


def tiny_config(**overrides) -> AIMConfig:
    """A tiny AIM: 16-pixel images in 4x4-pixel patches (16 tokens), width 64, depth 4, 10 classes. Tests that
    need other sizes say which fields differ."""
    fields = dict(image_size=16, patch_size=4, width=64, depth=4, num_heads=4, num_classes=10, probe_layers=[1, 2],
                  head_width=32, head_depth=2)
    return AIMConfig(**{**fields, **overrides})


def run_script(path: str, *args, check_rc=0, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `path` (relative to the repository root) with this interpreter and environment, from the repository
    root, capturing its output as text. Asserts the exit status is `check_rc`, unless that is None."""
    result = subprocess.run([sys.executable, str(ROOT / path), *map(str, args)], capture_output=True, text=True,
                            cwd=ROOT, timeout=timeout)
    if check_rc is not None:
        assert result.returncode == check_rc, (f"{path} exited {result.returncode}, expected {check_rc}\n"
                                               f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def last_json(stdout: str) -> dict:
    """The JSON object a script prints on its last line (with --json)."""
    return json.loads(stdout.strip().splitlines()[-1])


def rel_err(a, b) -> float:
    """max |a - b| relative to the reference's scale (max |b|)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# How far a quantized model may be from its dequantized twin, as `rel_err`: in float32 the summation order only (0.0
# measured on all three CPU paths; 1e-4 leaves room for a GPU kernel's order), in bfloat16 its rounding (up to 2.7e-2
# measured over the tiny models' blocks with MLX's own quantized kernel, 2^-8 a matmul).
TWIN_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


def dequantized_twin(model):
    """The float model that runs a quantized model's own weights: its config without quantization, in its float
    dtype, each quantized linear's weight replaced by `mx.dequantize` of its (weight, scales, biases), every other
    parameter as it is. A quantized model must compute what its twin computes, up to float rounding."""
    weights = dict(tree_flatten(model.parameters()))
    for path, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            weights[f"{path}.weight"] = mx.dequantize(weights[f"{path}.weight"], weights.pop(f"{path}.scales"),
                                                      weights.pop(f"{path}.biases"), module.group_size, module.bits)
    twin = build_model(model.config.replace(quantization=None), model.dtype, probe=isinstance(model, Probed))
    twin.load_weights(list(weights.items()), strict=True)
    mx.eval(twin.parameters())
    twin.eval()
    return twin


@pytest.fixture(name="tiny_config")
def tiny_config_fixture() -> AIMConfig:
    return tiny_config()


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(0)
    np.random.seed(0)


@pytest.fixture(scope="module")
def lit_folder(tmp_path_factory):
    """A tiny random-weight AIMv2-LiT folder with CLIP's tokenizer files beside its weights (`lit_helpers`)."""
    from lit_helpers import write_tiny_lit

    return write_tiny_lit(tmp_path_factory.mktemp("lit") / "tiny-lit")


@pytest.fixture(scope="module")
def lit(lit_folder):
    """`mlx_aim.tasks.lit.open_lit(lit_folder)`: the model and its tokenizer."""
    from mlx_aim.tasks.lit import open_lit

    return open_lit(lit_folder)
