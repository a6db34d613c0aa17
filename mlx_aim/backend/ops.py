"""Kernels written for MLX's CPU backend: GELU, SiLU, softmax attention and affine dequantization.

MLX's CPU `erf` (and `exp`, `tanh`) is evaluated one element at a time, so `nn.gelu` spends ~100x longer
than a multiply on the same tensor. `gelu` here computes erf as a rational polynomial (the float32
approximation Eigen and XLA use) from multiply, add, divide, abs and two clamps only, which the CPU
backend vectorises and `mx.compile` fuses into a few kernels. `attention` and `silu` do the same for the
exp in the softmax and the sigmoid, and `dequantizer` unpacks quantized weights for the float32 BLAS.

They compute the same values as MLX's own ops on any device; nothing here looks at the device.
`mlx_aim.backend` decides where they run (on the CPU backend, unless its workarounds are turned off).
"""

import functools
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


def _clip_unit(p):
    """clip(p, 0, 1) for finite p, exactly, with clip's zero slope at both ends, from compare-and-multiply
    (mx.clip is a minimum and a maximum, each testing for nan per element on the CPU backend). `+ 0.0`
    turns the -0 of a negative p into +0."""
    p = p * (p > 0.0) + 0.0
    over = p - 1.0
    return p - over * (over >= 0.0)  # exactly 1 above: p - (p - 1) has no rounding for p just above 1


def _clip_unit_by_abs(p):
    """The same exact clip(p, 0, 1) from add, abs and halving (y + |y| is 0 or 2y, without rounding). Its
    autodiff slope is 1/2 where p is exactly 0 or 1, so only the forward kernel uses it (the custom VJP and
    JVP give the derivative), where it measured
    faster (GELU forward over 512x6144 float32, CPU time: 31 -> 21 ms; MLX's fused CPU kernels vectorise
    or not depending on the mix of ops, and the compare-to-float casts are one that does not)."""
    p = 0.5 * (p + mx.abs(p))
    over = p - 1.0
    return p - 0.5 * (over + mx.abs(over))


def gelu_polynomial(x: mx.array, clip_unit=_clip_unit) -> mx.array:
    """`gelu`'s float32 forward as plain ops, uncompiled and without the closed-form slope: autodiff
    differentiates it (the yardstick for the slope `gelu` uses)."""
    # Below -_X_CLAMP, Phi is exactly 0 here, so flooring x there changes nothing but gelu(-inf): -0, not nan.
    x_floor = mx.maximum(x, -_X_CLAMP)
    xc = mx.minimum(x_floor, _X_CLAMP)
    s = xc * xc
    # The rational erf overshoots 1 by ~2e-7 near the clamp; clipping keeps Phi a probability.
    phi = clip_unit(0.5 + xc * _horner(s, _PHI_NUM) / _horner(s, _PHI_DEN))
    return x_floor * phi


def _gelu_slope_float32(x):
    """d gelu / dx = Phi(x) + x Phi'(x), Phi' from the same rational fit, in closed form: one fused kernel
    instead of autodiff's backward through every Horner step (2-3x faster, no saved intermediates)."""
    xc = mx.minimum(mx.maximum(x, -_X_CLAMP), _X_CLAMP)
    s = xc * xc
    num, den = _horner(s, _PHI_NUM), _horner(s, _PHI_DEN)
    phi = 0.5 + xc * num / den
    # d/dx [x N(x^2) / D(x^2)] = ((N + 2s N') D - 2s N D') / D^2 with s = x^2; zero where the forward clamps
    # x or clips Phi (where the fit's slope is also least exact: this is autodiff's answer there too).
    num_slope, den_slope = _horner(s, _PHI_NUM_SLOPE), _horner(s, _PHI_DEN_SLOPE)
    dphi = ((num + 2.0 * s * num_slope) * den - 2.0 * s * num * den_slope) / (den * den)
    inside = (mx.abs(x) < _X_CLAMP) & (phi > 0.0) & (phi < 1.0)
    # x = xc inside; outside, xc keeps the product finite, so multiplying by the 0/1 mask is a select (which,
    # like minimum, is a scalar loop on the CPU backend).
    return _clip_unit(phi) + inside.astype(x.dtype) * (xc * dphi)


