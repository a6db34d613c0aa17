"""The one place that decides what runs on which MLX backend.

The model (`mlx_aim.layers`) calls `Linear`, `attention`, `gelu`, `silu` and `prepare_mask` from here and never
looks at the device. The portable path, what Metal and CUDA run, is MLX's own: `nn.Linear`, `nn.QuantizedLinear`,
`mx.fast.scaled_dot_product_attention`, `nn.gelu` (exact, erf) and `nn.silu`. On the CPU backend the workarounds
replace the slow parts of MLX's CPU kernels:

- half-precision and quantized linears multiply in float32 through the BLAS (MLX's CPU half-precision and
  quantized matmuls are its own loops), quantized weights unpacked by `ops.dequantizer`;
- attention is `ops.attention` (a vectorised exp, a written-out backward, float32), with the trunk's mask made
  additive once rather than in every block;
- GELU is `ops.gelu`, erf as a rational polynomial (MLX's CPU erf is evaluated one element at a time);
- SiLU is `ops.silu`, its sigmoid's exp vectorised as attention's is.

Each gives the portable path's values up to float32 rounding. Setting the environment variable
`MLX_AIM_CPU_WORKAROUNDS=0` (or `off`, `false`) turns them off, so the portable path can be tested and timed
on the CPU; unset, `1`, `on` or `true` keeps them. In code, `with cpu_workarounds(False): ...` does the same
and takes precedence over the variable. The setting is read each time a layer runs, so a function compiled
with `mx.compile` keeps the path it was traced with.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import mlx.core as mx
import mlx.nn as nn

from . import ops

CPU_WORKAROUNDS_ENV = "MLX_AIM_CPU_WORKAROUNDS"
_ON, _OFF = ("", "1", "on", "true"), ("0", "off", "false")

_override: Optional[bool] = None  # set by `cpu_workarounds`; None: the environment variable decides


def cpu_workarounds_enabled() -> bool:
    """Whether the CPU workarounds are switched on (by `cpu_workarounds`, else by MLX_AIM_CPU_WORKAROUNDS)."""
    if _override is not None:
        return _override
    value = os.environ.get(CPU_WORKAROUNDS_ENV, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(f"{CPU_WORKAROUNDS_ENV}={value!r}: expected 1/on/true or 0/off/false")


@contextlib.contextmanager
def cpu_workarounds(enabled: bool) -> Iterator[None]:
    """Turns the CPU workarounds on or off inside the block (whatever the environment says), then restores
    the previous setting. Process-wide, not per thread."""
    global _override
    previous, _override = _override, bool(enabled)
    try:
        yield
    finally:
        _override = previous


def use_cpu_workarounds() -> bool:
    """True when the default device is the CPU and the workarounds are on: the one device check."""
    return mx.default_device() == mx.cpu and cpu_workarounds_enabled()


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU: `ops.gelu` with the CPU workarounds, `nn.gelu` elsewhere."""
    return ops.gelu(x) if use_cpu_workarounds() else nn.gelu(x)


def silu(x: mx.array) -> mx.array:
    """SiLU (AIMv2's SwiGLU gate): `ops.silu` with the CPU workarounds, `nn.silu` elsewhere."""
    return ops.silu(x) if use_cpu_workarounds() else nn.silu(x)


def prepare_mask(mask, num_tokens: int):
    """The trunk's mask in the form `attention` takes fastest, made once for all blocks: additive float32
    with the CPU workarounds (where `ops.attention` adds it), unchanged elsewhere."""
    if mask is not None and use_cpu_workarounds():
        return ops.additive_mask(mask, num_tokens)
    return mask


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """softmax(scale * q k^T + mask) v over (batch, heads, tokens, head_dim): `ops.attention` with the CPU
    workarounds, `mx.fast.scaled_dot_product_attention` elsewhere. Masks as the latter takes them."""
    if isinstance(mask, mx.array) and mask.dtype != mx.bool_:
        mask = mask.astype(q.dtype)  # an additive mask in the queries' dtype, as fused attention wants it
    if use_cpu_workarounds():
        return ops.attention(q, k, v, scale, mask)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def _float32_matmul(x: mx.array, weight: mx.array, bias: Optional[mx.array]) -> mx.array:
    """x @ weight.T (+ bias) through the float32 BLAS, rounded back to x's dtype."""
    y = x.astype(mx.float32) @ weight.astype(mx.float32).T
    if bias is not None:
        y = y + bias.astype(mx.float32)
    return y.astype(x.dtype)


class Linear(nn.Linear):
    """nn.Linear whose half-precision matmul runs in float32 with the CPU workarounds (rounded back to the
    input dtype), and whose `nn.quantize` conversion is `QuantizedLinear`. Same parameters, same results up to
    the order of float32 accumulation."""

    def __call__(self, x: mx.array) -> mx.array:
        if self.weight.dtype == mx.float32 or not use_cpu_workarounds():
            return super().__call__(x)
        return _float32_matmul(x, self.weight, self.get("bias"))

    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False):
        if quantize_input or mode != "affine":
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear that, with the CPU workarounds, dequantizes its weight and multiplies with the
    float32 BLAS: the same values (the dequantized weight is what the quantized kernel multiplies by), much
    faster there than MLX's CPU quantized matmul. Elsewhere the quantized kernel."""

    def __call__(self, x: mx.array) -> mx.array:
        if not use_cpu_workarounds():
            return super().__call__(x)
        if self.mode == "affine" and 32 % self.bits == 0:
            w = ops.dequantizer(self.bits, self.group_size)(self.weight, self.scales, self.biases)
        else:
            w = mx.dequantize(self.weight, self.scales, self.get("biases"), self.group_size, self.bits,
                              mode=self.mode)
        return _float32_matmul(x, w, self.get("bias"))
