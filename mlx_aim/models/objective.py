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

The pixel head acts on each position alone, and the loss reads only the counted outputs (about half of them
when prefixes are uniform), so training runs the head on the counted rows only: `counted_rows` lists them on
the host, padded to one of a few lengths, and `aim_loss(..., rows=, row_weights=)` gives the same loss and
gradients for a fraction of the head's work.
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


ROW_BUCKETS = 16  # `counted_rows` pads to a multiple of ceil(B * (N - 1) / ROW_BUCKETS): see its docstring


def bucketed_length(count: int, total: int, buckets: int = ROW_BUCKETS) -> int:
    """`count` rounded up to a multiple of ceil(total / buckets), at most `total` and at least 1: one of at most
    `buckets` lengths for any count in [0, total]."""
    if total < 1 or buckets < 1 or not 0 <= count <= total:
        raise ValueError(f"bucketed_length: expected 0 <= count <= total, total >= 1 and buckets >= 1, got "
                         f"count={count}, total={total}, buckets={buckets}")
    step = -(-total // buckets)
    return min(total, max(1, -(-count // step)) * step)


def counted_rows(
    prefix_len, num_patches: int, attention: str = "prefix", buckets: int = ROW_BUCKETS
) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a batch's (B * N) outputs that the loss counts, on the host: (rows int32, weights float32).

    Row b * N + i is output i of image b; it counts when `target_mask` says so (i <= N - 2 and i + 1 >=
    prefix_len[b]; "causal" attention counts every i <= N - 2, whatever prefix_len holds). The K counted rows come
    first (weight 1), in order, then padding rows up to `bucketed_length(K, B * (N - 1), buckets)`: row 0 (a valid
    output, whose target is patch 1 of image 0) with weight 0. `mx.compile` traces once per input shape, so a run
    compiles its step at most `buckets` times per micro-batch size.

    The bucket granularity trades compiles for padded rows. Measured for aim-small (N = 256, batch 4, float32) on
    MLX's CPU backend (a shared 2-core AMD EPYC, load average 3-4): one more length costs one trace and compile of
    the gradient function, about 0.06 s (median over 19 new lengths; the process's first trace 0.9 s), once per run;
    a padded row costs the head's forward and backward, about 1 ms (1.0-1.7 ms measured; 12 blocks of width 512),
    every step. With `ROW_BUCKETS` = 16 the step is ceil(4 * 255 / 16) = 64 rows, so padding averages about 32 rows
    (6% of the average 510 counted rows, ~30 ms a step here) for at most 16 compiles (~1 s); 8 buckets would double
    the padding to save ~0.5 s once, 32 would halve it for ~1 s more. On a GPU a row costs far less while a trace is
    the same Python work, which argues against going finer. Causal attention always counts B * (N - 1) rows: one
    length.
    """
    prefix = np.asarray(prefix_len)
    if prefix.ndim != 1 or not np.issubdtype(prefix.dtype, np.integer):
        raise ValueError(f"counted_rows: prefix_len must be a 1-D integer array (one length per sample), got "
                         f"shape {prefix.shape} of {prefix.dtype}")
    if num_patches < 2:
        raise ValueError(f"counted_rows: a next-patch loss needs at least 2 patches, got num_patches={num_patches}")
    if attention == "causal":
        prefix = np.ones_like(prefix)
    elif attention != "prefix":
        raise ValueError(f"counted_rows: attention {attention!r}: expected 'prefix' or 'causal'")
    B, N = len(prefix), num_patches
    counted = np.arange(1, N)[None, :] >= prefix.reshape(-1, 1)  # target_mask's (B, N - 1)
    image, output = np.nonzero(counted)
    rows = (image * N + output).astype(np.int32)
    length = bucketed_length(len(rows), B * (N - 1), buckets)
    weights = np.zeros(length, np.float32)
    weights[: len(rows)] = 1.0
    return np.concatenate([rows, np.zeros(length - len(rows), np.int32)]), weights


def counted_rows_loss(
    pred_rows: mx.array,
    target: mx.array,
    rows: mx.array,
    row_weights: mx.array,
    num_targets: Union[mx.array, float, None] = None,
) -> mx.array:
    """`next_patch_loss` from the predictions at chosen rows only: `pred_rows` (K, D) are the outputs at flat rows
    `rows` (b * N + i, i <= N - 2) of a (B, N, D) `target`, each compared with target row b * N + i + 1; the
    squared error averaged over pixels, weighted by `row_weights` (K,) (1 counts, 0 is padding), summed, divided
    by `num_targets` (default: the weights' sum). With `counted_rows`' rows this is `next_patch_loss` exactly, up
    to the order of the float32 sums."""
    B, N, D = target.shape
    K = pred_rows.shape[0]
    if pred_rows.shape != (K, D) or rows.shape != (K,) or row_weights.shape != (K,):
        raise ValueError(f"counted_rows_loss: expected pred_rows (K, {D}), rows (K,) and row_weights (K,), got "
                         f"{tuple(pred_rows.shape)}, {tuple(rows.shape)} and {tuple(row_weights.shape)}")
    picked = target.reshape(B * N, D)[rows + 1]
    err = mx.square(pred_rows.astype(mx.float32) - picked.astype(mx.float32)).mean(axis=-1)
    total = (err * row_weights.astype(mx.float32)).sum()
    if num_targets is None:
        num_targets = row_weights.sum()
    return total / num_targets


def aim_loss(
    model,
    images: mx.array,
    prefix_len: mx.array,
    num_targets: Union[mx.array, float, None] = None,
    attention: str = "prefix",
    rows: Optional[mx.array] = None,
    row_weights: Optional[mx.array] = None,
) -> mx.array:
    """The AIM loss of an `AIMForPretraining` on a batch of NHWC images.

    `attention` is "prefix" (AIM's recipe) or "causal" (a plain causal mask; pass prefix_len = 1 for every
    sample so that every target counts). With `rows` and `row_weights` (`counted_rows`), the pixel head runs on
    those rows only (`counted_rows_loss`): the same loss and gradients for less work.
    """
    p = model.config.patch_size
    target = norm_pix_target(patchify(images, p), eps=1e-6)
    mask_prefix = prefix_len if attention == "prefix" else None
    if rows is None:
        pred = model(images, mask_prefix, attention=attention)
        return next_patch_loss(pred, target, prefix_len, num_targets)
    if row_weights is None:
        raise ValueError("aim_loss: rows need their row_weights (counted_rows gives both)")
    pred = model(images, mask_prefix, attention=attention, rows=rows)
    return counted_rows_loss(pred, target, rows, row_weights, num_targets)
