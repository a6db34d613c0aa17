"""The CPU fast paths: ops.attention against MLX's fused attention, the vectorised exp, and the float32 matmul
of half-precision and quantized linears against MLX's own layers."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_aim._blas import blas_info, set_num_threads
from mlx_aim.layers import Linear, QuantizedLinear, prefix_causal_mask
from mlx_aim.ops import _exp_nonpositive, additive_mask, attention


def rel(a, b):
    a, b = np.array(a.astype(mx.float32), dtype=np.float64), np.array(b.astype(mx.float32), dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_exp_nonpositive_is_float32_accurate_with_its_edge_values():
    y = np.concatenate([-np.geomspace(1e-8, 87.0, 20_000), np.linspace(-20.0, 0.0, 20_001)]).astype(np.float32)
    got = np.array(_exp_nonpositive(mx.array(y)), dtype=np.float64)
    ref = np.exp(y.astype(np.float64))
    # Within 2 float32 ulps beyond what rounding y * log2(e) costs (|y| ulps of relative error).
    bound = (2.0 + 2.0 * np.abs(y)) * np.finfo(np.float32).eps * ref
    assert np.all(np.abs(got - ref) <= bound)
    edge = np.array(_exp_nonpositive(mx.array([0.0, -0.0, -88.0, -200.0, -np.inf, np.nan], dtype=mx.float32)))
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
    with mx.stream(mx.cpu):
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
    with mx.stream(mx.cpu):
        assert rel(layer(x), ref(x)) < 1e-5


def test_set_num_threads():
    with pytest.raises(ValueError, match="threads=0"):
        set_num_threads(0)
    changed = set_num_threads(1)
    assert changed == bool(blas_info()["loaded"])
    if changed:
        assert blas_info()["threads"] == 1
        set_num_threads(max(1, math.floor(len(__import__("os").sched_getaffinity(0)))))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_compiled_dequantizer_is_mx_dequantize_bit_for_bit(bits, dtype):
    from mlx_aim.layers import _dequantizer

    for group_size in (32, 64, 128):
        w = mx.random.normal((48, 256)).astype(dtype)
        packed = mx.quantize(w, group_size, bits)
        ref, ours = mx.dequantize(*packed, group_size, bits), _dequantizer(bits, group_size)(*packed)
        assert ours.dtype == ref.dtype
        assert np.array_equal(np.array(ours.astype(mx.float32)), np.array(ref.astype(mx.float32)))
