"""mlx_aim.backend.ops.gelu: exact (erf) GELU to float32 accuracy, for every dtype, with a usable gradient; and the GELU
mlx_aim.backend picks, on both its paths. Then the same for ops.silu (AIMv2's SwiGLU gate)."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_aim import backend
from mlx_aim.backend.ops import gelu, gelu_polynomial, silu

EPS32 = float(np.finfo(np.float32).eps)
_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def gelu64(x) -> np.ndarray:
    """x * Phi(x) in float64, with Phi through erfc so the negative tail keeps its digits."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * _erfc(-x / math.sqrt(2.0))


def gelu_grad64(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * _erfc(-x / math.sqrt(2.0)) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def dense_grid() -> np.ndarray:
    """Every region: the core, both tails, around the erf clamp (|x| = 4 sqrt 2), tiny and huge values."""
    tiny = np.geomspace(1e-38, 1e-2, 2000)
    huge = np.geomspace(10.0, 1e30, 200)
    return np.concatenate([
        np.linspace(-12.0, 12.0, 240_001), np.linspace(-6.0, -5.0, 20_001), np.linspace(5.0, 6.0, 20_001),
        tiny, -tiny, huge, -huge,
    ]).astype(np.float32)


def assert_gelu_within_a_few_ulps(gelu_fn) -> None:
    """`gelu_fn` on `dense_grid()` in float32, within 4 float32 ulps of the float64 GELU."""
    x = dense_grid()
    out = gelu_fn(mx.array(x))
    assert out.dtype == mx.float32
    err = np.abs(np.array(out, dtype=np.float64) - gelu64(x))
    # For x < 0 every float32 erf-form GELU loses digits to 1 + erf(x) cancelling, so the honest yardstick is
    # the input's scale: at most 4 float32 ulps of max(|x|, 1) (nn.gelu and torch reach about 2.5).
    assert np.max(err / (EPS32 * np.maximum(np.abs(x), 1.0))) <= 4.0
    # Where the output has the input's scale (x >= 0), the same bound in ulps of the output itself.
    pos = x >= 0
    ref_pos = np.abs(gelu64(x[pos])).astype(np.float32)
    assert np.all(err[pos] <= 4.0 * np.spacing(np.maximum(ref_pos, np.float32(1e-38))).astype(np.float64))


def test_float32_within_a_few_ulps_of_float64():
    assert_gelu_within_a_few_ulps(gelu)


def test_agrees_with_nn_gelu():
    x = mx.random.normal((4096,)) * 3.0
    mine, theirs = np.array(gelu(x)), np.array(nn.gelu(x))
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=2e-6)


def test_special_values():
    x = mx.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e30, -1e30, 3e-39, -3e-39], dtype=mx.float32)
    y = np.array(gelu(x))
    assert y[0] == np.inf
    assert y[1] == 0.0 and np.signbit(y[1])  # the limit, not -inf * 0 = nan
    assert np.isnan(y[2])
    assert y[3] == 0.0 and not np.signbit(y[3])
    assert y[4] == 0.0 and np.signbit(y[4])
    assert y[5] == np.float32(1e30)
    assert y[6] == 0.0
    np.testing.assert_allclose(y[7:], [1.5e-39, -1.5e-39], rtol=1e-6)


def test_large_positive_is_identity_and_large_negative_is_zero():
    x = np.linspace(6.0, 1000.0, 1001, dtype=np.float32)
    np.testing.assert_array_equal(np.array(gelu(mx.array(x))), x)
    np.testing.assert_array_equal(np.array(gelu(mx.array(-x))), np.zeros_like(x))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_is_float32_rounded_once(dtype):
    x = mx.array(np.linspace(-10.0, 10.0, 20_001, dtype=np.float32)).astype(dtype)
    out = gelu(x)
    assert out.dtype == dtype
    x32 = np.array(x.astype(mx.float32))
    ref = gelu64(x32)
    got = np.array(out.astype(mx.float32), dtype=np.float64)
    # One rounding to `dtype` (half its ulp at the output) plus the float32 computation's error.
    ulp = np.array((mx.array(np.abs(ref).astype(np.float32)).astype(dtype)).astype(mx.float32), dtype=np.float64)
    ulp *= 2.0 ** -(10 if dtype == mx.float16 else 7)
    bound = ulp + 4.0 * EPS32 * np.maximum(np.abs(x32), 1.0) + 1e-7  # + 1e-7: the subnormal range
    assert np.all(np.abs(got - ref) <= bound)


