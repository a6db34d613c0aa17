"""mlx_aim's native CPU kernels: exact GELU, the attention softmax, layer norm and AdamW as MLX primitives written in
C++ (`csrc/`).

MLX's CPU backend runs each element-wise kernel on one thread, and its `erf` and `exp` one element at a time. The
kernels here are multithreaded and vectorised for the running CPU (AVX-512, AVX2 or baseline, picked when the module
loads; NEON on arm64). Each is an `mlx.core` primitive with its own vjp and jvp, so `mx.grad` and `mx.compile` work
through them as through MLX's own ops:

- `gelu`: x Phi(x), Phi from the same float32 rational erf as `mlx_aim.backend.ops.gelu`; its backward uses the closed-form
  slope Phi(x) + x pdf(x);
- `attention`: softmax(scale q k^T + mask) v with the matmuls left to MLX (the BLAS) and the softmax, forward and
  backward, native;
- `packed_attention`: either of the two, read from and written to the layout of the qkv and proj linears (B, N, 3 D)
  and (B, N, D), so the heads are never transposed out and back;
- `flash_attention`: the same attention without a mask, in blocks with an online softmax (forward and backward, no
  jvp), the (N, N) weights never held whole: for long sequences;
- `layer_norm`: `mx.fast.layer_norm` with a weight and a bias, forward and backward (no jvp: forward-mode derivatives
  through it raise); `rms_norm`, AIMv2's, likewise; `silu_gate`: SwiGLU's silu(a) * b in one pass, forward and
  backward;
- `adamw_update`: one AdamW step with global gradient-norm clipping over a whole parameter tree, one primitive over
  lists of arrays (`mlx_aim.training.optim` feeds it; no derivatives: nothing differentiates an optimizer step).

They run on the CPU only; `mlx_aim.backend` decides when (the CPU device, the workarounds on, MLX_AIM_NATIVE not 0).
The extension is built by `pip install` on Linux where a compiler and CMake are present, against the mlx the build
had; it is used only when that is the mlx installed (`unavailable_reason()` says otherwise why not). It is not built on
macOS, where Metal runs the model (`mlx_aim.platforms.native_kernels_skipped`).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Optional, Sequence

import mlx.core as mx

from .. import _blas, platforms
from .ops import additive_mask


def _load():
    """(the extension module, None) or (None, why it cannot be used)."""
    skipped = platforms.native_kernels_skipped(platforms.current())
    if skipped is not None:
        return None, skipped
    try:
        # The compiled extension, built beside the package's __init__ (setup.py); imported by name, since an import
        # of it from `mlx_aim` would read, to the import graph, as one of the whole package.
        kernels = importlib.import_module("mlx_aim._native_kernels")
    except ImportError as error:
        return None, (f"the extension was not built or does not load ({error}); reinstall with a C++ compiler and "
                      "CMake present: pip install -e .")
    if kernels.built_mlx_version != mx.__version__:
        return None, (f"the extension was built against mlx {kernels.built_mlx_version} but mlx {mx.__version__} is "
                      "installed; rebuild it against this mlx: pip install --no-build-isolation -e .")
    try:  # a nanobind ABI other than mlx.core's shows here, as mx.array not being accepted
        kernels.gelu(mx.zeros((1,)))  # built, not evaluated: importing mlx_aim starts no thread (forking servers)
    except (TypeError, RuntimeError) as error:
        return None, f"the extension does not work with this mlx ({error})"
    # Blocked attention runs its tile products on one BLAS thread each, from several threads of its own.
    kernels.set_blas_thread_functions(*(_blas.thread_functions() or (0, 0)))
    return kernels, None


_kernels, _reason = _load()
_warned = False


def available() -> bool:
    """Whether the native kernels are built and match the installed mlx."""
    return _kernels is not None


def unavailable_reason() -> Optional[str]:
    """Why the native kernels cannot be used here, or None when they can."""
    return _reason


def warn_unavailable() -> None:
    """Says, once per process, that the CPU runs the slower kernels and why."""
    global _warned
    if not _warned and _reason is not None:
        _warned = True
        warnings.warn(f"mlx_aim: native CPU kernels unavailable, GELU and attention run on slower MLX ops: {_reason}",
                      RuntimeWarning, stacklevel=3)


def num_threads() -> int:
    """Threads the native kernels split their work over: MLX_AIM_NATIVE_THREADS, else the CPUs this process may
    run on."""
    return _require().num_threads()


def set_num_threads(threads: int) -> None:
    """Splits the native kernels' work over `threads` threads from now on (one can be faster on a busy machine,
    as for the BLAS); waits for queued work first."""
    if threads < 1:
        raise ValueError(f"threads={threads}: expected at least 1")
    _require().set_num_threads(threads)


def _require():
    if _kernels is None:
        raise RuntimeError(f"mlx_aim native kernels unavailable: {_reason}")
    return _kernels


def gelu(x: mx.array) -> mx.array:
    """Exact GELU, as `mlx_aim.backend.ops.gelu` (float32 accurate; other float dtypes computed in float32 and rounded
    back; integers give float32)."""
    kernels = _require()
    dtype = x.dtype
    if dtype == mx.float32:
        return kernels.gelu(x)
    if mx.issubdtype(dtype, mx.floating):
        return kernels.gelu(x.astype(mx.float32)).astype(dtype)
    if mx.issubdtype(dtype, mx.integer) or dtype == mx.bool_:
        return kernels.gelu(x.astype(mx.float32))
    raise ValueError(f"gelu expects a real-valued array, got dtype {dtype}")


def softmax(scores: mx.array, mask: Optional[mx.array], scale: float) -> mx.array:
    """softmax(scale * scores + mask) over the last axis, float32; `mask` additive float32, broadcastable, or None.
    The mask gets no gradient."""
    return _require().masked_softmax(scores, mask, scale)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """softmax(scale q k^T + mask) v over (batch, heads, tokens, head_dim), as `mlx_aim.backend.ops.attention` (same mask
    forms; half precision computed in float32 and rounded back; the mask is a constant)."""
    dtype = q.dtype
    if dtype != mx.float32:
        q, k, v = q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32)
    probs = softmax(q @ k.swapaxes(-1, -2), additive_mask(mask, k.shape[-2]), scale)
    return (probs @ v).astype(dtype)


def packed_attention(qkv: mx.array, num_heads: int, scale: float, mask=None, blocked: bool = False) -> mx.array:
    """Attention over the qkv linear's packed output, (B, N, 3 D) -> (B, N, D) as the proj linear takes it: q, k and v
    of head h are columns h Dh, D + h Dh and 2 D + h Dh (Dh = D / num_heads), as `mlx_aim.models.layers.Attention`
    splits them, and the result is the per-head softmax(scale q k^T + mask) v with the heads side by side again. The
    kernels read and write those strided blocks in place, forward and backward, so the heads are never copied out and
    back: the dense one (the weights held, as `attention`; masks as it takes them, constants) or, with `blocked`, the
    blocked one (`flash_attention`'s, unmasked). Half precision is computed in float32 and rounded back."""
    dtype = qkv.dtype
    if dtype != mx.float32:
        qkv = qkv.astype(mx.float32)
    if blocked:
        if mask is not None:
            raise ValueError("packed_attention: the blocked kernel takes no mask (bidirectional attention only)")
        out, _ = _require().packed_flash_attention(qkv, num_heads, scale)
    else:
        out, _ = _require().packed_attention(qkv, additive_mask(mask, qkv.shape[1]), num_heads, scale)
    return out.astype(dtype)


def flash_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(scale q k^T) v over (..., N, D) queries and (..., M, D) keys and values, bidirectional (no mask), in
    blocks with an online softmax: neither the forward nor the backward holds the (N, M) weights. The forward keeps
    only the output and each query's logsumexp for the backward, which recomputes the weights block by block. Half
    precision is computed in float32 and rounded back."""
    dtype = q.dtype
    if dtype != mx.float32:
        q, k, v = q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32)
    out, _ = _require().flash_attention(q, k, v, scale)
    return out.astype(dtype)


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    """`mx.fast.layer_norm(x, weight, bias, eps)` over the last axis; weight and bias (D,). Half precision is computed
    in float32 and rounded back."""
    kernels = _require()
    dtype = x.dtype
    if dtype == mx.float32 and weight.dtype == mx.float32 and bias.dtype == mx.float32:
        return kernels.layer_norm(x, weight, bias, eps)
    f32 = mx.float32
    return kernels.layer_norm(x.astype(f32), weight.astype(f32), bias.astype(f32), eps).astype(dtype)


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """`mx.fast.rms_norm(x, weight, eps)` over the last axis; weight (D,). Half precision is computed in float32 and
    rounded back."""
    kernels = _require()
    if x.dtype == mx.float32 and weight.dtype == mx.float32:
        return kernels.rms_norm(x, weight, eps)
    return kernels.rms_norm(x.astype(mx.float32), weight.astype(mx.float32), eps).astype(x.dtype)


def silu_gate(a: mx.array, b: mx.array) -> mx.array:
    """silu(a) * b (SwiGLU's gate) in one pass, the sigmoid's exp as `mlx_aim.backend.ops.silu` computes it. Half
    precision is computed in float32 and rounded back."""
    kernels = _require()
    if a.dtype == mx.float32 and b.dtype == mx.float32:
        return kernels.silu_gate(a, b)
    return kernels.silu_gate(a.astype(mx.float32), b.astype(mx.float32)).astype(a.dtype)


def adamw_update(grads: Sequence[mx.array], params: Sequence[mx.array], ms: Sequence[mx.array],
                 vs: Sequence[mx.array], scalars: mx.array, betas: Sequence[float], eps: float, max_norm: float,
                 decayed: Sequence[bool]) -> tuple[list, list, list, mx.array]:
    """One AdamW step over lists of float32 arrays (gradients, parameters and their two moments, in one order), the
    gradients first scaled by min(max_norm / (norm + 1e-6), 1) with `norm` their global norm (`max_norm` 0: not
    scaled). `scalars` holds the step's (c1, c2, decay): lr / (1 - b1^t), 1 / sqrt(1 - b2^t) and 1 - lr weight_decay;
    `decayed[i]` says whether parameter i is decayed. Returns (new parameters, new m, new v, the norm before
    clipping)."""
    n = len(grads)
    out = _require().adamw_update(list(grads), list(params), list(ms), list(vs), scalars, float(betas[0]),
                                  float(betas[1]), float(eps), float(max_norm), [bool(d) for d in decayed])
    return out[:n], out[n:2 * n], out[2 * n:3 * n], out[3 * n]
