"""The one place that decides what runs on which MLX backend.

The model (`mlx_aim.models.layers`) calls `Linear`, `LayerNorm`, `RMSNorm`, `qkv_attention`, `gelu`, `silu_gate` and
`prepare_mask` from here
and never looks at the device. The portable path, what Metal and CUDA run, is MLX's own: `nn.Linear`,
`nn.QuantizedLinear`, `mx.fast.scaled_dot_product_attention`, `nn.LayerNorm` (`mx.fast.layer_norm`), `nn.gelu`
(exact, erf) and `nn.silu`. On the CPU backend the workarounds replace the slow parts of MLX's CPU kernels:

- half-precision and quantized linears multiply in float32 through the BLAS (MLX's CPU half-precision and
  quantized matmuls are its own loops), quantized weights unpacked by `ops.dequantizer`;
- GELU, SwiGLU's gate, the attention softmax, layer norm and RMS norm are `mlx_aim.backend.native`'s C++ kernels (MLX primitives, multithreaded and
  vectorised for the running CPU), when that extension was built and matches the installed mlx; unmasked attention
  over FLASH_ATTENTION_MIN_TOKENS keys or more is its blocked attention, which never holds the (N, N) weights;
- otherwise, and with MLX_AIM_NATIVE=0, attention is `ops.attention` (a vectorised exp, a written-out backward,
  float32), GELU `ops.gelu`, erf as a rational polynomial (MLX's CPU erf is evaluated one element at a time), and
  layer norm `mx.fast.layer_norm`; when the extension is missing, the first layer that would have used it warns
  once, saying why;
- AdamW with gradient clipping (`mlx_aim.training.optim`, which asks `use_native_kernels` when its step is traced) is
  `native.adamw_update`, one kernel over the whole parameter tree, else mlx's own optimizer;
- multi-head attention on the qkv linear's packed output (`qkv_attention`) is `native.packed_attention`, dense or
  blocked as `attention` would choose: it reads the heads in place and writes the output as the proj linear takes it;
- either way the trunk's mask is made additive once rather than in every block;
- without the native kernels, SiLU is `ops.silu`, its sigmoid's exp vectorised as attention's is.

Each gives the portable path's values up to float32 rounding. So three paths run on the CPU: native (the default
where built), ops (the workarounds without the native kernels) and portable. Two switches choose, each an environment
variable with a context manager that takes precedence over it: `MLX_AIM_CPU_WORKAROUNDS=0` (or `off`, `false`;
`with cpu_workarounds(False)`) turns all workarounds off, the portable path; `MLX_AIM_NATIVE=0` (`with
native_kernels(False)`) keeps the workarounds but not the native kernels, the ops path. Unset, `1`, `on` or `true`
keeps each on. The settings are read each time a layer runs, so a function compiled with `mx.compile` keeps the
path it was traced with.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Optional

import mlx.core as mx
import mlx.nn as nn

from .. import _blas
from . import native, ops

CPU_WORKAROUNDS_ENV = "MLX_AIM_CPU_WORKAROUNDS"
NATIVE_ENV = "MLX_AIM_NATIVE"
_ON, _OFF = ("", "1", "on", "true"), ("0", "off", "false")

# Set by `cpu_workarounds` and `native_kernels`; None: the environment variable decides.
_overrides: dict[str, Optional[bool]] = {CPU_WORKAROUNDS_ENV: None, NATIVE_ENV: None}


def _switch(variable: str) -> bool:
    if _overrides[variable] is not None:
        return _overrides[variable]
    value = os.environ.get(variable, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(f"{variable}={value!r}: expected 1/on/true or 0/off/false")


@contextlib.contextmanager
def _overriding(variable: str, enabled: bool) -> Iterator[None]:
    previous, _overrides[variable] = _overrides[variable], bool(enabled)
    try:
        yield
    finally:
        _overrides[variable] = previous


def cpu_workarounds_enabled() -> bool:
    """Whether the CPU workarounds are switched on (by `cpu_workarounds`, else by MLX_AIM_CPU_WORKAROUNDS)."""
    return _switch(CPU_WORKAROUNDS_ENV)


def cpu_workarounds(enabled: bool):
    """Turns the CPU workarounds on or off inside the block (whatever the environment says), then restores
    the previous setting. Process-wide, not per thread."""
    return _overriding(CPU_WORKAROUNDS_ENV, enabled)


def native_kernels_enabled() -> bool:
    """Whether the native kernels may be used (by `native_kernels`, else by MLX_AIM_NATIVE)."""
    return _switch(NATIVE_ENV)


def native_kernels(enabled: bool):
    """Allows or forbids the native kernels inside the block (whatever the environment says), then restores the
    previous setting: `native_kernels(False)` is the ops path. Process-wide, not per thread."""
    return _overriding(NATIVE_ENV, enabled)


def use_cpu_workarounds() -> bool:
    """True when the default device is the CPU and the workarounds are on: the one device check."""
    return mx.default_device() == mx.cpu and cpu_workarounds_enabled()


def use_native_kernels() -> bool:
    """True when the CPU workarounds are in use, the native kernels allowed and built for this mlx. Allowed but not
    built: False, with one warning per process saying why."""
    if not (use_cpu_workarounds() and native_kernels_enabled()):
        return False
    if not native.available():
        native.warn_unavailable()
        return False
    return True


@contextlib.contextmanager
def compute_threads(threads: int) -> Iterator[None]:
    """Runs the block with the preloaded BLAS and the native kernels on `threads` threads each, then restores their
    previous counts; `threads=0` changes nothing. Leaving a core to a data loader's thread can beat all cores for
    both: a multithreaded call waits at its barriers while the loader holds a core (`scaling` does this)."""
    if threads < 0:
        raise ValueError(f"threads={threads}: expected an integer >= 0 (0: leave the libraries' counts)")
    if threads == 0:
        yield
        return
    blas_before = _blas.get_num_threads()
    native_before = native.num_threads() if native.available() else None
    _blas.set_num_threads(threads)
    if native_before is not None:
        native.set_num_threads(threads)
    try:
        yield
    finally:
        if blas_before is not None:
            _blas.set_num_threads(blas_before)
        if native_before is not None:
            native.set_num_threads(native_before)


def backend_path() -> str:
    """Which path the layers take now: "native", "ops" (the CPU workarounds without native kernels) or "portable"."""
    if use_native_kernels():
        return "native"
    return "ops" if use_cpu_workarounds() else "portable"


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU: the native kernel or `ops.gelu` with the CPU workarounds, `nn.gelu` elsewhere."""
    if use_native_kernels():
        return native.gelu(x)
    return ops.gelu(x) if use_cpu_workarounds() else nn.gelu(x)


