"""mlx_aim.backend.native, the C++ kernels: GELU and the attention softmax against float64 and against the paths they replace
(ops, MLX's own), forward, backward, jvp, under mx.compile, on odd shapes and layouts, with the masks the model uses;
and what the package does where the extension is missing or built for another mlx (one warning, the ops path).

These fail, not skip, where the platform builds the extension and it is missing: CI builds it (pip install -e . with a
compiler). Where the platform does not build it (macOS: mlx_aim.platforms.native_kernels_skipped), the module does not
run, and test_platforms.py holds that the package says so."""

import json
import subprocess
import sys
import textwrap

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_aim import _blas, backend, platforms
from mlx_aim.backend import native, ops
from mlx_aim.models.layers import prefix_causal_mask
from test_attention import graph_ops
from test_ops import assert_gelu_within_a_few_ulps, gelu64, gelu_grad64

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
_NOT_BUILT_HERE = platforms.native_kernels_skipped(platforms.current())
pytestmark = pytest.mark.skipif(_NOT_BUILT_HERE is not None, reason=f"native kernels {_NOT_BUILT_HERE}")


@pytest.fixture(autouse=True)
def _on_the_cpu():
    assert native.available(), f"native kernels not built: {native.unavailable_reason()}"
    with mx.stream(mx.cpu):
        yield


def rel(a, b) -> float:
    a, b = np.array(a.astype(mx.float32), dtype=np.float64), np.array(b.astype(mx.float32), dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ----------------------------------------------------------------------------------------------------
# GELU


def test_gelu_float32_within_a_few_ulps_of_float64_and_agrees_with_nn_gelu():
    assert_gelu_within_a_few_ulps(native.gelu)
    z = mx.random.normal((4096,)) * 3.0
    np.testing.assert_allclose(np.array(native.gelu(z)), np.array(nn.gelu(z)), rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.array(native.gelu(z)), np.array(ops.gelu(z)), rtol=0, atol=1e-6)


def test_gelu_special_values():
    x = mx.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e30, -1e30, 3e-39, -3e-39], dtype=mx.float32)
    y = np.array(native.gelu(x))
    assert y[0] == np.inf
    assert y[1] == 0.0 and np.signbit(y[1])
    assert np.isnan(y[2])
    assert y[3] == 0.0 and not np.signbit(y[3])
    assert y[4] == 0.0 and np.signbit(y[4])
    assert y[5] == np.float32(1e30) and y[6] == 0.0
    np.testing.assert_allclose(y[7:], [1.5e-39, -1.5e-39], rtol=1e-6)
    big = np.linspace(6.0, 1000.0, 1001, dtype=np.float32)
    np.testing.assert_array_equal(np.array(native.gelu(mx.array(big))), big)
    np.testing.assert_array_equal(np.array(native.gelu(mx.array(-big))), np.zeros_like(big))


def test_gelu_gradient_matches_analytic_derivative_and_nn_gelu():
    x = np.concatenate([np.linspace(-10.0, 10.0, 40_001), [0.0, -0.0]]).astype(np.float32)
    grad = np.array(mx.grad(lambda v: native.gelu(v).sum())(mx.array(x)), dtype=np.float64)
    err = np.abs(grad - gelu_grad64(x))
    assert err[np.abs(x) < 4.0].max() <= 2e-6
    assert err.max() <= 1e-5
    theirs = np.array(mx.grad(lambda v: nn.gelu(v).sum())(mx.array(x)))
    np.testing.assert_allclose(grad, theirs, rtol=0, atol=1e-5)
    edge = mx.grad(lambda v: native.gelu(v).sum())(mx.array([np.inf, -np.inf, np.nan, 0.0, -0.0]))
    np.testing.assert_array_equal(np.array(edge), [1.0, 0.0, np.nan, 0.5, 0.5])


def test_gelu_jvp_and_vjp_agree_and_vmap_maps():
    x = mx.array(np.linspace(-7.0, 7.0, 1401, dtype=np.float32))
    t = mx.random.normal(x.shape)
    _, (tangent,) = mx.jvp(native.gelu, [x], [t])
    _, (cotangent,) = mx.vjp(native.gelu, [x], [t])
    np.testing.assert_array_equal(np.array(tangent), np.array(cotangent))
    np.testing.assert_allclose(np.array(tangent), np.array(t) * gelu_grad64(np.array(x)), rtol=0, atol=1e-5)
    rows = mx.random.normal((3, 17)) * 3.0
    np.testing.assert_array_equal(np.array(mx.vmap(native.gelu, in_axes=1, out_axes=1)(rows)),
                                  np.array(native.gelu(rows)))


@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 7, 11), (0, 4), (1000, 33), (2, 256, 6144)])
def test_gelu_odd_shapes_compiled_and_not(shape):
    x = mx.random.normal(shape) * 4.0
    eager = native.gelu(x)
    np.testing.assert_allclose(np.array(eager), np.array(nn.gelu(x)), rtol=0, atol=2e-6 * 4)
    np.testing.assert_array_equal(np.array(mx.compile(native.gelu)(x)), np.array(eager))
    w = mx.random.normal(shape)
    grad = mx.grad(lambda v: (native.gelu(v) * w).sum())
    np.testing.assert_array_equal(np.array(mx.compile(grad)(x)), np.array(grad(x)))
    ref = mx.grad(lambda v: (nn.gelu(v) * w).sum())(x)
    np.testing.assert_allclose(np.array(grad(x)), np.array(ref), rtol=0, atol=4e-5)


