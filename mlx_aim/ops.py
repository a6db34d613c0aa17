"""Element-wise ops that are fast on MLX's CPU backend as well as on Metal.

MLX's CPU `erf` (and `exp`, `tanh`) is evaluated one element at a time, so `nn.gelu` spends ~100x longer
than a multiply on the same tensor. `gelu` here computes erf as a rational polynomial (the float32
approximation Eigen and XLA use) from multiply, add, divide and clip only, which the CPU backend
vectorises and `mx.compile` fuses into a few kernels.
"""

import math

import mlx.core as mx

# erf(z) ~= z * P(z^2) / Q(z^2) for z in [-4, 4] (Eigen's and XLA's float32 erf), highest power first.
_ERF_NUM = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
            -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_DEN = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
            -1.42647390514189e-02)
_ERF_CLAMP = 4.0


def _rescaled(coeffs, scale):
    """Coefficients of c(s) = sum a_k (s/2)^k * scale: the polynomial in s = x^2 instead of z^2 = x^2/2."""
    n = len(coeffs) - 1
    return tuple(a * scale / 2.0 ** (n - i) for i, a in enumerate(coeffs))


# Phi(x) = 0.5 + 0.5 * erf(x / sqrt(2)) = 0.5 + x * NUM(x^2) / DEN(x^2), with 1/sqrt(2) and 0.5 folded in
# (powers of two are exact, so only the numerator's 0.5/sqrt(2) adds a rounding per coefficient).
_PHI_NUM = _rescaled(_ERF_NUM, 0.5 / math.sqrt(2.0))
_PHI_DEN = _rescaled(_ERF_DEN, 1.0)
_X_CLAMP = _ERF_CLAMP * math.sqrt(2.0)


def _slope(coeffs):
    """Coefficients of the derivative (highest power first)."""
    n = len(coeffs) - 1
    return tuple(c * (n - i) for i, c in enumerate(coeffs[:-1]))


_PHI_NUM_SLOPE = _slope(_PHI_NUM)
_PHI_DEN_SLOPE = _slope(_PHI_DEN)


def _horner(s, coeffs):
    acc = coeffs[0] * s + coeffs[1]
    for c in coeffs[2:]:
        acc = acc * s + c
    return acc


def _gelu_float32(x):
    # Below -_X_CLAMP, Phi is exactly 0 here, so flooring x there changes nothing but gelu(-inf): -0, not nan.
    x_floor = mx.maximum(x, -_X_CLAMP)
    xc = mx.minimum(x_floor, _X_CLAMP)
    s = xc * xc
    # The rational erf overshoots 1 by ~2e-7 near the clamp; clipping keeps Phi a probability.
    phi = mx.clip(0.5 + xc * _horner(s, _PHI_NUM) / _horner(s, _PHI_DEN), 0.0, 1.0)
    return x_floor * phi


def _gelu_slope_float32(x):
    """d gelu / dx = Phi(x) + x Phi'(x), Phi' from the same rational fit, in closed form: one fused kernel
    instead of autodiff's backward through every Horner step (2-3x faster, no saved intermediates)."""
    xc = mx.clip(x, -_X_CLAMP, _X_CLAMP)
    s = xc * xc
    num, den = _horner(s, _PHI_NUM), _horner(s, _PHI_DEN)
    phi = 0.5 + xc * num / den
    # d/dx [x N(x^2) / D(x^2)] = ((N + 2s N') D - 2s N D') / D^2 with s = x^2; zero where the forward clamps
    # x or clips Phi (where the fit's slope is also least exact: this is autodiff's answer there too).
    num_slope, den_slope = _horner(s, _PHI_NUM_SLOPE), _horner(s, _PHI_DEN_SLOPE)
    dphi = ((num + 2.0 * s * num_slope) * den - 2.0 * s * num * den_slope) / (den * den)
    inside = (mx.abs(x) < _X_CLAMP) & (phi > 0.0) & (phi < 1.0)
    return mx.clip(phi, 0.0, 1.0) + mx.where(inside, x * dphi, 0.0)


# Shape-specialised, not shapeless: a shapeless trace broadcasts every scalar both ways, which hits MLX's
# fusion depth limit twice as often (6 kernels instead of 3, about 2x slower on CPU).
_gelu_forward_compiled = mx.compile(_gelu_float32)
_gelu_slope_compiled = mx.compile(_gelu_slope_float32)


@mx.custom_function
def _gelu_f32(x):
    return _gelu_forward_compiled(x)


@_gelu_f32.vjp
def _gelu_f32_vjp(x, cotangent, output):
    return cotangent * _gelu_slope_compiled(x)


def gelu(x: mx.array) -> mx.array:
    """Exact GELU, x * Phi(x) with Phi the standard normal CDF (erf form, as in AIM and `nn.gelu`).

    float32 results are within a few float32 ulps of the float64 value (measured against `math.erf`),
    like `nn.gelu` and PyTorch's `F.gelu`. Other float dtypes are computed in float32 and rounded back:
    the polynomial's small coefficients underflow in float16, and float64 gains nothing from MLX's own
    erf, which is float32-accurate too. Integer input gives float32.
    gelu(inf) = inf, gelu(-inf) = -0, gelu(nan) = nan.
    """
    dtype = x.dtype
    if dtype == mx.float32:
        return _gelu_f32(x)
    if mx.issubdtype(dtype, mx.floating):
        return _gelu_f32(x.astype(mx.float32)).astype(dtype)
    if mx.issubdtype(dtype, mx.integer) or dtype == mx.bool_:
        return _gelu_f32(x.astype(mx.float32))
    raise ValueError(f"gelu expects a real-valued array, got dtype {dtype}")