def silu_gate(a: mx.array, b: mx.array) -> mx.array:
    """silu(a) * b, AIMv2's SwiGLU gate: the native kernel (one pass), else `ops.silu` with the CPU workarounds,
    `nn.silu` elsewhere."""
    if use_native_kernels():
        return native.silu_gate(a, b)
    return (ops.silu(a) if use_cpu_workarounds() else nn.silu(a)) * b


def prepare_mask(mask, num_tokens: int):
    """The trunk's mask in the form `attention` takes fastest, made once for all blocks: additive float32
    with the CPU workarounds (where the native and ops attention add it), unchanged elsewhere."""
    if mask is not None and use_cpu_workarounds():
        return ops.additive_mask(mask, num_tokens)
    return mask


# From this many keys on, unmasked attention on the native path is `native.flash_attention` (blocked, online softmax:
# the (N, N) weights never held) instead of `native.attention` (the weights materialised, the softmax native).
# Measured with benchmarks/bench_long_attention.py --threads 1 (batch 1 x 16 heads x 64 dims, the two alternating, best
# of 4 rounds; 2-core AMD EPYC VM shared with other jobs, load average 7.2), blocked over dense time, forward and
# forward+backward: 256 tokens 1.10x and 1.22x, 576 tokens 0.91x and 1.66x, 1024 tokens 0.26x and 0.62x, 2304 tokens
# 0.41x and 0.41x. So from 1024 on both pay; below, dense keeps training faster (576: inference 9% slower dense).
# With the BLAS on both cores (--threads 0, load 5.8) blocked was faster from 256 on (0.28x and 0.34x there), dense
# attention's threaded products stalling under the load; the one-thread figures decide, as the steadier.
FLASH_ATTENTION_MIN_TOKENS = 1024


