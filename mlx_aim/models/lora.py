"""Low-rank adapters (LoRA, Hu et al. 2021) on an AIM or AIMv2 trunk: the layers, putting them on a model, counting
what trains, and fusing them back into plain weights. Reading and writing adapter files is
`mlx_aim.checkpoints.adapters`'s.

Conventions, as MLX users know them from mlx-lm (`mlx_lm/tuner/lora.py`): `LoRALinear` wraps a linear layer,
`nn.Linear` or `nn.QuantizedLinear` (QLoRA: the base stays quantized and frozen), as `linear`, and adds
`scale * (dropout(x) @ lora_a) @ lora_b`, with `lora_a` (input_dims, rank) drawn uniform in +-1/sqrt(input_dims)
(loralib's kaiming-uniform with a=sqrt(5), mlx-lm's init) and `lora_b` (rank, output_dims) zeros, so that an adapted
model starts equal to its base. Where the adapters go follows Apple's fine-tuning code (apple/ml-l3m,
`src/l3m/model/layers/peft.py`, `LoraAttention`; AIM paper section 5.5, Table 8): rank 8 on the fused `qkv` as three
independent factor pairs, one each for q, k and v (`LoRAQKV`), plus the attention's output projection `proj`; and
loralib's alpha of 1, so the scale alpha/rank is 1/8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..backend import Linear, QuantizedLinear
from .layers import random_key

RANK = 8
ALPHA = 1.0  # loralib's default, which Apple's LoraAttention keeps: scale = alpha / rank = 1/8 at rank 8
KEYS = ("qkv", "proj")
ATTENTION_KEYS = ("qkv", "proj")
MLP_KEYS = ("fc1", "fc2", "fc3")

BaseLinear = Union[nn.Linear, nn.QuantizedLinear]


def linear_dims(layer: BaseLinear) -> tuple[int, int]:
    """(input_dims, output_dims) of a float or quantized linear layer (a quantized weight packs 32/bits per int)."""
    if isinstance(layer, nn.QuantizedLinear):
        out_dims, packed = layer.weight.shape
        return packed * 32 // layer.bits, out_dims
    if isinstance(layer, nn.Linear):
        out_dims, in_dims = layer.weight.shape
        return in_dims, out_dims
    raise TypeError(f"LoRA wraps a linear layer (nn.Linear or nn.QuantizedLinear), got {type(layer).__name__}")


def check_rank(rank, width: int, where: str) -> None:
    """A rank between 1 and the layer's width (the smaller of its input and output sizes), else ValueError."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or rank > width:
        raise ValueError(f"LoRA rank {rank!r} on {where}: expected an integer from 1 to the layer's width {width}")


def _factors(in_dims: int, out_dims: int, rank: int, pairs: Optional[int] = None) -> tuple[mx.array, mx.array]:
    bound = 1 / math.sqrt(in_dims)  # kaiming-uniform(a=sqrt(5)) over fan_in = in_dims: loralib's and mlx-lm's A
    lead = () if pairs is None else (pairs,)
    a = mx.random.uniform(low=-bound, high=bound, shape=(*lead, in_dims, rank))
    return a, mx.zeros((*lead, rank, out_dims))


def _dequantized_weight(layer: nn.QuantizedLinear) -> mx.array:
    return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), layer.group_size, layer.bits,
                         mode=layer.mode)


def _float_linear(weight: mx.array, bias: Optional[mx.array]) -> Linear:
    """The backend's Linear holding `weight` (and `bias`)."""
    out_dims, in_dims = weight.shape
    layer = Linear(in_dims, out_dims, bias=bias is not None)
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


class _LoRA(nn.Module):
    """What both adapters share: the frozen wrapped layer, the scale, the dropout, and fusing."""

    def __init__(self, linear: BaseLinear, rank: int, alpha: float, dropout: float):
        super().__init__()
        linear.freeze()
        self.linear = linear
        self.rank, self.alpha, self.dropout_p = rank, float(alpha), float(dropout)
        self.scale = alpha / rank

    def dropout(self, x: mx.array) -> mx.array:
        """nn.Dropout's inverted dropout in training mode, its mask drawn with `layers.random_key` (so that a
        checkpointed block recomputes the same mask)."""
        if not self.training or not self.dropout_p:
            return x
        keep = 1.0 - self.dropout_p
        return (mx.random.bernoulli(keep, x.shape, key=random_key()) * x) * (1 / keep)

    def delta(self) -> mx.array:
        """scale * B A as a (output_dims, input_dims) weight update, float32."""
        raise NotImplementedError

    def fused(self, dequantize: bool = False) -> BaseLinear:
        """The wrapped layer with scale * B A added into its weight: a quantized one dequantized, fused and
        re-quantized with its own bits and group size, or left in float with `dequantize`."""
        base = self.linear
        bias = base.get("bias")
        if isinstance(base, nn.QuantizedLinear):
            weight = _dequantized_weight(base)
            fused = _float_linear((weight.astype(mx.float32) + self.delta()).astype(weight.dtype), bias)
            if dequantize:
                return fused
            return QuantizedLinear.from_linear(fused, base.group_size, base.bits, base.mode)
        return _float_linear((base.weight.astype(mx.float32) + self.delta()).astype(base.weight.dtype), bias)