# Shape-specialised, not shapeless: a shapeless trace broadcasts every scalar both ways, which hits MLX's
# fusion depth limit twice as often (6 kernels instead of 3, about 2x slower on CPU).
_gelu_forward_compiled = mx.compile(lambda x: gelu_polynomial(x, _clip_unit_by_abs))  # equal values, see above
_gelu_slope_compiled = mx.compile(_gelu_slope_float32)


@mx.custom_function
def _gelu_f32(x):
    return _gelu_forward_compiled(x)


@_gelu_f32.vjp
def _gelu_f32_vjp(x, cotangent, output):
    return cotangent * _gelu_slope_compiled(x)


@_gelu_f32.jvp
def _gelu_f32_jvp(x, tangent):  # one input: MLX passes the arrays themselves
    return tangent * _gelu_slope_compiled(x)


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


# ----------------------------------------------------------------------------------------------------
# Softmax attention

_LOG2E = 1.4426950408889634
# 2^f = exp(f ln 2) for f in [-1/2, 1/2]: Taylor to degree 7 (truncation < 6e-9, below float32 rounding).
_EXP2_TAYLOR = tuple(math.log(2.0) ** k / math.factorial(k) for k in range(8))[::-1]


def exp_nonpositive(y: mx.array) -> mx.array:
    """exp(y) for float32 y <= 0 (-inf gives 0, nan stays nan) from multiply, add and integer ops, which the
    CPU backend vectorises (its own exp is evaluated one element at a time). exp(y) = 2^n * 2^f with n the
    integer nearest y log2(e): 2^f from a polynomial, 2^n written straight into a float's exponent bits.
    Below 2^-127 the result is 0 (float32's normal range ends at 2^-126)."""
    t = mx.maximum(y * _LOG2E, -127.0)
    n = (t - 0.5).astype(mx.int32)  # t <= 0: truncation rounds t - 1/2 up, so f = t - n lies in [-1/2, 1/2]
    f = t - n.astype(mx.float32)
    return _horner(f, _EXP2_TAYLOR) * ((n + 127) << 23).view(mx.float32)


@mx.compile
def _softmax_numerator(scores, row_max, scale):
    return exp_nonpositive((scores - row_max) * scale)


@mx.compile
def _softmax_input_grad(probs, d_probs, delta, scale):
    return probs * (d_probs - delta) * scale


def _probabilities(q, k, mask, scale):
    """Softmax over keys of scale * q k^T + mask, unnormalised, with each row's sum."""
    scores = q @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = scores + mask / scale  # the scale is applied in the exp, and the mask is added after it
    e = _softmax_numerator(scores, scores.max(axis=-1, keepdims=True), scale)
    return e, e.sum(axis=-1, keepdims=True)


@mx.custom_function
def _attention_float32(q, k, v, mask, scale):
    e, total = _probabilities(q, k, mask, scale)
    return (e @ v) / total  # normalising the (.., N, head_dim) output: fewer elements than the (.., N, N) weights


@_attention_float32.vjp
def _attention_float32_vjp(primals, d_out, out):
    # The standard attention backward (as flash attention computes it), the weights recomputed, not stored.
    q, k, v, mask, scale = primals
    e, total = _probabilities(q, k, mask, scale)
    probs = e / total
    d_v = probs.swapaxes(-1, -2) @ d_out
    delta = (d_out * out).sum(axis=-1, keepdims=True)  # = rowsum(probs * d_probs)
    d_scores = _softmax_input_grad(probs, d_out @ v.swapaxes(-1, -2), delta, scale)
    d_mask = mx.zeros_like(mask) if mask is not None else None
    return d_scores @ k, d_scores.swapaxes(-1, -2) @ q, d_v, d_mask, mx.zeros_like(scale)


