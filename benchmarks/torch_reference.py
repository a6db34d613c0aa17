"""AIM in PyTorch, written from the paper (arXiv 2401.08541) with the key names of Apple's checkpoints (apple/ml-aim,
`aim-v1/`): the tests' reference and the benchmark's opponent.

The parity tests (`tests/conftest.py` puts this folder on `sys.path`) compare the MLX model with it stage by
stage; `scripts/benchmark.py --compare-torch` times it against MLX on the same weights, and the tools next to
it (`parity.py`, `bench_kernels.py --torch`) use it too. It follows the paper and Apple's checkpoints
independently of the MLX code, in the usual eager PyTorch style (fused `F.scaled_dot_product_attention`,
`F.layer_norm`, `F.gelu`). Input is NCHW, as Apple's PyTorch backend takes.

It lives outside the `mlx_aim` package, in a source checkout only: mlx-aim never needs torch at run time.
"""

from __future__ import annotations

from typing import Optional

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
        return x + sincos_2d(gh, gw, x.shape[-1]).to(x.device, x.dtype)


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
    def __init__(self, dim, hidden, bias=False):
        super().__init__()
        self.fc1 = tnn.Linear(dim, hidden, bias=bias)
        self.fc2 = tnn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(tnn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm_1 = tnn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm_2 = tnn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, mask):
        x = x + self.attn(self.norm_1(x), mask)
        return x + self.mlp(self.norm_2(x))


class Trunk(tnn.Module):
    def __init__(self, dim, depth, heads, mlp_ratio=4.0):
        super().__init__()
        self.blocks = tnn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
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


def torch_mask(mode, num_tokens, prefix_len=None, device=None):
    if mode == "bidirectional":
        return None
    i = torch.arange(num_tokens, device=device)
    causal = i[:, None] >= i[None, :]
    if mode == "causal":
        return causal
    prefix = prefix_len if torch.is_tensor(prefix_len) else torch.as_tensor(np.asarray(prefix_len))
    return causal | (i[None, :] < prefix.to(i.device).reshape(-1, 1, 1, 1))


class AIMReference(tnn.Module):
    """The classifier: trunk up to the deepest probe layer, then the attentive probe."""

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

    def forward(self, images_nchw, mode="bidirectional"):
        """Logits, running the trunk only up to the deepest probe layer (as the MLX model does)."""
        x = self.preprocessor(images_nchw)
        mask = torch_mask(mode, x.shape[1], device=x.device)
        feats = []
        for block in self.trunk.blocks[: max(self.probe_layers) + 1]:
            x = block(x, mask)
            feats.append(x)
        logits, _ = self.head(torch.stack([feats[i] for i in self.probe_layers]).mean(0))
        return logits

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


# ----------------------------------------------------------------------------------------------------
# Pre-training: trunk + pixel head, the next-patch loss, one AdamW step (AIM section 3, the released recipe)


class PixelHead(tnn.Module):
    """Linear in, the sin-cos position embedding again, `depth` pre-norm residual MLP blocks, norm, linear out.
    Key names as `mlx_aim.models.layers.PixelHead`, so weights copy across by name."""

    def __init__(self, in_dim, dim, depth, out_dim, mlp_ratio=4.0):
        super().__init__()
        self.in_proj = tnn.Linear(in_dim, dim)
        self.norms = tnn.ModuleList([tnn.LayerNorm(dim, eps=1e-6) for _ in range(depth)])
        self.mlps = tnn.ModuleList([Mlp(dim, int(dim * mlp_ratio), bias=True) for _ in range(depth)])
        self.norm = tnn.LayerNorm(dim, eps=1e-6)
        self.out_proj = tnn.Linear(dim, out_dim)

    def forward(self, x, grid, positions=None):
        """(B, N, in_dim) tokens, or (K, in_dim) rows at grid `positions` (K,)."""
        x = self.in_proj(x)
        pos = sincos_2d(grid[0], grid[1], x.shape[-1]).to(x.device, x.dtype)
        x = x + (pos if positions is None else pos[positions])
        for norm, mlp in zip(self.norms, self.mlps):
            x = x + mlp(norm(x))
        return self.out_proj(self.norm(x))


