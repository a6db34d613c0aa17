"""The building blocks of AIM and AIMv2: patch embedding, position embeddings, attention masks, transformer
blocks, the attentive probe and the pre-training head.

Both families share the patch conv, the attention and the pre-norm block; they differ in the norm (AIM's
LayerNorm, AIMv2's RMSNorm), the MLP (GELU, SwiGLU) and the position embedding (sin-cos; AIMv2's fixed-size
checkpoints learn theirs). Parameter names follow Apple's checkpoints (apple/ml-aim, `aim-v1/` and `aim-v2/`)
so that their state dicts load with `strict=True`. Images are NHWC, MLX's native layout. Linear layers, layer norm, the
attention core and the activations come from `mlx_aim.backend`, which picks each one's implementation for the
device.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..backend import LayerNorm, Linear, RMSNorm, gelu, prepare_mask, qkv_attention, silu_gate


# An attention mask as the trunk takes it: None (bidirectional), "causal", or a boolean array
# broadcastable to (batch, heads, queries, keys) where True means "may attend".
AttentionMask = Optional[Union[str, mx.array]]

# A norm layer's constructor: width -> module. AIM's is `layer_norm(eps)`, AIMv2's `rms_norm(eps)`.
Norm = Callable[[int], nn.Module]


# The key a checkpointed block's random draws split from (`block_key`); None: MLX's global generator.
_BLOCK_KEY: list[Optional[mx.array]] = [None]


@contextlib.contextmanager
def block_key(key: Optional[mx.array]) -> Iterator[None]:
    """Within it, `random_key()` splits its keys off `key`: a block recomputed in the backward pass
    (`Trunk.grad_checkpoint`) then draws the same drop-path and dropout masks as its forward pass did."""
    saved = _BLOCK_KEY[0]
    _BLOCK_KEY[0] = key
    try:
        yield
    finally:
        _BLOCK_KEY[0] = saved


def random_key() -> Optional[mx.array]:
    """The key of a block's next random draw: split off `block_key`'s when one is set, else None (the global
    generator)."""
    if _BLOCK_KEY[0] is None:
        return None
    _BLOCK_KEY[0], key = mx.random.split(_BLOCK_KEY[0])
    return key


def layer_norm(eps: float) -> Norm:
    return functools.partial(LayerNorm, eps=eps)


def rms_norm(eps: float) -> Norm:
    """RMSNorm with a weight and no bias (AIMv2): the backend's `RMSNorm` (`nn.RMSNorm`'s parameters)."""
    return functools.partial(RMSNorm, eps=eps)


@functools.lru_cache(maxsize=32)
def _sincos_pos_embed_np(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    # Tokens are numbered row by row; the first dim/2 channels encode the column, the last dim/2 the row,
    # each half d/4 sines then d/4 cosines (the MAE/AIM convention). Computed in float64, cast once.
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")

    def encode(index):
        angles = index.reshape(-1, 1) * omega
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


def sincos_pos_embed(grid_h: int, grid_w: int, dim: int) -> mx.array:
    """The fixed 2-D sin-cos position embedding, shape (grid_h * grid_w, dim), float32."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    return mx.array(_sincos_pos_embed_np(grid_h, grid_w, dim))


def causal_mask(num_tokens: int) -> mx.array:
    """Boolean (num_tokens, num_tokens): token i attends to tokens j <= i."""
    idx = mx.arange(num_tokens)
    return idx[:, None] >= idx[None, :]


def prefix_causal_mask(prefix_len: mx.array, num_tokens: int) -> mx.array:
    """Boolean (batch, 1, num_tokens, num_tokens) for prefix-causal attention (AIM section 3).

    Token i attends to j when j <= i or j lies in the prefix (j < prefix_len). So prefix tokens see the
    whole prefix and nothing after it; later tokens see the prefix and everything up to themselves.
    """
    prefix_len = mx.array(prefix_len).reshape(-1, 1, 1, 1)
    idx = mx.arange(num_tokens)
    return (idx[:, None] >= idx[None, :]) | (idx[None, :] < prefix_len)


def attention_mask(mode: str, num_tokens: int, prefix_len: Optional[mx.array] = None) -> AttentionMask:
    """The mask for one of the three attention modes: "bidirectional", "causal" or "prefix"."""
    if mode == "bidirectional":
        return None
    if mode == "causal":
        return "causal"
    if mode == "prefix":
        if prefix_len is None:
            raise ValueError("attention mode 'prefix' needs prefix_len (one length per sample)")
        return prefix_causal_mask(prefix_len, num_tokens)
    raise ValueError(f"unknown attention mode {mode!r}: expected 'bidirectional', 'causal' or 'prefix'")


