"""The CPU fast paths: ops.attention against MLX's fused attention, the vectorised exp, and the float32 matmul
of half-precision and quantized linears against MLX's own layers; mlx_aim.backend's switch between them and the
portable path (what Metal and CUDA run), and attention on both paths against a float64 PyTorch reference."""

import io
import math
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from mlx_aim import backend, platforms
from mlx_aim.backend import native, ops
from mlx_aim._blas import blas_info, set_num_threads
from mlx_aim.backend import Linear, QuantizedLinear, cpu_workarounds, native_kernels
from mlx_aim.models.layers import prefix_causal_mask
from mlx_aim.backend.ops import additive_mask, attention, dequantizer, exp_nonpositive


def rel(a, b):
    a, b = np.array(a.astype(mx.float32), dtype=np.float64), np.array(b.astype(mx.float32), dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_exp_nonpositive_is_float32_accurate_with_its_edge_values():
    y = np.concatenate([-np.geomspace(1e-8, 87.0, 20_000), np.linspace(-20.0, 0.0, 20_001)]).astype(np.float32)
    got = np.array(exp_nonpositive(mx.array(y)), dtype=np.float64)
    ref = np.exp(y.astype(np.float64))
    # Within 2 float32 ulps beyond what rounding y * log2(e) costs (|y| ulps of relative error).
    bound = (2.0 + 2.0 * np.abs(y)) * np.finfo(np.float32).eps * ref
    assert np.all(np.abs(got - ref) <= bound)
    edge = np.array(exp_nonpositive(mx.array([0.0, -0.0, -88.0, -200.0, -np.inf, np.nan], dtype=mx.float32)))
    assert edge[0] == 1.0 and edge[1] == 1.0 and np.all(edge[2:5] == 0.0) and np.isnan(edge[5])


@pytest.mark.parametrize("mask_kind", ["none", "causal", "prefix", "additive"])
def test_attention_matches_fused_attention_forward_and_backward(mask_kind):
    mx.random.seed(1)
    B, H, N, hd = 2, 3, 20, 16
    q, k, v = (mx.random.normal((B, H, N, hd)) for _ in range(3))
    mask = {"none": None, "causal": "causal", "prefix": prefix_causal_mask(mx.array([3, 11]), N),
            "additive": mx.random.normal((B, 1, N, N))}[mask_kind]
    scale = hd**-0.5
    with mx.stream(mx.cpu):
        ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        out = attention(q, k, v, scale, mask)
        assert out.shape == ref.shape and rel(out, ref) < 1e-5
        w = mx.random.normal(ref.shape)
        grads_ref = mx.grad(lambda a, b, c: (mx.fast.scaled_dot_product_attention(a, b, c, scale=scale, mask=mask)
                                             * w).sum(), argnums=(0, 1, 2))(q, k, v)
        grads = mx.grad(lambda a, b, c: (attention(a, b, c, scale, mask) * w).sum(), argnums=(0, 1, 2))(q, k, v)
        for g, g_ref in zip(grads, grads_ref):
            assert rel(g, g_ref) < 1e-5
        compiled = mx.compile(mx.grad(lambda a: (attention(a, k, v, scale, mask) * w).sum()))
        assert rel(compiled(q), grads_ref[0]) < 1e-5


def test_attention_keeps_half_precision_dtype():
    q = mx.random.normal((1, 2, 8, 4)).astype(mx.bfloat16)
    with mx.stream(mx.cpu):
        out = attention(q, q, q, 0.5, "causal")
        ref = mx.fast.scaled_dot_product_attention(q, q, q, scale=0.5, mask="causal")
    assert out.dtype == mx.bfloat16 and rel(out, ref) < 2e-2


def test_additive_mask_forms():
    assert additive_mask(None, 4) is None
    causal = np.array(additive_mask("causal", 3))
    assert np.array_equal(causal == 0, np.tril(np.ones((3, 3), bool)))
    assert np.all(np.isneginf(causal[np.triu_indices(3, 1)]))
    with pytest.raises(ValueError, match="'diagonal'"):
        additive_mask("diagonal", 3)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_half_precision_linear_matches_mlx_linear(dtype):
    mx.random.seed(2)
    ours = Linear(64, 48, bias=True)
    ours.set_dtype(dtype)
    theirs = nn.Linear(64, 48, bias=True)
    theirs.update(ours.parameters())
    x = mx.random.normal((5, 64)).astype(dtype)
    with mx.stream(mx.cpu), cpu_workarounds(True):
        out, ref = ours(x), theirs(x)
    assert out.dtype == dtype and rel(out, ref) < 2 ** -6  # a few half-precision roundings apart at most


def test_quantized_linear_is_what_nn_quantize_makes_and_matches_mlx():
    mx.random.seed(3)
    model = nn.Sequential(Linear(128, 64, bias=False))
    nn.quantize(model, 64, 4)
    layer = model.layers[0]
    assert isinstance(layer, QuantizedLinear) and isinstance(layer, nn.QuantizedLinear)
    ref = nn.QuantizedLinear(128, 64, bias=False, group_size=64, bits=4)
    ref.update(layer.parameters())
    x = mx.random.normal((7, 128))
    with mx.stream(mx.cpu), cpu_workarounds(True):
        assert rel(layer(x), ref(x)) < 1e-5


def test_set_num_threads():
    with pytest.raises(ValueError, match="threads=0"):
        set_num_threads(0)
    changed = set_num_threads(1)
    assert changed == bool(blas_info()["loaded"])
    if changed:
        assert blas_info()["threads"] == 1
        set_num_threads(platforms.probe_compute_threads())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_compiled_dequantizer_is_mx_dequantize_bit_for_bit(bits, dtype):
    for group_size in (32, 64, 128):
        w = mx.random.normal((48, 256)).astype(dtype)
        packed = mx.quantize(w, group_size, bits)
        ref, ours = mx.dequantize(*packed, group_size, bits), dequantizer(bits, group_size)(*packed)
        assert ours.dtype == ref.dtype
        assert np.array_equal(np.array(ours.astype(mx.float32)), np.array(ref.astype(mx.float32)))


# ----------------------------------------------------------------------------------------------------
# mlx_aim.backend: which implementation each path runs, and attention on both against float64


def graph_ops(y: mx.array) -> set[str]:
    """The names of the primitives that compute y (MLX's graph, before evaluation)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, y)
    return set(re.findall(r'label ="(\w+)"', dot.getvalue()))


def torch_attention64(q, k, v, scale, mask):
    """softmax(scale q k^T + mask) v in float64 with PyTorch, mask as MLX takes it (None, "causal", bool, float)."""
    q, k, v = (torch.tensor(np.array(t), dtype=torch.float64, requires_grad=True) for t in (q, k, v))
    scores = scale * q @ k.transpose(-1, -2)
    if isinstance(mask, str):
        mask = np.tril(np.ones((q.shape[-2], k.shape[-2]), bool))
    if mask is not None:
        mask = torch.tensor(np.array(mask))
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.double()
    return scores.softmax(-1) @ v, (q, k, v)


@pytest.mark.parametrize("mask_kind", ["none", "causal", "prefix", "additive"])
def test_trunk_attention_on_both_paths_matches_float64(backend_path, mask_kind):
    """The trunk's route (prepare_mask once, then backend.attention), forward and gradients."""
    mx.random.seed(4)
    B, H, N, hd = 2, 3, 20, 16
    q, k, v = (mx.random.normal((B, H, N, hd)) for _ in range(3))
    mask = {"none": None, "causal": "causal", "prefix": prefix_causal_mask(mx.array([3, 11]), N),
            "additive": mx.random.normal((B, 1, N, N))}[mask_kind]
    scale = hd**-0.5
    prepared = backend.prepare_mask(mask, N)
    out = backend.attention(q, k, v, scale, prepared)
    ref, inputs = torch_attention64(q, k, v, scale, mask)
    # 1e-5 of the largest value: float32 sums of 16 products (q k^T) and 20 terms (probs v) stay within a few
    # float32 ulps of float64 in any order of accumulation, the CPU BLAS's or a GPU's tiled, fused kernel's alike.
    assert rel(out, mx.array(ref.detach().numpy().astype(np.float32))) < 1e-5
    w = mx.random.normal(out.shape)
    (ref * torch.tensor(np.array(w), dtype=torch.float64)).sum().backward()
    grads = mx.grad(lambda a, b, c: (backend.attention(a, b, c, scale, prepared) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    for g, t in zip(grads, inputs):
        assert rel(g, mx.array(t.grad.numpy().astype(np.float32))) < 1e-5


def test_each_path_runs_its_own_implementation():
    mx.random.seed(5)
    x = mx.random.normal((4, 300)) * 3.0
    q, k, v = (mx.random.normal((1, 2, 12, 8)) for _ in range(3))
    mask = prefix_causal_mask(mx.array([5]), 12)
    half = Linear(64, 32, bias=False)
    half.set_dtype(mx.bfloat16)
    quantized = nn.Sequential(Linear(128, 64, bias=False))
    nn.quantize(quantized, 64, 4)
    xh, xq = mx.random.normal((3, 64)).astype(mx.bfloat16), mx.random.normal((3, 128))
    mx.eval(half.parameters(), quantized.parameters(), xh, xq)  # so that their graphs hold only the layers' ops
    # The two implementations differ in their last bits, so bit-for-bit equality says which one ran.
    assert not np.array_equal(np.array(ops.gelu(x)), np.array(nn.gelu(x)))
    fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
    assert not np.array_equal(np.array(attention(q, k, v, 0.3, mask)), np.array(fused))

    if "native" in platforms.backend_paths(platforms.current()):  # where the kernels are built (Linux)
        with mx.stream(mx.cpu), cpu_workarounds(True), native_kernels(True):
            assert backend.use_native_kernels() and backend.backend_path() == "native"
            assert "MlxAimGelu" in graph_ops(backend.gelu(x))
            assert "MlxAimMaskedSoftmax" in graph_ops(backend.attention(q, k, v, 0.3, backend.prepare_mask(mask, 12)))
            np.testing.assert_array_equal(np.array(backend.gelu(x)), np.array(native.gelu(x)))

    with mx.stream(mx.cpu), cpu_workarounds(True), native_kernels(False):
        assert backend.use_cpu_workarounds() and not backend.use_native_kernels()
        assert backend.backend_path() == "ops"
        np.testing.assert_array_equal(np.array(backend.gelu(x)), np.array(ops.gelu(x)))
        np.testing.assert_array_equal(np.array(backend.attention(q, k, v, 0.3, mask)),
                                      np.array(attention(q, k, v, 0.3, mask)))
        prepared = backend.prepare_mask(mask, 12)
        assert prepared.dtype == mx.float32 and np.array_equal(np.array(prepared) == 0, np.array(mask))
        assert {"AsType", "Matmul"} <= graph_ops(half(xh))  # multiplied in float32
        assert "QuantizedMatmul" not in graph_ops(quantized(xq))  # dequantized, then the float32 BLAS

    with mx.stream(mx.cpu), cpu_workarounds(False):
        assert not backend.use_cpu_workarounds() and backend.backend_path() == "portable"
        np.testing.assert_array_equal(np.array(backend.gelu(x)), np.array(nn.gelu(x)))
        np.testing.assert_array_equal(np.array(backend.attention(q, k, v, 0.3, mask)), np.array(fused))
        assert backend.prepare_mask(mask, 12) is mask and backend.prepare_mask("causal", 12) == "causal"
        assert "AsType" not in graph_ops(half(xh))
        assert "QuantizedMatmul" in graph_ops(quantized(xq))


def test_a_gpu_default_device_takes_the_portable_path(monkeypatch):
    """What a Mac (Metal) or CUDA runs, whatever the switch says: the device decides first."""
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    with cpu_workarounds(True):
        assert not backend.use_cpu_workarounds()
        x = mx.random.normal((64,)) * 3.0
        np.testing.assert_array_equal(np.array(backend.gelu(x)), np.array(nn.gelu(x)))
        assert backend.prepare_mask("causal", 8) == "causal"


@pytest.mark.parametrize("value, enabled", [(None, True), ("", True), ("1", True), ("on", True), ("TRUE", True),
                                            ("0", False), ("off", False), (" False ", False)])
def test_environment_variable_switches_the_workarounds(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv(backend.CPU_WORKAROUNDS_ENV, raising=False)
    else:
        monkeypatch.setenv(backend.CPU_WORKAROUNDS_ENV, value)
    assert backend.cpu_workarounds_enabled() is enabled
    with mx.stream(mx.cpu):
        assert backend.use_cpu_workarounds() is enabled


def test_unknown_environment_value_is_an_error(monkeypatch):
    monkeypatch.setenv(backend.CPU_WORKAROUNDS_ENV, "maybe")
    with pytest.raises(ValueError, match="MLX_AIM_CPU_WORKAROUNDS='maybe'"):
        backend.cpu_workarounds_enabled()


def test_context_manager_overrides_the_environment_and_restores(monkeypatch):
    monkeypatch.setenv(backend.CPU_WORKAROUNDS_ENV, "0")
    with cpu_workarounds(True):
        assert backend.cpu_workarounds_enabled()
        with pytest.raises(RuntimeError), cpu_workarounds(False):
            assert not backend.cpu_workarounds_enabled()
            raise RuntimeError
        assert backend.cpu_workarounds_enabled()
    assert not backend.cpu_workarounds_enabled()