def _add_low_rank(y: mx.array, u: mx.array, b: mx.array, scale: float) -> mx.array:
    """y + scale * (u @ b) in y's dtype, as one matmul accumulating into y (`mx.addmm`)."""
    return mx.addmm(y, u.astype(y.dtype), b.astype(y.dtype), alpha=scale)


class LoRALinear(_LoRA):
    """A linear layer (float or quantized, frozen) plus scale * (dropout(x) @ lora_a) @ lora_b: the wrapped layer runs
    as it would alone (the backend's CPU workarounds included), then the low-rank term is added in its dtype."""

    def __init__(self, linear: BaseLinear, rank: int = RANK, alpha: float = ALPHA, dropout: float = 0.0):
        in_dims, out_dims = linear_dims(linear)
        check_rank(rank, min(in_dims, out_dims), f"a {in_dims}->{out_dims} linear layer")
        super().__init__(linear, rank, alpha, dropout)
        self.lora_a, self.lora_b = _factors(in_dims, out_dims, rank)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        return _add_low_rank(y, self.dropout(x) @ self.lora_a, self.lora_b, self.scale)

    def delta(self) -> mx.array:
        return self.scale * (self.lora_b.T @ self.lora_a.T).astype(mx.float32)


class LoRAQKV(_LoRA):
    """The fused qkv projection (output q | k | v, each of the trunk's width) with an independent pair of factors
    for each of q, k and v, as Apple's LoraAttention: `lora_a` (3, input_dims, rank), `lora_b` (3, rank, width),
    index 0 q, 1 k, 2 v. One dropout mask on the input, shared by the three, as loralib's merged layer does."""

    def __init__(self, linear: BaseLinear, rank: int = RANK, alpha: float = ALPHA, dropout: float = 0.0):
        in_dims, out_dims = linear_dims(linear)
        if out_dims % 3:
            raise ValueError(f"LoRAQKV wraps a fused qkv projection, whose output is 3 x width: got {out_dims}")
        width = out_dims // 3
        check_rank(rank, min(in_dims, width), f"a {in_dims}->3x{width} qkv projection")
        super().__init__(linear, rank, alpha, dropout)
        self.lora_a, self.lora_b = _factors(in_dims, width, rank, pairs=3)

    def __call__(self, x: mx.array) -> mx.array:
        # The three pairs as one product each way: x against the A factors side by side, (in, 3 rank), then against
        # the B factors on a block diagonal, (3 rank, 3 width), accumulated into the base output: the values of the
        # three products concatenated and added (the zero blocks add exact zeros), without the concatenation's copy
        # and the separate scale and add passes over the (tokens, 3 width) output.
        y = self.linear(x)
        in_dims, rank = self.lora_a.shape[1:]
        a = self.lora_a.transpose(1, 0, 2).reshape(in_dims, 3 * rank)
        width = self.lora_b.shape[-1]
        b = mx.concatenate([mx.pad(self.lora_b[i], [(0, 0), (i * width, (2 - i) * width)]) for i in range(3)])
        return _add_low_rank(y, self.dropout(x) @ a, b, self.scale)

    def delta(self) -> mx.array:
        parts = [self.lora_b[i].T @ self.lora_a[i].T for i in range(3)]  # each (width, input_dims)
        return self.scale * mx.concatenate(parts, axis=0).astype(mx.float32)