def test_gelu_reads_transposed_sliced_and_broadcast_inputs():
    base = mx.random.normal((64, 48)) * 3.0
    for x in (base.T, base[::2, 1::3], mx.broadcast_to(base[:1], (5, 48)), base.T[3]):
        np.testing.assert_array_equal(np.array(native.gelu(x)), np.array(native.gelu(mx.array(np.array(x)))))
    g = mx.grad(lambda v: native.gelu(v.T).sum())(base)  # a broadcast cotangent into a transposed input
    np.testing.assert_allclose(np.array(g), gelu_grad64(np.array(base)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_gelu_half_precision_and_integers(dtype):
    x = mx.array(np.linspace(-10.0, 10.0, 2001, dtype=np.float32)).astype(dtype)
    out = native.gelu(x)
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.array(out.astype(mx.float32)),
                                  np.array(native.gelu(x.astype(mx.float32)).astype(dtype).astype(mx.float32)))
    ints = native.gelu(mx.array([-2, 0, 3]))
    assert ints.dtype == mx.float32
    np.testing.assert_allclose(np.array(ints), gelu64([-2, 0, 3]), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="complex64"):
        native.gelu(mx.array([1.0 + 1.0j]))


# ----------------------------------------------------------------------------------------------------
# Softmax and attention


def masks(batch, n):
    """The masks the model makes (backend.prepare_mask of None, "causal", a prefix mask) and a random additive one."""
    return {"none": None, "causal": "causal", "prefix": prefix_causal_mask(mx.array([3, n - 2][:batch]), n),
            "additive": mx.random.normal((batch, 1, n, n))}


@pytest.mark.parametrize("mask_kind", ["none", "causal", "prefix", "additive"])
def test_softmax_matches_mlx_softmax_forward_and_backward(mask_kind):
    B, H, N = 2, 3, 37
    scores = mx.random.normal((B, H, N, N)) * 4.0
    mask = ops.additive_mask(masks(B, N)[mask_kind], N)
    scale = 0.3

    def reference(s):
        return mx.softmax(scale * s + (0.0 if mask is None else mask), axis=-1, precise=True)

    out = native.softmax(scores, mask, scale)
    assert out.shape == scores.shape and rel(out, reference(scores)) < 1e-6
    w = mx.random.normal(scores.shape)
    grad = mx.grad(lambda s: (native.softmax(s, mask, scale) * w).sum())
    ref = mx.grad(lambda s: (reference(s) * w).sum())(scores)
    assert rel(grad(scores), ref) < 1e-5
    assert rel(mx.compile(grad)(scores), ref) < 1e-5
    _, (tangent,) = mx.jvp(lambda s: native.softmax(s, mask, scale), [scores], [w])
    _, (ref_tangent,) = mx.jvp(reference, [scores], [w])
    assert rel(tangent, ref_tangent) < 1e-5


def test_softmax_reads_transposed_scores_and_gives_nan_where_softmax_does():
    scores = mx.random.normal((2, 16, 16))
    np.testing.assert_allclose(np.array(native.softmax(scores.swapaxes(-1, -2), None, 1.0)),
                               np.array(mx.softmax(scores.swapaxes(-1, -2), axis=-1)), rtol=1e-6, atol=1e-7)
    mask = mx.zeros((16, 16)).at[3].add(-mx.inf)  # row 3 masks every key
    out = np.array(native.softmax(scores, mask, 1.0))
    assert np.isnan(out[:, 3]).all() and not np.isnan(np.delete(out, 3, axis=1)).any()
    with_nan = np.array(native.softmax(scores.at[0, 5, 2].add(mx.nan), None, 1.0))
    assert np.isnan(with_nan[0, 5]).all() and not np.isnan(with_nan[1]).any()


@pytest.mark.parametrize("mask_kind", ["none", "causal", "prefix", "additive"])
@pytest.mark.parametrize("shape", [(2, 3, 20, 16), (1, 2, 13, 8), (2, 12, 64, 32)])
def test_attention_matches_the_ops_path_forward_backward_compiled(mask_kind, shape):
    B, H, N, hd = shape
    q, k, v = (mx.random.normal(shape) for _ in range(3))
    mask = backend.prepare_mask(masks(B, N)[mask_kind], N) if mask_kind != "additive" else masks(B, N)[mask_kind]
    scale = hd**-0.5
    out, ref = native.attention(q, k, v, scale, mask), ops.attention(q, k, v, scale, mask)
    assert rel(out, ref) < 1e-5
    assert rel(out, mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)) < 1e-5
    w = mx.random.normal(out.shape)
    grads = mx.grad(lambda a, b, c: (native.attention(a, b, c, scale, mask) * w).sum(), argnums=(0, 1, 2))
    refs = mx.grad(lambda a, b, c: (ops.attention(a, b, c, scale, mask) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    for g, g_compiled, g_ref in zip(grads(q, k, v), mx.compile(grads)(q, k, v), refs):
        assert rel(g, g_ref) < 1e-5 and rel(g_compiled, g_ref) < 1e-5


def test_attention_keeps_half_precision_dtype():
    q = mx.random.normal((1, 2, 8, 4)).astype(mx.bfloat16)
    out = native.attention(q, q, q, 0.5, "causal")
    ref = mx.fast.scaled_dot_product_attention(q, q, q, scale=0.5, mask="causal")
    assert out.dtype == mx.bfloat16 and rel(out, ref) < 2e-2


# ----------------------------------------------------------------------------------------------------
# AIMv2's RMS norm and SwiGLU gate


def rms_norm64(x, w, eps, g):
    """x rsqrt(mean(x^2) + eps) w in float64 numpy, and the gradients of sum(out * g) for x and w."""
    x, w, g = (np.array(t, dtype=np.float64) for t in (x, w, g))
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    gw = g * w
    dx = r * gw - x * r**3 * (gw * x).mean(-1, keepdims=True)
    return x * r * w, dx, (g * x * r).reshape(-1, x.shape[-1]).sum(0)


@pytest.mark.parametrize("shape", [(3, 7), (2, 5, 64), (4, 33, 1024), (1, 3)])
def test_rms_norm_matches_float64_and_mlx_forward_backward_compiled(shape):
    x, g = mx.random.normal(shape) * 3.0, mx.random.normal(shape)
    w = mx.random.normal(shape[-1:])
    out64, dx64, dw64 = rms_norm64(x, w, 1e-5, g)
    assert rel(native.rms_norm(x, w, 1e-5), mx.array(out64)) < 2e-6
    assert rel(native.rms_norm(x, w, 1e-5), mx.fast.rms_norm(x, w, 1e-5)) < 2e-6
    grads = mx.grad(lambda a, b: (native.rms_norm(a, b, 1e-5) * g).sum(), argnums=(0, 1))
    refs = mx.grad(lambda a, b: (mx.fast.rms_norm(a, b, 1e-5) * g).sum(), argnums=(0, 1))(x, w)
    for got, compiled, ref, ref64 in zip(grads(x, w), mx.compile(grads)(x, w), refs, (dx64, dw64)):
        assert rel(got, mx.array(ref64)) < 1e-5 and rel(compiled, ref) < 1e-5


def test_rms_norm_reads_strided_input_and_keeps_half_precision():
    x = mx.random.normal((64, 3, 40)).transpose(1, 0, 2)[:, :, ::2]  # neither row- nor column-contiguous
    w = mx.random.normal((20,))
    assert rel(native.rms_norm(x, w, 1e-6), mx.fast.rms_norm(mx.array(np.array(x)), w, 1e-6)) < 2e-6
    half = native.rms_norm(x.astype(mx.bfloat16), w.astype(mx.bfloat16), 1e-6)
    assert half.dtype == mx.bfloat16 and rel(half, mx.fast.rms_norm(x, w, 1e-6)) < 2e-2
    with pytest.raises(ValueError, match="rms_norm"):
        native.rms_norm(x, mx.ones((7,)), 1e-6)


@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 33, 700)])
def test_silu_gate_matches_float64_and_mlx_forward_backward_compiled(shape):
    a, b, g = (mx.random.normal(shape) * 4.0 for _ in range(3))
    a64, b64, g64 = (np.array(t, dtype=np.float64) for t in (a, b, g))
    s = 1.0 / (1.0 + np.exp(-a64))
    assert rel(native.silu_gate(a, b), mx.array(a64 * s * b64)) < 2e-6
    grads = mx.grad(lambda x, y: (native.silu_gate(x, y) * g).sum(), argnums=(0, 1))
    da64, db64 = g64 * b64 * s * (1 + a64 * (1 - s)), g64 * a64 * s
    refs = mx.grad(lambda x, y: (nn.silu(x) * y * g).sum(), argnums=(0, 1))(a, b)
    for got, compiled, ref, ref64 in zip(grads(a, b), mx.compile(grads)(a, b), refs, (da64, db64)):
        assert rel(got, mx.array(ref64)) < 1e-5 and rel(compiled, ref) < 1e-5