def test_integer_input_gives_float32():
    out = gelu(mx.array([-2, 0, 3]))
    assert out.dtype == mx.float32
    np.testing.assert_allclose(np.array(out), gelu64([-2, 0, 3]), rtol=1e-6, atol=1e-7)


def test_float64_keeps_dtype_at_float32_accuracy():
    x = np.linspace(-8.0, 8.0, 1601)
    with mx.stream(mx.cpu):  # MLX has float64 on the CPU only
        out = gelu(mx.array(x, dtype=mx.float64))
        assert out.dtype == mx.float64
        err = np.abs(np.array(out) - gelu64(x))
    assert np.all(err <= 4.0 * EPS32 * np.maximum(np.abs(x), 1.0))


def test_complex_input_is_rejected():
    with pytest.raises(ValueError, match="complex64"):
        gelu(mx.array([1.0 + 1.0j]))


def test_gradient_matches_analytic_derivative_and_nn_gelu():
    x = np.concatenate([np.linspace(-10.0, 10.0, 40_001), [0.0, -0.0]]).astype(np.float32)
    grad = np.array(mx.grad(lambda v: gelu(v).sum())(mx.array(x)), dtype=np.float64)
    err = np.abs(grad - gelu_grad64(x))
    core = np.abs(x) < 4.0
    assert err[core].max() <= 2e-6
    # Worst just inside the erf clamp (|x| ~ 5.6), where the rational fit's slope is least exact.
    assert err.max() <= 1e-5
    theirs = np.array(mx.grad(lambda v: nn.gelu(v).sum())(mx.array(x)))
    np.testing.assert_allclose(grad, theirs, rtol=0, atol=1e-5)


def test_closed_form_gradient_is_the_derivative_of_the_forward():
    """The custom VJP's closed form equals autodiff through the forward's own ops, and jvp agrees."""
    x = mx.array(np.linspace(-7.0, 7.0, 14_001, dtype=np.float32))
    ours = mx.grad(lambda v: gelu(v).sum())(x)
    autodiff = mx.grad(lambda v: gelu_polynomial(v).sum())(x)
    # Both are float32 evaluations of one derivative; they part by rounding, most where |x| > 5.
    np.testing.assert_allclose(np.array(ours), np.array(autodiff), rtol=0, atol=2e-6)
    _, (tangent,) = mx.jvp(gelu, [x], [mx.ones_like(x)])
    np.testing.assert_allclose(np.array(tangent), np.array(autodiff), rtol=0, atol=2e-6)
    edge = mx.grad(lambda v: gelu(v).sum())(mx.array([np.inf, -np.inf, np.nan, 0.0, -0.0]))
    np.testing.assert_array_equal(np.array(edge), [1.0, 0.0, np.nan, 0.5, 0.5])


def test_bfloat16_gradient_keeps_dtype():
    x = mx.array([-3.0, -0.5, 0.0, 0.5, 3.0], dtype=mx.bfloat16)
    g = mx.grad(lambda v: gelu(v).astype(mx.float32).sum())(x)
    assert g.dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(g.astype(mx.float32)), gelu_grad64(np.array(x.astype(mx.float32))),
                               rtol=1e-2, atol=1e-2)


def test_inside_compile_and_across_shapes():
    # Same graph as gelu alone, so MLX's CPU JIT reuses its kernels (a new fused graph costs seconds of g++).
    outer = mx.compile(lambda v: gelu(v))
    for shape in [(3, 5), (2, 7, 11), (1,)]:
        x = mx.random.normal(shape) * 4.0
        np.testing.assert_array_equal(np.array(outer(x)), np.array(gelu(x)))