def additive_mask(mask, num_keys: int, dtype=mx.float32):
    """An attention mask as a float array to add to the scores: None stays None, "causal" and boolean masks
    (True: may attend) become 0 where allowed and -inf elsewhere."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"attention mask {mask!r}: expected None, 'causal' or an array")
        idx = mx.arange(num_keys)
        mask = idx[:, None] >= idx[None, :]
    if mask.dtype == mx.bool_:
        return mx.where(mask, mx.array(0.0, dtype), mx.array(-mx.inf, dtype))
    return mask.astype(dtype)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """softmax(scale * q k^T + mask) v over (batch, heads, tokens, head_dim), as
    `mx.fast.scaled_dot_product_attention` computes it (same mask forms: None, "causal", boolean where True
    means "may attend", or additive).

    On the CPU backend MLX's fused attention falls back to separate steps with a scalar exp (~4x slower than
    PyTorch's); here the softmax's exp is `exp_nonpositive`, the normalisation is applied to the output, the
    scale is folded into the exp, and the backward is written out (the weights recomputed rather than kept).
    Half-precision input is computed in float32 (MLX's CPU half matmul is slow) and rounded back.
    The mask is a constant: it gets no gradient.
    """
    dtype = q.dtype
    if dtype != mx.float32:
        q, k, v = q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32)
    out = _attention_float32(q, k, v, additive_mask(mask, k.shape[-2]), mx.array(scale, mx.float32))
    return out.astype(dtype)


# ----------------------------------------------------------------------------------------------------
# SiLU


@mx.compile
def _silu_forward(x):
    # x sigmoid(x) = (max(x, 0) + min(x, 0) e) / (1 + e) with e = exp(-|x|) <= 1: no overflow, no cancellation.
    e = exp_nonpositive(-mx.abs(x))
    return (mx.maximum(x, 0.0) + mx.minimum(x, 0.0) * e) / (1.0 + e)


@mx.custom_function
def _silu_f32(x):
    return _silu_forward(x)


@_silu_f32.vjp
def _silu_f32_vjp(x, cotangent, output):
    s = mx.sigmoid(x)  # the backward is not on inference's path: MLX's own sigmoid
    return cotangent * (s * (1.0 + x * (1.0 - s)))


def silu(x: mx.array) -> mx.array:
    """SiLU, x * sigmoid(x) (`nn.silu`), with the sigmoid's exp from `exp_nonpositive`: float32 accurate, as
    `nn.silu` is (silu(inf) = inf; silu(-inf) is nan for both). Other float dtypes are computed in float32 and
    rounded back."""
    dtype = x.dtype
    if dtype == mx.float32:
        return _silu_f32(x)
    if mx.issubdtype(dtype, mx.floating):
        return _silu_f32(x.astype(mx.float32)).astype(dtype)
    raise ValueError(f"silu expects a floating-point array, got dtype {dtype}")


# ----------------------------------------------------------------------------------------------------
# Affine dequantization


@functools.lru_cache(maxsize=None)
def dequantizer(bits: int, group_size: int):
    """A compiled `dequantize(packed, scales, biases)` for affine quantization: the values `mx.dequantize`
    gives, bit for bit, from shifts, masks and a multiply-add that `mx.compile` fuses into one kernel,
    which the CPU backend runs faster than its own dequantize. `bits` must divide 32."""
    if 32 % bits:
        raise ValueError(f"dequantizer: bits must divide 32, got {bits}")
    per_word = 32 // bits
    shifts = mx.array([bits * i for i in range(per_word)], dtype=mx.uint32)

    def dequantize(packed, scales, biases):
        rows = packed.shape[0]
        q = (packed[..., None] >> shifts) & ((1 << bits) - 1)  # (rows, words, values per word), low bits first
        q = q.reshape(rows, -1, group_size).astype(scales.dtype)
        return (q * scales[..., None] + biases[..., None]).reshape(rows, -1)

    return mx.compile(dequantize)