def _blocked(mask, num_keys: int) -> bool:
    """Whether the native path runs attention blocked: unmasked, over at least FLASH_ATTENTION_MIN_TOKENS keys."""
    return mask is None and num_keys >= FLASH_ATTENTION_MIN_TOKENS


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """softmax(scale * q k^T + mask) v over (batch, heads, tokens, head_dim): the native kernel's or `ops.attention`
    with the CPU workarounds, `mx.fast.scaled_dot_product_attention` elsewhere. Masks as the latter takes them. On
    the native path, unmasked attention over at least FLASH_ATTENTION_MIN_TOKENS keys runs blocked
    (`native.flash_attention`); masked attention (AIM's prefix-causal pre-training) keeps `native.attention`."""
    if isinstance(mask, mx.array) and mask.dtype != mx.bool_:
        mask = mask.astype(q.dtype)  # an additive mask in the queries' dtype, as fused attention wants it
    if use_native_kernels():
        if _blocked(mask, k.shape[-2]):
            return native.flash_attention(q, k, v, scale)
        return native.attention(q, k, v, scale, mask)
    if use_cpu_workarounds():
        return ops.attention(q, k, v, scale, mask)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def split_heads(qkv: mx.array, num_heads: int) -> tuple[mx.array, mx.array, mx.array]:
    """The qkv linear's (B, N, 3 D) output as q, k and v of shape (B, heads, N, D / heads)."""
    B, N, D3 = qkv.shape
    qkv = qkv.reshape(B, N, 3, num_heads, D3 // (3 * num_heads)).transpose(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def qkv_attention(qkv: mx.array, num_heads: int, scale: float, mask=None) -> mx.array:
    """Multi-head attention from the qkv linear's packed (B, N, 3 D) output to the (B, N, D) the proj linear takes:
    `attention` per head on `split_heads`, the heads side by side again. On the native path the kernels work on the
    packed layout itself (`native.packed_attention`: no copies of the heads out and back, forward or backward),
    blocked where `attention` would be (unmasked, at least FLASH_ATTENTION_MIN_TOKENS keys)."""
    B, N, D3 = qkv.shape
    if use_native_kernels():  # the kernel makes the mask additive float32 itself
        return native.packed_attention(qkv, num_heads, scale, mask, blocked=_blocked(mask, N))
    out = attention(*split_heads(qkv, num_heads), scale, mask)
    return out.transpose(0, 2, 1, 3).reshape(B, N, D3 // 3)


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


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose affine form runs `native.layer_norm` on the native path; `mx.fast.layer_norm` elsewhere.
    Same parameters."""

    def __call__(self, x: mx.array) -> mx.array:
        if "weight" in self and "bias" in self and use_native_kernels():
            return native.layer_norm(x, self.weight, self.bias, self.eps)
        return super().__call__(x)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm that runs `native.rms_norm` on the native path; `mx.fast.rms_norm` elsewhere. Same parameters."""

    def __call__(self, x: mx.array) -> mx.array:
        if use_native_kernels():
            return native.rms_norm(x, self.weight, self.eps)
        return super().__call__(x)


@functools.lru_cache(maxsize=None)
def _dequantizing_matmul(bits: int, group_size: int):
    """x @ dequantize(weight).T for a frozen affine-quantized weight, through the float32 BLAS, whose backward
    dequantizes the weight again instead of keeping the float copy: the backward pass needs only x's gradient,
    cotangent @ W. Each dequantization depends on the array it multiplies (`mx.depends`: x forward, the cotangent
    backward), so that `mx.compile` cannot merge them, which would keep every layer's float weight alive from the
    forward to the backward pass (the weight alone is a constant of the step): measured on aim-600M 4-bit at batch 1,
    a compiled QLoRA step with gradient checkpointing peaked at 2.76 GB of MLX memory with a plain dequantize, the
    whole float32 trunk, and 0.83 GB this way, against 0.42 GB of weights. The weight's own gradients are zeros
    (frozen)."""
    dequantize = ops.dequantizer(bits, group_size)

    @mx.custom_function
    def matmul(x, weight, scales, biases):
        # Tied to x, so that a gradient checkpoint's recomputation dequantizes anew too (its x is another node).
        return _float32_matmul(x, dequantize(mx.depends(weight, x), scales, biases), None)

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, weight, scales, biases = primals
        weight = mx.depends(weight, cotangent)
        w = dequantize(weight, scales, biases)
        grad_x = (cotangent.astype(mx.float32) @ w.astype(mx.float32)).astype(x.dtype)
        return grad_x, mx.zeros_like(weight), mx.zeros_like(scales), mx.zeros_like(biases)

    return matmul


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear that, with the CPU workarounds, dequantizes its weight and multiplies with the
    float32 BLAS: the same values (the dequantized weight is what the quantized kernel multiplies by), much
    faster there than MLX's CPU quantized matmul; its backward pass dequantizes again rather than keep the float
    weight (`_dequantizing_matmul`), so a QLoRA step holds no float copy of the base. Elsewhere the quantized
    kernel."""

    def __call__(self, x: mx.array) -> mx.array:
        if not use_cpu_workarounds():
            return super().__call__(x)
        bias = self.get("bias")
        if self.mode == "affine" and 32 % self.bits == 0:
            y = _dequantizing_matmul(self.bits, self.group_size)(x, self.weight, self.scales, self.biases)
            return y if bias is None else (y.astype(mx.float32) + bias.astype(mx.float32)).astype(x.dtype)
        w = mx.dequantize(self.weight, self.scales, self.get("biases"), self.group_size, self.bits, mode=self.mode)
        return _float32_matmul(x, w, bias)