def test_silu_gate_broadcasts_strided_special_values_and_half_precision():
    a = mx.array([np.inf, np.nan, 0.0, -200.0, -np.inf, 3.0], dtype=mx.float32)
    y = np.array(native.silu_gate(a, mx.array(2.0)))  # b broadcast
    assert y[0] == np.inf and np.isnan(y[1]) and y[2] == 0.0 and y[3] == 0.0 and np.isnan(y[4])
    assert y[5] == pytest.approx(2 * 3.0 / (1 + np.exp(-3.0)), rel=1e-6)
    x = mx.random.normal((30, 8)).T  # transposed
    assert rel(native.silu_gate(x, x), nn.silu(x) * x) < 2e-6
    half = native.silu_gate(x.astype(mx.bfloat16), x.astype(mx.bfloat16))
    assert half.dtype == mx.bfloat16 and rel(half, nn.silu(x) * x) < 2e-2


# ----------------------------------------------------------------------------------------------------
# Attention on the packed qkv (packed_attention): the heads read from (B, N, 3 D) and written to (B, N, D) in place

# One query block of the kernel (128 rows) and less; several, the last partial; head dims 16 to 128; one head.
PACKED_SHAPES = [(2, 5, 2, 32), (3, 67, 4, 16), (2, 300, 2, 64), (1, 150, 3, 128), (1, 9, 1, 8)]


