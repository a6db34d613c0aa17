"""A PyTorch reference of AIM written for the tests, with Apple's checkpoint key names.

It follows AIM-REFERENCE.md independently of the MLX code so that parity tests compare two implementations.
Input is NCHW, as Apple's PyTorch backend takes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)
    parts = []
    for index in (cols, rows):
        angles = index[:, None] * omega[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()


class Patchifier(tnn.Module):
    def __init__(self, patch, channels, dim):
        super().__init__()
        self.proj = tnn.Conv2d(channels, dim, patch, stride=patch)
        self.norm = tnn.LayerNorm(dim, eps=1e-6)


class Preprocessor(tnn.Module):
    def __init__(self, patch, channels, dim):
        super().__init__()
        self.patchifier = Patchifier(patch, channels, dim)

    def forward(self, x):
        x = self.patchifier.proj(x)
        gh, gw = x.shape[-2:]
        x = self.patchifier.norm(x.flatten(2).transpose(1, 2))
        return x + sincos_2d(gh, gw, x.shape[-1])


class Attention(tnn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = tnn.Linear(dim, dim * 3, bias=False)
        self.proj = tnn.Linear(dim, dim, bias=False)

    def forward(self, x, mask):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(tnn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = tnn.Linear(dim, hidden, bias=False)
        self.fc2 = tnn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(tnn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm_1 = tnn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm_2 = tnn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * 4)

    def forward(self, x, mask):
        x = x + self.attn(self.norm_1(x), mask)
        return x + self.mlp(self.norm_2(x))


class Trunk(tnn.Module):
    def __init__(self, dim, depth, heads):
        super().__init__()
        self.blocks = tnn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.post_trunk_norm = tnn.LayerNorm(dim, eps=1e-6)


class Head(tnn.Module):
    def __init__(self, dim, heads, classes):
        super().__init__()
        self.heads = heads
        self.bn = tnn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.k = tnn.Linear(dim, dim, bias=False)
        self.v = tnn.Linear(dim, dim, bias=False)
        self.cls_token = tnn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.linear = tnn.Linear(dim, classes, bias=False)

    def forward(self, x):
        B, N, C = x.shape
        x = self.bn(x.transpose(-2, -1)).transpose(-2, -1)
        q = self.cls_token.expand(B, -1, -1).reshape(B, 1, self.heads, C // self.heads).permute(0, 2, 1, 3)
        k = self.k(x).reshape(B, N, self.heads, C // self.heads).permute(0, 2, 1, 3)
        v = self.v(x).reshape(B, N, self.heads, C // self.heads).permute(0, 2, 1, 3)
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, C).mean(dim=1)
        return self.linear(pooled), pooled


def torch_mask(mode, num_tokens, prefix_len=None):
    if mode == "bidirectional":
        return None
    i = torch.arange(num_tokens)
    causal = i[:, None] >= i[None, :]
    if mode == "causal":
        return causal
    prefix = torch.as_tensor(np.asarray(prefix_len)).reshape(-1, 1, 1, 1)
    return causal | (i[None, :] < prefix)


class AIMReference(tnn.Module):
    def __init__(self, width, depth, heads, patch=14, channels=3, classes=1000, probe_layers=None):
        super().__init__()
        self.probe_layers = list(probe_layers) if probe_layers else list(range(depth - 6, depth))
        self.preprocessor = Preprocessor(patch, channels, width)
        self.trunk = Trunk(width, depth, heads)
        self.head = Head(width, heads, classes)

    @classmethod
    def from_config(cls, config):
        return cls(config.width, config.depth, config.num_heads, config.patch_size, config.num_channels,
                   config.num_classes, config.probe_layers)

    def randomize_norms(self, seed=0):
        """Non-trivial LayerNorm affines and BatchNorm running statistics, so parity tests see them."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "norm" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            self.head.bn.running_mean.copy_(torch.randn(self.head.bn.running_mean.shape, generator=g) * 0.5)
            self.head.bn.running_var.copy_(torch.rand(self.head.bn.running_var.shape, generator=g) + 0.5)
        return self

    @torch.no_grad()
    def stages(self, images_nchw, mode="bidirectional", prefix_len=None, max_block_id=None):
        """Every stage's output: preprocessed tokens, each block, the normed trunk output, probe input, logits."""
        x = self.preprocessor(images_nchw)
        out = {"preprocessor": x}
        mask = torch_mask(mode, x.shape[1], prefix_len)
        last = max(self.probe_layers) if max_block_id is None else max_block_id
        feats = []
        for i, block in enumerate(self.trunk.blocks[: last + 1]):
            x = block(x, mask)
            feats.append(x)
            out[f"block_{i}"] = x
        out["trunk"] = self.trunk.post_trunk_norm(x)
        probe_in = torch.stack([feats[i] for i in self.probe_layers]).mean(0)
        out["probe_input"] = probe_in
        out["logits"], out["pooled"] = self.head(probe_in)
        return out


def state_dict_numpy(model: tnn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