def test_works_in_a_training_step():
    """value_and_grad through a tiny MLP that uses gelu, compared with the same MLP using nn.gelu."""
    mx.random.seed(3)
    layers = [nn.Linear(8, 16), nn.Linear(16, 4)]
    x, y = mx.random.normal((5, 8)), mx.random.normal((5, 4))

    def loss(params, act):
        h = act(x @ params[0]["weight"].T + params[0]["bias"])
        return ((h @ params[1]["weight"].T + params[1]["bias"] - y) ** 2).mean()

    params = [layer.parameters() for layer in layers]
    ours = mx.value_and_grad(lambda p: loss(p, gelu))(params)
    ref = mx.value_and_grad(lambda p: loss(p, nn.gelu))(params)
    assert abs(ours[0].item() - ref[0].item()) < 1e-6
    for g_ours, g_ref in zip(ours[1], ref[1]):
        for key in ("weight", "bias"):
            np.testing.assert_allclose(np.array(g_ours[key]), np.array(g_ref[key]), rtol=0, atol=1e-5)


def test_backend_gelu_is_exact_gelu_on_both_paths(backend_path):
    """ops.gelu with the CPU workarounds, nn.gelu on the portable path: the same function to float32 accuracy."""
    x = dense_grid()
    out = backend.gelu(mx.array(x))
    assert out.dtype == mx.float32
    err = np.abs(np.array(out, dtype=np.float64) - gelu64(x))
    assert np.max(err / (EPS32 * np.maximum(np.abs(x), 1.0))) <= 4.0
    x = np.linspace(-10.0, 10.0, 40_001, dtype=np.float32)
    grad = np.array(mx.grad(lambda v: backend.gelu(v).sum())(mx.array(x)), dtype=np.float64)
    assert np.abs(grad - gelu_grad64(x)).max() <= 1e-5


# ----------------------------------------------------------------------------------------------------
# SiLU


def silu64(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / (1.0 + np.exp(-x))


def silu_grad64(x) -> np.ndarray:
    s = 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))
    return s * (1.0 + x * (1.0 - s))


def silu_grid() -> np.ndarray:
    """The core, both tails while exp(-|x|) keeps float32's full precision (it nears the subnormals past 80), tiny
    values, huge ones."""
    tiny = np.geomspace(1e-38, 1e-2, 2000)
    return np.concatenate([np.linspace(-80.0, 80.0, 320_001), tiny, -tiny, [0.0, 1e4, 1e30]]).astype(np.float32)


def test_silu_float32_within_a_few_ulps_of_float64(backend_path):
    """SwiGLU's gate silu(a) * b with b = 1 (backend.silu_gate: the native kernel, ops.silu with the workarounds, nn.silu
    on the portable path) alike: within a few
    float32 ulps of the float64 value, relative to the output itself, plus what exp's condition number |x| allows
    in the negative tail (exp(x) of a float32 x is only that exact)."""
    x = silu_grid()
    out = backend.silu_gate(mx.array(x), mx.ones(x.shape))
    assert out.dtype == mx.float32
    ref = silu64(x)
    err = np.abs(np.array(out, dtype=np.float64) - ref)
    assert np.all(err <= EPS32 * np.abs(ref) * (4.0 + np.abs(x)) + 1e-45)
    core = np.abs(x) <= 8.0
    np.testing.assert_allclose(np.array(silu(mx.array(x[core]))), np.array(nn.silu(mx.array(x[core]))),
                               rtol=8 * EPS32, atol=1e-44)


def test_silu_special_values_and_half_precision():
    y = np.array(silu(mx.array([np.inf, np.nan, 0.0, -200.0], dtype=mx.float32)))
    assert y[0] == np.inf and np.isnan(y[1]) and y[2] == 0.0 and y[3] == 0.0
    for dtype in (mx.float16, mx.bfloat16):
        x = mx.array(np.linspace(-10.0, 10.0, 2001, dtype=np.float32)).astype(dtype)
        out = silu(x)
        assert out.dtype == dtype
        np.testing.assert_array_equal(np.array(out.astype(mx.float32)),
                                      np.array(silu(x.astype(mx.float32)).astype(dtype).astype(mx.float32)))
    with pytest.raises(ValueError, match="int32"):
        silu(mx.array([1, 2]))


def test_silu_gradient_matches_analytic_derivative(backend_path):
    x = np.linspace(-30.0, 30.0, 60_001, dtype=np.float32)
    grad = np.array(mx.grad(lambda v: backend.silu_gate(v, mx.ones_like(v)).sum())(mx.array(x)), dtype=np.float64)
    np.testing.assert_allclose(grad, silu_grad64(x), rtol=0, atol=2e-6)