class PatchEmbed(nn.Module):
    """Conv with kernel = stride = patch size, then a norm: (B, H, W, C) -> (B, H/p * W/p, D)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int, norm: Norm):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)
        self.norm = norm(dim)

    def __call__(self, images: mx.array) -> mx.array:
        x = self.proj(images)  # (B, gh, gw, D): flattening row-major numbers tokens row by row
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return self.norm(x)


class Preprocessor(nn.Module):
    """Patch embedding plus position embedding: by default the fixed 2-D sin-cos one, computed for each input
    grid and not a parameter (AIM; AIMv2 at native resolution); with `num_positions`, a learned `pos_embed` of
    shape (1, num_positions, D) for one grid size (AIMv2's fixed-size checkpoints)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int, norm: Norm, num_positions: Optional[int] = None):
        super().__init__()
        self.patch_size = patch_size
        self.patchifier = PatchEmbed(patch_size, in_channels, dim, norm)
        if num_positions is not None:
            self.pos_embed = mx.random.normal((1, num_positions, dim)) * 0.02

    def __call__(self, images: mx.array) -> mx.array:
        x = self.patchifier(images)
        if "pos_embed" in self:
            if x.shape[1] != self.pos_embed.shape[1]:  # a broadcast would hide a single-patch mismatch
                raise ValueError(f"{x.shape[1]} patches for a learned position embedding of {self.pos_embed.shape[1]}")
            return x + self.pos_embed.astype(x.dtype)
        grid_h, grid_w = images.shape[1] // self.patch_size, images.shape[2] // self.patch_size
        return x + sincos_pos_embed(grid_h, grid_w, x.shape[-1]).astype(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = Linear(dim, 3 * dim, bias=False)
        self.proj = Linear(dim, dim, bias=False)

    def __call__(self, x: mx.array, mask: AttentionMask = None) -> mx.array:
        return self.proj(qkv_attention(self.qkv(x), self.num_heads, self.scale, mask))


class MLP(nn.Module):
    """AIM's MLP: fc2(gelu(fc1(x)))."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.fc1 = Linear(dim, hidden, bias=bias)
        self.fc2 = Linear(hidden, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """AIMv2's MLP, without biases: fc2(silu(fc1(x)) * fc3(x)), fc1 the gate, fc3 the up projection."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden, bias=False)
        self.fc2 = Linear(hidden, dim, bias=False)
        self.fc3 = Linear(dim, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(silu_gate(self.fc1(x), self.fc3(x)))


class Block(nn.Module):
    """Pre-norm transformer block, x + attn(norm_1(x)) then x + mlp(norm_2(x)), with the family's norm and MLP;
    no biases in its linear layers (neither AIM nor AIMv2 has any).

    `drop_path` (0 unless a fine-tuning run sets it): in training mode each residual branch is dropped for a whole
    sample with that probability and the kept ones scaled by 1 / (1 - p), as timm's `DropPath` (stochastic depth).
    """

    drop_path: float = 0.0

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, norm: Norm):
        super().__init__()
        self.norm_1 = norm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm_2 = norm(dim)
        self.mlp = mlp

    def __call__(self, x: mx.array, mask: AttentionMask = None) -> mx.array:
        x = x + self._dropped(self.attn(self.norm_1(x), mask))
        return x + self._dropped(self.mlp(self.norm_2(x)))

    def _dropped(self, branch: mx.array) -> mx.array:
        if not self.training or not self.drop_path:
            return branch
        keep = 1.0 - self.drop_path
        kept = mx.random.bernoulli(keep, (branch.shape[0],) + (1,) * (branch.ndim - 1), key=random_key())
        return branch * (kept.astype(branch.dtype) / keep)


def aim_block(dim: int, num_heads: int, mlp_ratio: float, eps: float) -> Block:
    """AIM's block: LayerNorm and a GELU MLP of `mlp_ratio` times the width."""
    return Block(dim, num_heads, MLP(dim, int(dim * mlp_ratio)), layer_norm(eps))


def aimv2_block(dim: int, num_heads: int, hidden_dim: int, eps: float) -> Block:
    """AIMv2's block: RMSNorm and a SwiGLU MLP of hidden size `hidden_dim`."""
    return Block(dim, num_heads, SwiGLU(dim, hidden_dim), rms_norm(eps))


class Trunk(nn.Module):
    """The blocks and the final norm (`post_trunk_norm`).

    `grad_checkpoint` (False unless a training run sets it): in training mode each block's activations are not kept
    for the backward pass but recomputed there (`mx.checkpoint`), trading a second forward pass for activation
    memory. Each block's random draws (drop path, LoRA dropout) then come from a key drawn for it from the global
    generator, so that the recomputation draws the same masks.
    """

    grad_checkpoint: bool = False

    def __init__(self, blocks: list[Block], post_trunk_norm: nn.Module):
        super().__init__()
        self.blocks = blocks
        self.post_trunk_norm = post_trunk_norm

    def __call__(
        self, x: mx.array, mask: AttentionMask = None, max_block_id: Optional[int] = None
    ) -> tuple[mx.array, list[mx.array]]:
        """Returns the final normed output and every run block's raw output, stopping at `max_block_id`.

        With `max_block_id` set, the final norm is applied to that block's output.
        """
        last = len(self.blocks) - 1 if max_block_id is None else max_block_id
        mask = prepare_mask(mask, x.shape[1])  # once, not in every block
        features = []
        checkpointed = self.grad_checkpoint and self.training
        for block in self.blocks[: last + 1]:
            x = _checkpointed(block, x, mask) if checkpointed else block(x, mask)
            features.append(x)
        return self.post_trunk_norm(x), features


def _checkpointed(block: Block, x: mx.array, mask: AttentionMask) -> mx.array:
    """`block(x, mask)` whose activations are recomputed in the backward pass; its trainable parameters are
    inputs of the checkpointed function so that their gradients flow (as mlx-lm's `grad_checkpoint`)."""

    key = mx.random.randint(0, 2**31 - 1, (2,), dtype=mx.uint32)  # not an input: nothing to differentiate

    def run(params, x):
        block.update(params)
        with block_key(key):
            return block(x, mask)

    return mx.checkpoint(run)(block.trainable_parameters(), x)


def attention_pool(head: nn.Module, x: mx.array) -> mx.array:
    """One learned query (`head.cls_token`) attending over all tokens through `head.k` and `head.v` in
    `head.num_heads` heads: (B, N, D) -> (B, D)."""
    B, N, D = x.shape
    H = head.num_heads
    q = mx.broadcast_to(head.cls_token.astype(x.dtype), (B, 1, D)).reshape(B, 1, H, D // H).transpose(0, 2, 1, 3)
    k = head.k(x).reshape(B, N, H, D // H).transpose(0, 2, 1, 3)
    v = head.v(x).reshape(B, N, H, D // H).transpose(0, 2, 1, 3)
    # One query over the patches: too small for the backend's choice to matter, MLX's fused attention.
    pooled = mx.fast.scaled_dot_product_attention(q, k, v, scale=(D // H) ** -0.5)
    return pooled.transpose(0, 2, 1, 3).reshape(B, -1, D).mean(axis=1)


class AttentionProbe(nn.Module):
    """The attentive probe (AIM section 4): BatchNorm, one learned query attending over all patches, linear.

    Input: the mean of the chosen blocks' raw outputs, (B, N, D). Returns (logits, pooled embedding).
    """

    def __init__(self, dim: int, num_heads: int, num_classes: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.bn = nn.BatchNorm(dim, eps=eps, affine=False)
        self.k = Linear(dim, dim, bias=False)
        self.v = Linear(dim, dim, bias=False)
        self.cls_token = mx.random.normal((1, 1, dim)) * 0.02
        self.linear = Linear(dim, num_classes, bias=False)

    def pool(self, x: mx.array) -> mx.array:
        return attention_pool(self, self.bn(x))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        pooled = self.pool(x)
        return self.linear(pooled), pooled


class AttentionPoolHead(nn.Module):
    """AIMv2-LiT's image pooling head: one learned query over the trunk's normed tokens, no BatchNorm, `k` and `v`
    without bias, then `linear` (D -> D) with bias."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.k = Linear(dim, dim, bias=False)
        self.v = Linear(dim, dim, bias=False)
        self.cls_token = mx.random.normal((1, 1, dim)) * 0.02
        self.linear = Linear(dim, dim, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(attention_pool(self, x))


class TextPreprocessor(nn.Module):
    """AIMv2-LiT's text input: token embedding plus a learned positional embedding of (context_length, D)."""

    def __init__(self, vocab_size: int, dim: int, context_length: int):
        super().__init__()
        self.text_embedding = nn.Embedding(vocab_size, dim)
        self.positional_embedding = mx.random.normal((context_length, dim)) * 0.01

    def __call__(self, token_ids: mx.array) -> mx.array:
        x = self.text_embedding(token_ids)
        return x + self.positional_embedding[: token_ids.shape[1]].astype(x.dtype)


class PixelHead(nn.Module):
    """The pre-training prediction head: shared over positions, discarded afterwards (AIM section 3).

    Linear in (trunk width -> head width), the sin-cos position embedding added again, `depth` pre-norm
    residual MLP blocks, a final LayerNorm, a linear out to the patch's pixels.

    Every step after the position embedding acts on each token alone, so the head runs as well on any chosen
    tokens: `positions` (K,) gives the grid position of each row of a (K, in_dim) `x`.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, out_dim: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.in_proj = Linear(in_dim, dim)
        self.norms = [LayerNorm(dim, eps=eps) for _ in range(depth)]
        self.mlps = [MLP(dim, int(dim * mlp_ratio), bias=True) for _ in range(depth)]
        self.norm = LayerNorm(dim, eps=eps)
        self.out_proj = Linear(dim, out_dim)

    def __call__(self, x: mx.array, grid: tuple[int, int], positions: Optional[mx.array] = None) -> mx.array:
        """(B, N, in_dim) tokens, or (K, in_dim) rows at grid `positions` (K,) -> the same leading shape by out_dim."""
        x = self.in_proj(x)
        pos_embed = sincos_pos_embed(grid[0], grid[1], x.shape[-1])
        x = x + (pos_embed if positions is None else pos_embed[positions]).astype(x.dtype)
        for norm, mlp in zip(self.norms, self.mlps):
            x = x + mlp(norm(x))
        return self.out_proj(self.norm(x))