@dataclass(frozen=True)
class LoRASettings:
    """What `apply_lora` put on a model (`lora_settings`), what an adapter_config.json records."""

    rank: int
    alpha: float
    dropout: float
    keys: tuple[str, ...]
    layers: tuple[int, ...]  # the adapted blocks' indices

    def to_dict(self) -> dict:
        return {"mode": "lora", "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "keys": list(self.keys), "layers": list(self.layers)}


def _blocks(model: nn.Module) -> list:
    trunk = getattr(model, "trunk", None)
    blocks = getattr(trunk, "blocks", None)
    if not isinstance(blocks, list) or not hasattr(model, "preprocessor"):
        raise TypeError(f"LoRA goes on an AIM or AIMv2 trunk model (a `trunk.blocks` list), got {type(model).__name__}")
    return blocks


def _check_keys(keys: Sequence[str], block) -> tuple[str, ...]:
    if isinstance(keys, str):
        keys = (keys,)
    keys = tuple(keys)
    unknown = [k for k in keys if k not in ATTENTION_KEYS + MLP_KEYS]
    if unknown or not keys or len(set(keys)) != len(keys):
        raise ValueError(f"LoRA keys {list(keys)}: expected distinct names among {list(ATTENTION_KEYS + MLP_KEYS)}")
    missing = [k for k in keys if k in MLP_KEYS and k not in block.mlp]
    if missing:
        raise ValueError(f"LoRA keys {missing}: this model's MLP ({type(block.mlp).__name__}) has no such layer "
                         f"(AIM's has fc1 and fc2, AIMv2's SwiGLU fc1, fc2 and fc3)")
    return keys


def last_layers(depth: int, num_layers: Optional[int]) -> tuple[int, ...]:
    """The indices of the last `num_layers` of `depth` blocks (None: all)."""
    if num_layers is None:
        return tuple(range(depth))
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= depth:
        raise ValueError(f"LoRA num_layers={num_layers!r}: expected 1 to the trunk's depth {depth} (None: all)")
    return tuple(range(depth - num_layers, depth))


def _target(block, key: str):
    return (block.attn, key) if key in ATTENTION_KEYS else (block.mlp, key)


def apply_lora(
    model: nn.Module,
    rank: int = RANK,
    alpha: float = ALPHA,
    dropout: float = 0.0,
    keys: Sequence[str] = KEYS,
    num_layers: Optional[int] = None,
    *,
    layers: Optional[Sequence[int]] = None,
) -> nn.Module:
    """Puts adapters on `model`'s trunk, in place, and returns it: on each of the last `num_layers` blocks (default
    all; or the block indices `layers`), `qkv` as `LoRAQKV` (q, k, v apart), `proj`, and any of the MLP's `fc1`,
    `fc2`, `fc3` named in `keys` as `LoRALinear`. Freezes everything else: only the adapters train (a probe head's
    training is the caller's to unfreeze). `lora_settings(model)` reads the settings back from the layers.

    Refuses, before changing anything: rank < 1 or above a layer's width, unknown keys, a model already adapted.
    """
    blocks = _blocks(model)
    if lora_settings(model) is not None:
        raise ValueError("this model already has LoRA adapters: fuse them (fuse_lora) before adding others")
    keys = _check_keys(keys, blocks[0])
    if layers is None:
        layers = last_layers(len(blocks), num_layers)
    else:
        layers = tuple(layers)
        if not layers or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(blocks)
                             for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"LoRA layers {list(layers)}: expected distinct block indices from 0 to {len(blocks) - 1}")
    for i in layers:  # every check before any change
        for key in keys:
            parent, name = _target(blocks[i], key)
            in_dims, out_dims = linear_dims(parent[name])
            width = min(in_dims, out_dims // 3 if key == "qkv" else out_dims)
            check_rank(rank, width, f"block {i}'s {key} ({in_dims}->{out_dims})")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout {dropout!r}: expected 0 <= dropout < 1")
    model.freeze()
    for i in layers:
        for key in keys:
            parent, name = _target(blocks[i], key)
            cls = LoRAQKV if key == "qkv" else LoRALinear
            setattr(parent, name, cls(parent[name], rank, alpha, dropout))
    return model


def lora_settings(model: nn.Module) -> Optional[LoRASettings]:
    """The settings of the adapters on `model`'s trunk, read from its layers (so they survive composing the trunk
    with a probe, `with_probe`); None without adapters. Adapters of differing rank, alpha or dropout, or not on the
    same layers of each adapted block (not what `apply_lora` makes), raise ValueError."""
    found = {}
    for i, block in enumerate(_blocks(model)):
        for key in ATTENTION_KEYS + MLP_KEYS:
            parent, name = _target(block, key)
            if name in parent and isinstance(parent[name], _LoRA):
                m = parent[name]
                found[(i, key)] = (m.rank, m.alpha, m.dropout_p)
    if not found:
        return None
    layers = tuple(sorted({i for i, _ in found}))
    keys = tuple(k for k in ATTENTION_KEYS + MLP_KEYS if any(key == k for _, key in found))
    if len(set(found.values())) != 1 or len(found) != len(layers) * len(keys):
        raise ValueError(f"this model's adapters differ between layers ({sorted(found.items())[:4]} ...): "
                         "not what apply_lora makes, and not what an adapter_config.json can record")
    rank, alpha, dropout = next(iter(found.values()))
    return LoRASettings(rank, alpha, dropout, keys, layers)


def adapter_parameters(model: nn.Module) -> dict[str, mx.array]:
    """The adapters' factors under their model paths (`...attn.qkv.lora_a`, ...): what an adapter file holds."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}


def trainable_parameters(model: nn.Module) -> int:
    """How many parameters would train (those not frozen): counted from shapes, nothing evaluated."""
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def fuse_lora(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Adds each adapter's scale * B A into its base weight, in place, and returns the model with plain layers under
    the base's parameter names (what `save_model` writes and `load` reads), unfrozen as a loaded model is. A quantized
    base is dequantized, fused and re-quantized with its own bits and group size; with `dequantize`, every quantized
    layer of the model is left in float and the config says so."""
    fused = [(path, m.fused(dequantize)) for path, m in model.named_modules() if isinstance(m, _LoRA)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        plain = [(path, _float_linear(_dequantized_weight(m), m.get("bias")))
                 for path, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
        if plain:
            model.update_modules(tree_unflatten(plain))
        if getattr(model, "config", None) is not None and getattr(model.config, "quantization", None):
            model.config = model.config.replace(quantization=None)
    model.unfreeze()
    return model