def packed_masks(B, H, N):
    """Every mask form the kernel takes: the model's (None, "causal", the boolean prefix mask, each additive as
    backend.prepare_mask makes it), and additive ones of each broadcast shape."""
    forms = dict(masks(B, N), per_head=mx.random.normal((B, H, N, N)), shared=mx.random.normal((N, N)))
    forms["prefix"] = backend.prepare_mask(prefix_causal_mask(mx.array([3, N - 2, 1][:B]), N), N)
    return forms


def split64(qkv, H):
    x = np.array(qkv, dtype=np.float64)
    B, N, D3 = x.shape
    return x.reshape(B, N, 3, H, D3 // (3 * H)).transpose(2, 0, 3, 1, 4)


@pytest.mark.parametrize("mask_kind", ["none", "causal", "prefix", "additive", "per_head", "shared"])
@pytest.mark.parametrize("shape", PACKED_SHAPES)
def test_packed_attention_matches_float64_and_the_split_heads_path_compiled(shape, mask_kind):
    B, N, H, hd = shape
    qkv = mx.random.normal((B, N, 3 * H * hd)) * 1.5
    mask = packed_masks(B, H, N)[mask_kind]
    scale = hd**-0.5
    w = mx.random.normal((B, N, H * hd))
    q, k, v = split64(qkv, H)
    w64 = np.array(w, dtype=np.float64).reshape(B, N, H, hd).transpose(0, 2, 1, 3)
    additive = ops.additive_mask(mask, N)
    out64, (dq, dk, dv) = attention64(q, k, v, scale, w64, None if additive is None else np.array(additive))
    out64 = out64.transpose(0, 2, 1, 3).reshape(B, N, H * hd)
    grad64 = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(B, N, 3 * H * hd)

    out = native.packed_attention(qkv, H, scale, mask)
    assert out.shape == (B, N, H * hd) and rel(out, mx.array(out64)) < 2e-6
    grad = mx.grad(lambda x: (native.packed_attention(x, H, scale, mask) * w).sum())
    assert rel(grad(qkv), mx.array(grad64)) < 1e-5
    with backend.native_kernels(False):  # the ops path on split heads: what the model ran before
        split = mx.grad(lambda x: (backend.qkv_attention(x, H, scale, mask) * w).sum())(qkv)
    assert rel(mx.compile(grad)(qkv), split) < 1e-5
    compiled = mx.compile(lambda x: native.packed_attention(x, H, scale, mask))(qkv)
    assert rel(compiled, mx.fast.scaled_dot_product_attention(
        *(mx.array(t.astype(np.float32)) for t in (q, k, v)), scale=scale,
        mask=additive).transpose(0, 2, 1, 3).reshape(B, N, H * hd)) < 1e-5


def test_packed_attention_reads_a_strided_qkv_keeps_half_precision_and_rejects_bad_shapes():
    qkv = mx.random.normal((3 * 64, 20, 2)).transpose(2, 1, 0)  # (2, 20, 192), not row-contiguous
    ref = native.packed_attention(mx.array(np.array(qkv)), 4, 0.25, "causal")
    assert rel(native.packed_attention(qkv, 4, 0.25, "causal"), ref) == 0.0
    half = native.packed_attention(qkv.astype(mx.bfloat16), 4, 0.25, "causal")
    assert half.dtype == mx.bfloat16 and rel(half, ref) < 2e-2
    with pytest.raises(ValueError, match="packed_attention"):
        native.packed_attention(mx.zeros((2, 8, 30)), 4, 1.0)  # 30 is not 3 D with D divisible by 4 heads
    with pytest.raises(ValueError, match="packed_attention"):
        native.packed_attention(mx.zeros((8, 48)), 4, 1.0)


@pytest.mark.parametrize("threads", [1, 2])
def test_packed_attention_with_a_one_thread_or_threaded_blas(threads):
    """The kernel's threads share the heads and query blocks, each product on one BLAS thread; the BLAS's count is
    back after."""
    qkv, w = mx.random.normal((2, 260, 3 * 96)), mx.random.normal((2, 260, 96))
    mask = backend.prepare_mask(masks(2, 260)["prefix"], 260)
    grad = mx.grad(lambda x: (native.packed_attention(x, 3, 0.2, mask) * w).sum())
    with backend.compute_threads(threads):
        out, g = native.packed_attention(qkv, 3, 0.2, mask), grad(qkv)
        mx.eval(out, g)
        assert _blas.get_num_threads() in (None, threads)
    with backend.native_kernels(False):
        assert rel(out, backend.qkv_attention(qkv, 3, 0.2, mask)) < 1e-5
        assert rel(g, mx.grad(lambda x: (backend.qkv_attention(x, 3, 0.2, mask) * w).sum())(qkv)) < 1e-5


def test_backend_takes_packed_attention_where_attention_would_not_run_blocked(monkeypatch):
    qkv = mx.random.normal((1, 40, 3 * 32))
    prefix = backend.prepare_mask(masks(1, 40)["prefix"], 40)
    monkeypatch.setattr(backend, "FLASH_ATTENTION_MIN_TOKENS", 41)
    for mask in (None, "causal", prefix):
        assert "MlxAimPackedAttention" in graph_ops(backend.qkv_attention(qkv, 2, 0.25, mask))
    monkeypatch.setattr(backend, "FLASH_ATTENTION_MIN_TOKENS", 40)
    ops_used = graph_ops(backend.qkv_attention(qkv, 2, 0.25))  # blocked, on the packed layout: no copies
    assert "MlxAimFlashAttention" in ops_used and not {"MlxAimPackedAttention", "Transpose", "Copy"} & ops_used
    assert "MlxAimPackedAttention" in graph_ops(backend.qkv_attention(qkv, 2, 0.25, prefix))
    with backend.native_kernels(False):
        ops_used = graph_ops(backend.qkv_attention(qkv, 2, 0.25, prefix))
        assert not any(name.startswith("MlxAim") for name in ops_used)


# ----------------------------------------------------------------------------------------------------
# Blocked attention (flash_attention): tiles of 128 queries x 512 keys in the kernel


def attention64(q, k, v, scale, w, mask=None):
    """softmax(scale q k^T + mask) v in float64 numpy (mask additive or None), and the gradients of sum(out * w) for q,
    k and v."""
    q, k, v, w = (np.array(t, dtype=np.float64) for t in (q, k, v, w))
    s = scale * q @ k.swapaxes(-1, -2)
    if mask is not None:
        s = s + np.array(mask, dtype=np.float64)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ v
    dp = w @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
    return out, (ds @ k, ds.swapaxes(-1, -2) @ q, p.swapaxes(-1, -2) @ w)


def flash_grads(scale, w):
    return mx.grad(lambda a, b, c: (native.flash_attention(a, b, c, scale) * w).sum(), argnums=(0, 1, 2))


# Fewer tokens than one tile; several query tiles and a part of one (N not a multiple of 128); two key tiles, the second
# partial (N > 512); head dims 32, 64, 128; batch and heads above 1.
FLASH_SHAPES = [(1, 1, 5, 32), (2, 3, 67, 64), (1, 2, 150, 128), (2, 2, 530, 64)]


@pytest.mark.parametrize("shape", FLASH_SHAPES)
def test_flash_attention_matches_float64_forward_and_backward(shape):
    q, k, v = (mx.random.normal(shape) for _ in range(3))
    w = mx.random.normal(shape)
    scale = shape[-1] ** -0.5
    out64, grads64 = attention64(q, k, v, scale, w)
    assert rel(native.flash_attention(q, k, v, scale), mx.array(out64)) < 2e-6
    for g, g64 in zip(flash_grads(scale, w)(q, k, v), grads64):
        assert rel(g, mx.array(g64)) < 1e-5


@pytest.mark.parametrize("shape", FLASH_SHAPES)
def test_flash_attention_matches_mlx_and_dense_attention_compiled(shape):
    q, k, v = (mx.random.normal(shape) * 2.0 for _ in range(3))  # wider scores: the online maximum moves
    w = mx.random.normal(shape)
    scale = shape[-1] ** -0.5
    fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    assert rel(mx.compile(lambda a, b, c: native.flash_attention(a, b, c, scale))(q, k, v), fused) < 1e-5
    assert rel(native.flash_attention(q, k, v, scale), ops.attention(q, k, v, scale)) < 1e-5
    grads = flash_grads(scale, w)
    refs = mx.grad(lambda a, b, c: (mx.fast.scaled_dot_product_attention(a, b, c, scale=scale) * w).sum(),
                   argnums=(0, 1, 2))(q, k, v)
    dense = mx.grad(lambda a, b, c: (native.attention(a, b, c, scale) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    for g, g_compiled, g_ref, g_dense in zip(grads(q, k, v), mx.compile(grads)(q, k, v), refs, dense):
        assert rel(g, g_ref) < 1e-5 and rel(g_compiled, g_ref) < 1e-5 and rel(g, g_dense) < 1e-5


def test_flash_attention_reads_transposed_inputs_keeps_half_precision_and_propagates_nan():
    x = mx.random.normal((1, 70, 2, 32))  # (batch, tokens, heads, dim), as the trunk's reshape leaves it
    q = x.transpose(0, 2, 1, 3)
    assert rel(native.flash_attention(q, q, q, 0.3), mx.fast.scaled_dot_product_attention(q, q, q, scale=0.3)) < 1e-5
    half = q.astype(mx.bfloat16)
    out = native.flash_attention(half, half, half, 0.3)
    assert out.dtype == mx.bfloat16 and rel(out, mx.fast.scaled_dot_product_attention(half, half, half, scale=0.3)) < 2e-2
    out = np.array(native.flash_attention(q, q.at[0, 1, 5].add(mx.nan), q, 0.3))
    assert np.isnan(out[0, 1]).all() and not np.isnan(out[0, 0]).any()  # a nan key spoils its head's rows only


@pytest.mark.parametrize("threads", [1, 2])
def test_flash_attention_with_a_one_thread_or_threaded_blas(threads):
    """The kernel's threads share the tiles, each product on one BLAS thread; the BLAS's count is back after."""
    q, k, v, w = (mx.random.normal((2, 3, 530, 32)) for _ in range(4))
    with backend.compute_threads(threads):
        out = native.flash_attention(q, k, v, 0.2)
        grads = flash_grads(0.2, w)(q, k, v)
        mx.eval(out, grads)
        assert _blas.get_num_threads() in (None, threads)
    assert rel(out, mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2)) < 1e-5
    refs = mx.grad(lambda a, b, c: (mx.fast.scaled_dot_product_attention(a, b, c, scale=0.2) * w).sum(),
                   argnums=(0, 1, 2))(q, k, v)
    for g, g_ref in zip(grads, refs):
        assert rel(g, g_ref) < 1e-5


def test_flash_attention_rejects_mismatched_shapes():
    q = mx.zeros((1, 2, 8, 16))
    with pytest.raises(ValueError, match="flash_attention"):
        native.flash_attention(q, mx.zeros((1, 2, 8, 8)), mx.zeros((1, 2, 8, 8)), 1.0)
    with pytest.raises(ValueError, match="flash_attention"):
        native.flash_attention(q, mx.zeros((1, 3, 8, 16)), mx.zeros((1, 3, 8, 16)), 1.0)


def peak_bytes_above_inputs(fn) -> int:
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(fn())
    return mx.get_peak_memory() - before


@pytest.mark.parametrize("shape", FLASH_SHAPES)
def test_blocked_packed_attention_matches_float64_and_split_heads_blocked_compiled(shape):
    """flash_attention on the qkv linear's packed layout: the (batch, heads) of FLASH_SHAPES as (B, N, 3 H Dh)."""
    B, H, N, hd = shape
    qkv, w = mx.random.normal((B, N, 3 * H * hd)) * 2.0, mx.random.normal((B, N, H * hd))
    scale = hd**-0.5
    q, k, v = split64(qkv, H)
    out64, (dq, dk, dv) = attention64(q, k, v, scale, np.array(w, dtype=np.float64).reshape(B, N, H, hd)
                                      .transpose(0, 2, 1, 3))
    blocked = mx.grad(lambda x: (native.packed_attention(x, H, scale, blocked=True) * w).sum())
    assert rel(native.packed_attention(qkv, H, scale, blocked=True),
               mx.array(out64.transpose(0, 2, 1, 3).reshape(B, N, H * hd))) < 2e-6
    assert rel(blocked(qkv), mx.array(np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(qkv.shape))) < 1e-5

    def split(x):  # flash_attention on copies of the heads, the layout before
        out = native.flash_attention(*backend.split_heads(x, H), scale)
        return (out.transpose(0, 2, 1, 3).reshape(B, N, H * hd) * w).sum()

    assert rel(mx.compile(blocked)(qkv), mx.grad(split)(qkv)) < 1e-5
    with pytest.raises(ValueError, match="no mask"):
        native.packed_attention(qkv, H, scale, "causal", blocked=True)


def test_flash_attention_never_holds_the_weights_forward_or_backward():
    n, d = 4096, 32
    q, k, v, w = (mx.random.normal((1, 1, n, d)) for _ in range(4))
    mx.eval(q, k, v, w)
    weights = n * n * 4  # one head's (N, N) float32 scores: 64 MiB
    assert peak_bytes_above_inputs(lambda: native.attention(q, k, v, 0.2)) >= weights  # the check can fail
    assert peak_bytes_above_inputs(lambda: native.flash_attention(q, k, v, 0.2)) < weights / 32
    assert peak_bytes_above_inputs(lambda: flash_grads(0.2, w)(q, k, v)) < weights / 16
    qkv, w = mx.random.normal((1, n, 3 * d)), mx.random.normal((1, n, d))
    mx.eval(qkv, w)
    packed = mx.grad(lambda x: (native.packed_attention(x, 1, 0.2, blocked=True) * w).sum())
    assert peak_bytes_above_inputs(lambda: native.packed_attention(qkv, 1, 0.2, blocked=True)) < weights / 32
    assert peak_bytes_above_inputs(lambda: packed(qkv)) < weights / 16


def test_backend_takes_blocked_attention_only_unmasked_from_its_threshold(monkeypatch):
    q = mx.random.normal((1, 2, 40, 16))
    monkeypatch.setattr(backend, "FLASH_ATTENTION_MIN_TOKENS", 40)
    assert "MlxAimFlashAttention" in graph_ops(backend.attention(q, q, q, 0.25))
    for mask in ("causal", backend.prepare_mask(masks(1, 40)["prefix"], 40)):
        ops_used = graph_ops(backend.attention(q, q, q, 0.25, mask))
        assert "MlxAimFlashAttention" not in ops_used and "MlxAimMaskedSoftmax" in ops_used
    monkeypatch.setattr(backend, "FLASH_ATTENTION_MIN_TOKENS", 41)
    assert "MlxAimFlashAttention" not in graph_ops(backend.attention(q, q, q, 0.25))
    with backend.native_kernels(False):
        monkeypatch.setattr(backend, "FLASH_ATTENTION_MIN_TOKENS", 1)
        assert "MlxAimFlashAttention" not in graph_ops(backend.attention(q, q, q, 0.25))


def test_a_native_resolution_encoder_through_blocked_attention_matches_dense(monkeypatch):
    """A tiny native-resolution AIMv2 (100 tokens) with the threshold lowered: features and their gradients as the
    dense path gives them, compiled."""
    from mlx_aim.models.model import build_model
    from test_aimv2 import tiny_native

    model = build_model(tiny_native())
    images = mx.random.normal((2, 40, 40, 3))
    w = mx.random.normal((2, 100, 64))

    def loss(x):  # the last block's features against fixed weights (the final norm's output is scale-free in x)
        return (model.extract_features(x)[1][-1] * w).sum()

    monkeypatch.setattr(backend, "FLASH_ATTENTION_MIN_TOKENS", 100)
    assert "MlxAimFlashAttention" in graph_ops(loss(images))
    blocked = mx.compile(mx.value_and_grad(loss))(images)
    monkeypatch.setattr(backend, "FLASH_ATTENTION_MIN_TOKENS", 101)
    assert "MlxAimFlashAttention" not in graph_ops(loss(images))
    dense = mx.value_and_grad(loss)(images)
    assert rel(blocked[0], dense[0]) < 1e-5 and rel(blocked[1], dense[1]) < 1e-5


def test_a_training_step_through_native_and_ops_paths_agrees():
    """A tiny AIM block's loss and gradients (GELU and attention inside, prefix mask, compiled) on both CPU paths."""
    from mlx.utils import tree_flatten

    from mlx_aim.models import layers

    block = layers.aim_block(32, 4, 4.0, 1e-6)
    x, r = mx.random.normal((2, 12, 32)), mx.random.normal((2, 12, 32))
    mask = prefix_causal_mask(mx.array([2, 7]), 12)
    mx.eval(block.parameters())

    def run(native_on):
        def loss(params):
            block.update(params)
            return (block(x, backend.prepare_mask(mask, 12)) * r).sum()

        with backend.cpu_workarounds(True), backend.native_kernels(native_on):
            assert backend.backend_path() == ("native" if native_on else "ops")
            params = block.trainable_parameters()
            value, grads = mx.compile(mx.value_and_grad(loss))(params)
            block.update(params)  # the arrays themselves back in place of the traced ones
            mx.eval(value, grads)
        return value, dict(tree_flatten(grads))

    (v_native, g_native), (v_ops, g_ops) = run(True), run(False)
    assert abs(v_native.item() - v_ops.item()) <= 1e-5 * abs(v_ops.item())
    for key in g_ops:
        assert rel(g_native[key], g_ops[key]) < 1e-4, key


# ----------------------------------------------------------------------------------------------------
# Layer norm


@pytest.mark.parametrize("shape", [(4, 256, 384), (3, 7), (1, 1, 1536), (0, 16)])
def test_layer_norm_matches_mx_fast_forward_backward_compiled(shape):
    x = mx.random.normal(shape) * 3.0 + 1.5
    w, b = mx.random.normal(shape[-1:]), mx.random.normal(shape[-1:])
    out, ref = native.layer_norm(x, w, b, 1e-6), mx.fast.layer_norm(x, w, b, 1e-6)
    assert out.shape == ref.shape
    if x.size == 0:
        return
    x64 = np.array(x, dtype=np.float64)
    ref64 = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6) * np.array(w) + np.array(b)
    np.testing.assert_allclose(np.array(out), ref64, rtol=0, atol=2e-6 * np.abs(ref64).max())
    assert rel(out, ref) < 2e-6
    c = mx.random.normal(shape)
    grads = mx.grad(lambda a, g, h: (native.layer_norm(a, g, h, 1e-6) * c).sum(), argnums=(0, 1, 2))
    refs = mx.grad(lambda a, g, h: (mx.fast.layer_norm(a, g, h, 1e-6) * c).sum(), argnums=(0, 1, 2))(x, w, b)
    for g, g_compiled, g_ref in zip(grads(x, w, b), mx.compile(grads)(x, w, b), refs):
        assert rel(g, g_ref) < 1e-5 and rel(g_compiled, g_ref) < 1e-5


def test_layer_norm_reads_transposed_input_and_keeps_half_precision():
    x = mx.random.normal((48, 32))
    w, b = mx.random.normal((48,)), mx.random.normal((48,))
    assert rel(native.layer_norm(x.T, w, b, 1e-6), mx.fast.layer_norm(x.T, w, b, 1e-6)) < 2e-6
    xh = x.T.astype(mx.bfloat16)
    out = native.layer_norm(xh, w.astype(mx.bfloat16), b.astype(mx.bfloat16), 1e-6)
    assert out.dtype == mx.bfloat16
    assert rel(out, mx.fast.layer_norm(xh, w.astype(mx.bfloat16), b.astype(mx.bfloat16), 1e-6)) < 2e-2
    with pytest.raises(ValueError, match="weight and bias"):
        native.layer_norm(x, w, b, 1e-6)


def test_backend_layer_norm_is_an_nn_layer_norm_with_the_same_parameters():
    norm = backend.LayerNorm(64, eps=1e-6)
    assert isinstance(norm, nn.LayerNorm) and set(dict(norm.parameters())) == {"weight", "bias"}
    norm.update({"weight": mx.random.normal((64,)), "bias": mx.random.normal((64,))})
    x = mx.random.normal((5, 64))
    with backend.cpu_workarounds(True), backend.native_kernels(True):
        assert rel(norm(x), nn.LayerNorm.__call__(norm, x)) < 2e-6
        assert "MlxAimLayerNorm" in graph_ops(norm(x))
    with backend.native_kernels(False):
        assert "MlxAimLayerNorm" not in graph_ops(norm(x))


# ----------------------------------------------------------------------------------------------------
# Where the extension cannot be used


def run_python(*parts: str) -> dict:
    """Runs the code (parts dedented one by one, then joined) in a fresh interpreter; its last line's JSON."""
    code = "".join(textwrap.dedent(part) for part in parts)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


FALLBACK_PROBE = """
    import json, warnings
    import numpy as np
    from mlx_aim import backend
    from mlx_aim.backend import native, ops
    x = mx.random.normal((64,)) * 3.0
    with warnings.catch_warnings(record=True) as caught, mx.stream(mx.cpu):
        warnings.simplefilter("always")
        outs = [backend.gelu(x), backend.gelu(x), backend.attention(x.reshape(1, 1, 8, 8), x.reshape(1, 1, 8, 8),
                                                                     x.reshape(1, 1, 8, 8), 0.5)]
        same = bool(np.array_equal(np.array(outs[0]), np.array(ops.gelu(x))))
        path = backend.backend_path()
    print(json.dumps({"available": native.available(), "reason": native.unavailable_reason(), "path": path,
                      "warnings": [str(w.message) for w in caught], "same_as_ops": same}))
"""


def test_without_the_extension_the_ops_path_runs_and_says_why_once():
    result = run_python("""
        import sys
        class NoExtension:  # as on a machine where pip could not build it
            def find_spec(self, name, path=None, target=None):
                if name == "mlx_aim._native_kernels":
                    raise ImportError("not built")
        sys.meta_path.insert(0, NoExtension())
        import mlx.core as mx
    """, FALLBACK_PROBE)
    assert not result["available"] and "not built" in result["reason"]
    assert result["path"] == "ops" and result["same_as_ops"]
    assert len(result["warnings"]) == 1 and "native CPU kernels unavailable" in result["warnings"][0]
    assert "not built" in result["warnings"][0]


def test_an_extension_built_for_another_mlx_is_not_used():
    result = run_python("""
        import mlx.core as mx
        mx.__version__ = "0.0.1"  # the installed mlx differs from the one the extension was compiled against
    """, FALLBACK_PROBE)
    assert not result["available"] and "mlx 0.0.1 is installed" in result["reason"]
    assert result["path"] == "ops" and len(result["warnings"]) == 1


def test_thread_count_can_be_set_and_gives_the_same_values():
    x = mx.random.normal((64, 6144)) * 3.0
    before, threads = np.array(native.gelu(x)), native.num_threads()
    try:
        native.set_num_threads(1)
        assert native.num_threads() == 1
        np.testing.assert_array_equal(np.array(native.gelu(x)), before)
        native.set_num_threads(3)
        np.testing.assert_array_equal(np.array(native.gelu(x)), before)
        with pytest.raises(ValueError, match="threads=0"):
            native.set_num_threads(0)
    finally:
        native.set_num_threads(threads)


def test_compute_threads_sets_the_blas_and_native_threads_for_the_block_then_restores_them():
    blas_before, native_before = _blas.get_num_threads(), native.num_threads()
    assert _blas.blas_info()["loaded"] == (blas_before is not None)
    x = mx.random.normal((64, 6144))
    expected = np.array(native.gelu(x))
    with backend.compute_threads(1):
        assert native.num_threads() == 1 and _blas.get_num_threads() in (None, 1)
        assert blas_before is None or _blas.get_num_threads() == 1
        np.testing.assert_array_equal(np.array(native.gelu(x)), expected)
    assert (_blas.get_num_threads(), native.num_threads()) == (blas_before, native_before)
    with pytest.raises(KeyError), backend.compute_threads(1):
        raise KeyError("an error inside the block")
    assert (_blas.get_num_threads(), native.num_threads()) == (blas_before, native_before)
    with backend.compute_threads(0):  # 0 leaves both as they are
        assert (_blas.get_num_threads(), native.num_threads()) == (blas_before, native_before)
    with pytest.raises(ValueError, match="threads=-1"), backend.compute_threads(-1):
        pass


def test_the_environment_variable_forces_the_ops_path(monkeypatch):
    monkeypatch.setenv(backend.NATIVE_ENV, "0")
    assert not backend.use_native_kernels() and backend.backend_path() == "ops"
    monkeypatch.setenv(backend.NATIVE_ENV, "on")
    assert backend.use_native_kernels()
    monkeypatch.setenv(backend.NATIVE_ENV, "perhaps")
    with pytest.raises(ValueError, match="MLX_AIM_NATIVE='perhaps'"):
        backend.native_kernels_enabled()
