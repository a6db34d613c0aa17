"""The AIM pre-training objective, piece by piece (AIM section 3).

Raster order: patches are numbered row by row, and the model's output at position i predicts patch i + 1
from patches 0..i (and the whole prefix). Targets are the patch pixels normalised per patch. Each sample
draws a prefix length S uniformly from [1, K - 1]; the first S patches attend to each other
bidirectionally (`mlx_aim.models.layers.prefix_causal_mask`) and only targets outside the prefix count.

Averaging (a choice made here): the squared error is averaged over a patch's pixels, then over every
counted position of the batch together (token-weighted, as MAE's masked loss), not per sample first, so an
image with a long prefix (few targets) weighs less than one with a short prefix. `next_patch_loss` takes
the divisor `num_targets` explicitly, so that micro-batches and data-parallel shards can each divide by
the whole batch's count and their sums equal the loss of the whole batch exactly.

    patches = patchify(images, 14)                       # (B, 256, 588)
    prefix_len = sample_prefix_len(rng, B, 256)          # (B,) in [1, 255]
    loss = aim_loss(model, images, prefix_len)
"""

from __future__ import annotations

import math
from typing import Optional, Union

import mlx.core as mx
import numpy as np


def patchify(images: mx.array, patch_size: int) -> mx.array:
    """(B, H, W, C) -> (B, N, p * p * C): patches row by row, pixels (row, col, channel) within a patch.

    The within-patch order is the patch-embedding conv's weight layout (out, kh, kw, in), so patch k is
    exactly what the conv sees at token k.
    """
    if images.ndim != 4:
        raise ValueError(f"patchify: expected NHWC images (4-D), got shape {tuple(images.shape)}")
    B, H, W, C = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"patchify: image {H}x{W} is not divisible by patch_size={p}")
    x = images.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(
    patches: mx.array, patch_size: int, grid: Optional[tuple[int, int]] = None, num_channels: int = 3
) -> mx.array:
    """Inverse of `patchify`: (B, N, p * p * C) -> (B, gh * p, gw * p, C). `grid` defaults to square."""
    B, N, D = patches.shape
    p, C = patch_size, num_channels
    if D != p * p * C:
        raise ValueError(f"unpatchify: patch size {D} is not {p}*{p}*{C}")
    if grid is None:
        side = math.isqrt(N)
        if side * side != N:
            raise ValueError(f"unpatchify: {N} patches do not form a square grid; pass grid=(rows, cols)")
        grid = (side, side)
    gh, gw = grid
    if gh * gw != N:
        raise ValueError(f"unpatchify: grid {gh}x{gw} does not hold {N} patches")
    x = patches.reshape(B, gh, gw, p, p, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, gh * p, gw * p, C)


def sample_prefix_len(
    rng: Union[np.random.Generator, mx.array, None], batch_size: int, num_patches: int
) -> mx.array:
    """Per-sample prefix lengths, uniform in [1, num_patches - 1], as int32 (batch_size,).

    `rng` is a numpy Generator, an MLX PRNG key, or None for MLX's global generator.
    """
    if num_patches < 2:
        raise ValueError(f"prefix lengths need at least 2 patches, got num_patches={num_patches}")
    if isinstance(rng, np.random.Generator):
        return mx.array(rng.integers(1, num_patches, size=batch_size).astype(np.int32))
    return mx.random.randint(1, num_patches, (batch_size,), dtype=mx.int32, key=rng)


def norm_pix_target(patches: mx.array, eps: float = 1e-6) -> mx.array:
    """Each patch normalised by its own mean and unbiased variance: (x - mean) / sqrt(var + eps).

    Computed in float32 whatever the input dtype. The unbiased variance (ddof=1) matches MAE's norm-pix
    loss, which uses PyTorch's default `var`.
    """
    x = patches.astype(mx.float32)
    mean = x.mean(axis=-1, keepdims=True)
    var = mx.var(x, axis=-1, keepdims=True, ddof=1)
    return (x - mean) * mx.rsqrt(var + eps)


def target_mask(prefix_len: mx.array, num_patches: int) -> mx.array:
    """Boolean (B, N - 1): entry (b, i) says whether output i's target, patch i + 1, counts in the loss.

    A target counts when it lies outside the prefix (index >= prefix_len): inside the prefix, a prefix
    token sees its target through bidirectional attention.
    """
    target_index = mx.arange(1, num_patches)
    return target_index[None, :] >= mx.array(prefix_len).reshape(-1, 1)


def num_targets(prefix_len: mx.array, num_patches: int) -> mx.array:
    """How many targets count in a batch: the sum over samples of num_patches - prefix_len."""
    return (num_patches - mx.array(prefix_len)).sum()


def next_patch_loss(
    pred: mx.array,
    target: mx.array,
    prefix_len: mx.array,
    num_targets: Union[mx.array, float, None] = None,
) -> mx.array:
    """Squared error of output i against target i + 1, averaged over pixels, summed over the counted
    positions, divided by `num_targets` (default: this batch's count of counted positions).

    `pred` and `target` are (B, N, D); `target` already normalised (`norm_pix_target`). The last output
    predicts nothing and is ignored. Masked positions contribute exactly zero, gradient included.
    """
    if pred.shape != target.shape:
        raise ValueError(f"next_patch_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    N = pred.shape[1]
    err = mx.square(pred[:, :-1].astype(mx.float32) - target[:, 1:].astype(mx.float32)).mean(axis=-1)
    mask = target_mask(prefix_len, N)
    total = mx.where(mask, err, 0.0).sum()
    if num_targets is None:
        num_targets = mask.sum()
    return total / num_targets


def aim_loss(
    model,
    images: mx.array,
    prefix_len: mx.array,
    num_targets: Union[mx.array, float, None] = None,
    attention: str = "prefix",
) -> mx.array:
    """The AIM loss of an `AIMForPretraining` on a batch of NHWC images.

    `attention` is "prefix" (AIM's recipe) or "causal" (a plain causal mask; pass prefix_len = 1 for every
    sample so that every target counts).
    """
    p = model.config.patch_size
    target = norm_pix_target(patchify(images, p), eps=1e-6)
    pred = model(images, prefix_len if attention == "prefix" else None, attention=attention)
    return next_patch_loss(pred, target, prefix_len, num_targets)
