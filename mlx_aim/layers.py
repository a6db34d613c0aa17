"""The building blocks of AIM: patch embedding, position embedding, attention masks, transformer blocks.

Parameter names follow Apple's checkpoints (AIM-REFERENCE.md) so that their state dicts load with
`strict=True`. Images are NHWC, MLX's native layout. Linear layers, the attention core and GELU come from
`mlx_aim.backend`, which picks each one's implementation for the device.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .backend import Linear, attention, gelu, prepare_mask


# An attention mask as the trunk takes it: None (bidirectional), "causal", or a boolean array
# broadcastable to (batch, heads, queries, keys) where True means "may attend".
AttentionMask = Optional[Union[str, mx.array]]


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
    """Conv with kernel = stride = patch size, then LayerNorm: (B, H, W, C) -> (B, H/p * W/p, D)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int, eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def __call__(self, images: mx.array) -> mx.array:
        x = self.proj(images)  # (B, gh, gw, D): flattening row-major numbers tokens row by row
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return self.norm(x)


class Preprocessor(nn.Module):
    """Patch embedding plus the fixed position embedding (not a parameter: it is not in the checkpoints)."""

    def __init__(self, patch_size: int, in_channels: int, dim: int, eps: float):
        super().__init__()
        self.patch_size = patch_size
        self.patchifier = PatchEmbed(patch_size, in_channels, dim, eps)

    def __call__(self, images: mx.array) -> mx.array:
        grid_h, grid_w = images.shape[1] // self.patch_size, images.shape[2] // self.patch_size
        x = self.patchifier(images)
        return x + sincos_pos_embed(grid_h, grid_w, x.shape[-1]).astype(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = Linear(dim, 3 * dim, bias=False)
        self.proj = Linear(dim, dim, bias=False)

    def __call__(self, x: mx.array, mask: AttentionMask = None) -> mx.array:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        out = attention(q, k, v, self.scale, mask)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.fc1 = Linear(dim, hidden, bias=bias)
        self.fc2 = Linear(hidden, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block without biases in its linear layers (AIM has none)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def __call__(self, x: mx.array, mask: AttentionMask = None) -> mx.array:
        x = x + self.attn(self.norm_1(x), mask)
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.blocks = [Block(dim, num_heads, mlp_ratio, eps) for _ in range(depth)]
        self.post_trunk_norm = nn.LayerNorm(dim, eps=eps)

    def __call__(
        self, x: mx.array, mask: AttentionMask = None, max_block_id: Optional[int] = None
    ) -> tuple[mx.array, list[mx.array]]:
        """Returns the final normed output and every run block's raw output, stopping at `max_block_id`.

        With `max_block_id` set, the final LayerNorm is applied to that block's output.
        """
        last = len(self.blocks) - 1 if max_block_id is None else max_block_id
        mask = prepare_mask(mask, x.shape[1])  # once, not in every block
        features = []
        for block in self.blocks[: last + 1]:
            x = block(x, mask)
            features.append(x)
        return self.post_trunk_norm(x), features


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
        B, N, D = x.shape
        H = self.num_heads
        x = self.bn(x)
        q = mx.broadcast_to(self.cls_token.astype(x.dtype), (B, 1, D)).reshape(B, 1, H, D // H).transpose(0, 2, 1, 3)
        k = self.k(x).reshape(B, N, H, D // H).transpose(0, 2, 1, 3)
        v = self.v(x).reshape(B, N, H, D // H).transpose(0, 2, 1, 3)
        # One query over the patches: too small for the backend's choice to matter, MLX's fused attention.
        pooled = mx.fast.scaled_dot_product_attention(q, k, v, scale=(D // H) ** -0.5)
        return pooled.transpose(0, 2, 1, 3).reshape(B, -1, D).mean(axis=1)

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        pooled = self.pool(x)
        return self.linear(pooled), pooled


class PixelHead(nn.Module):
    """The pre-training prediction head: shared over positions, discarded afterwards (AIM section 3).

    Linear in (trunk width -> head width), the sin-cos position embedding added again, `depth` pre-norm
    residual MLP blocks, a final LayerNorm, a linear out to the patch's pixels.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, out_dim: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.in_proj = Linear(in_dim, dim)
        self.norms = [nn.LayerNorm(dim, eps=eps) for _ in range(depth)]
        self.mlps = [MLP(dim, int(dim * mlp_ratio), bias=True) for _ in range(depth)]
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.out_proj = Linear(dim, out_dim)

    def __call__(self, x: mx.array, grid: tuple[int, int]) -> mx.array:
        x = self.in_proj(x)
        x = x + sincos_pos_embed(grid[0], grid[1], x.shape[-1]).astype(x.dtype)
        for norm, mlp in zip(self.norms, self.mlps):
            x = x + mlp(norm(x))
        return self.out_proj(self.norm(x))