class AIMPretrainingReference(tnn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.patch = c.patch_size
        self.preprocessor = Preprocessor(c.patch_size, c.num_channels, c.width)
        self.trunk = Trunk(c.width, c.depth, c.num_heads, c.mlp_ratio)
        self.pixel_head = PixelHead(c.width, c.head_width, c.head_depth, c.patch_dim, c.mlp_ratio)

    def forward(self, images_nchw, prefix_len, rows=None):
        """(B, N, patch_dim) predictions; with `rows` (K,) flat indices b * N + i, the head's (K, patch_dim) outputs at
        those rows only."""
        x = self.preprocessor(images_nchw)
        mask = torch_mask("prefix", x.shape[1], prefix_len, device=x.device)
        for block in self.trunk.blocks:
            x = block(x, mask)
        grid = (images_nchw.shape[2] // self.patch, images_nchw.shape[3] // self.patch)
        x = self.trunk.post_trunk_norm(x)
        if rows is None:
            return self.pixel_head(x, grid)
        return self.pixel_head(x.flatten(0, 1)[rows], grid, positions=rows % x.shape[1])


def patchify_nchw(images, p):
    """(B, C, H, W) -> (B, N, p * p * C), pixels (row, col, channel) within a patch, as `mlx_aim.models.objective`."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def counted_outputs(prefix_len, num_patches, device):
    """Boolean (B, N - 1): output i of image b counts when its target, patch i + 1, lies outside the prefix."""
    return torch.arange(1, num_patches, device=device)[None, :] >= prefix_len.to(device).reshape(-1, 1)


def counted_row_indices(prefix_len, num_patches, device):
    """The counted outputs as flat row indices b * N + i, (K,) int64, in order."""
    image, output = counted_outputs(prefix_len, num_patches, device).nonzero(as_tuple=True)
    return image * num_patches + output


def aim_loss(pred, images_nchw, prefix_len, patch, rows=None):
    """Next-patch squared error on per-patch normalised pixels, over targets outside the prefix. `pred` is (B, N, D),
    or with `rows` (the counted rows, `counted_row_indices`) the (K, D) predictions at those rows."""
    patches = patchify_nchw(images_nchw, patch).float()
    target = (patches - patches.mean(-1, keepdim=True)) / torch.sqrt(patches.var(-1, keepdim=True) + 1e-6)
    counted = counted_outputs(prefix_len, target.shape[1], pred.device)
    if rows is not None:
        return (pred.float() - target.flatten(0, 1)[rows + 1]).square().mean(-1).sum() / counted.sum()
    err = (pred[:, :-1].float() - target[:, 1:]).square().mean(-1)
    return (err * counted).sum() / counted.sum()


class PretrainStep:
    """One optimizer step as `mlx_aim.training.pretrain.TrainStep` takes it: forward, next-patch loss, backward, clip the
    global gradient norm at 1.0, AdamW (betas 0.9/0.95, eps 1e-8, weight decay 0.05 on matrices only).
    `dtype=torch.bfloat16` runs forward and backward under autocast (on the images' device), float32 masters, as
    MLX's bfloat16. `counted_rows` (off by default: Apple's step runs the head on every token) runs the pixel head on
    the rows the loss counts only, as mlx-aim's step does: the same loss and gradients for less work."""

    def __init__(self, model: AIMPretrainingReference, lr=1e-3, grad_clip=1.0, dtype: Optional[torch.dtype] = None,
                 counted_rows: bool = False):
        self.model, self.grad_clip, self.dtype, self.counted_rows = model, grad_clip, dtype, counted_rows
        decay = [p for p in model.parameters() if p.ndim >= 2]
        rest = [p for p in model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
            lr=lr, betas=(0.9, 0.95), eps=1e-8,
        )

    def __call__(self, images_nchw, prefix_len):
        loss = self.backward(images_nchw, prefix_len)
        return loss, self.update()

    def backward(self, images_nchw, prefix_len):
        """The step's first half: the loss, its gradients left in each parameter's `.grad` (before clipping)."""
        self.optimizer.zero_grad(set_to_none=True)
        rows = None
        if self.counted_rows:
            num_patches = (images_nchw.shape[2] // self.model.patch) * (images_nchw.shape[3] // self.model.patch)
            rows = counted_row_indices(prefix_len, num_patches, images_nchw.device)
        if self.dtype is not None and self.dtype != torch.float32:
            with torch.autocast(images_nchw.device.type, dtype=self.dtype):
                pred = self.model(images_nchw, prefix_len, rows)
        else:
            pred = self.model(images_nchw, prefix_len, rows)
        loss = aim_loss(pred, images_nchw, prefix_len, self.model.patch, rows)
        loss.backward()
        return loss.detach()

    def update(self):
        """The step's second half: clips the gradients in place, takes the AdamW step; returns the norm before
        clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return norm


class LoRA(tnn.Module):
    """A frozen linear layer plus scale * (x @ lora_a) @ lora_b, scale = alpha / rank (Hu et al. 2021): with `pairs`
    3, the fused qkv projection with one factor pair each for q, k and v (apple/ml-l3m's `LoraAttention`), the
    factors stacked as (3, in, rank) and (3, rank, width). Key names and layouts are mlx_aim.models.lora's."""

    def __init__(self, linear: tnn.Linear, rank: int = 8, alpha: float = 1.0, pairs: Optional[int] = None):
        super().__init__()
        linear.weight.requires_grad_(False)
        self.linear, self.pairs, self.scale = linear, pairs, alpha / rank
        lead = () if pairs is None else (pairs,)
        width = linear.out_features // (pairs or 1)
        bound = linear.in_features ** -0.5
        self.lora_a = tnn.Parameter(torch.empty(*lead, linear.in_features, rank).uniform_(-bound, bound))
        self.lora_b = tnn.Parameter(torch.zeros(*lead, rank, width))

    def forward(self, x):
        if self.pairs is None:
            delta = (x @ self.lora_a) @ self.lora_b
        else:
            delta = torch.cat([(x @ self.lora_a[i]) @ self.lora_b[i] for i in range(self.pairs)], dim=-1)
        return self.linear(x) + self.scale * delta


def add_lora(model: AIMReference, rank: int = 8, alpha: float = 1.0) -> AIMReference:
    """LoRA on every block's qkv (q, k, v apart) and proj, the rest of the trunk frozen, the probe trainable: what
    `mlx_aim.models.lora.apply_lora` with its defaults and a fresh probe make."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.trunk.blocks:
        block.attn.qkv = LoRA(block.attn.qkv, rank, alpha, pairs=3)
        block.attn.proj = LoRA(block.attn.proj, rank, alpha)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return model


class FinetuneStep:
    """One optimizer step as `mlx_aim.training.finetune.make_step` takes it: forward in training mode (the probe's
    BatchNorm on batch statistics), cross-entropy on the logits, backward, AdamW (betas 0.9/0.999, eps 1e-8, weight
    decay 0.05 on matrices only) on the parameters that train: the adapters and the probe after `add_lora`, every
    parameter otherwise (full fine-tuning, where `layer_decay` gives each layer its own rate as BEiT's and MAE's
    `param_groups_lrd`: the patch embedding layer 0, block i layer i + 1, the rest depth + 1)."""

    def __init__(self, model: AIMReference, lr=1e-3, dtype: Optional[torch.dtype] = None,
                 layer_decay: Optional[float] = None):
        self.model, self.dtype = model.train(), dtype
        depth = len(model.trunk.blocks)
        groups = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            layer = depth + 1
            if name.startswith("preprocessor."):
                layer = 0
            elif name.startswith("trunk.blocks."):
                layer = int(name.split(".")[2]) + 1
            scale = layer_decay ** (depth + 1 - layer) if layer_decay else 1.0
            key = (scale, p.ndim >= 2)
            groups.setdefault(key, []).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": ps, "lr": lr * scale, "weight_decay": 0.05 if decayed else 0.0}
             for (scale, decayed), ps in groups.items()],
            lr=lr, betas=(0.9, 0.999), eps=1e-8,
        )

    def __call__(self, images_nchw, labels):
        self.optimizer.zero_grad(set_to_none=True)
        if self.dtype is not None and self.dtype != torch.float32:
            with torch.autocast(images_nchw.device.type, dtype=self.dtype):
                logits = self.model(images_nchw)
        else:
            logits = self.model(images_nchw)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


# ----------------------------------------------------------------------------------------------------
# Weights between the two frameworks


def state_dict_numpy(model: tnn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def load_mlx_weights(model: tnn.Module, weights: dict[str, np.ndarray]) -> tnn.Module:
    """Copies float32 numpy weights in MLX layout (`mlx_aim` key names, conv kernels (out, kh, kw, in)) into
    `model`, strictly: every key of the torch model must be given, with the right shape."""
    state = {}
    for key, value in weights.items():
        if value.ndim == 4:  # conv kernel: MLX (out, kh, kw, in) -> torch (out, in, kh, kw)
            value = value.transpose(0, 3, 1, 2)
        state[key] = torch.from_numpy(np.ascontiguousarray(value))
    if "head.bn.num_batches_tracked" in model.state_dict() and "head.bn.num_batches_tracked" not in state:
        state["head.bn.num_batches_tracked"] = torch.tensor(0)
    model.load_state_dict(state, strict=True)
    return model


def torch_info() -> dict:
    """Version, threads and the BLAS this build of torch uses, for the benchmark's report."""
    blas = [line.split("=", 1)[1].strip() for line in torch.__config__.show().replace(",", "\n").splitlines()
            if "BLAS_INFO" in line]
    return {"version": torch.__version__, "threads": torch.get_num_threads(), "blas": blas[0] if blas else None}


__all__ = [
    "AIMPretrainingReference", "AIMReference", "Attention", "Block", "FinetuneStep", "Head", "LoRA", "Mlp",
    "Patchifier", "PixelHead", "PretrainStep", "Preprocessor", "Trunk", "add_lora", "aim_loss", "load_mlx_weights",
    "patchify_nchw", "sincos_2d", "state_dict_numpy", "torch_mask",
]
