"""Weights I/O: mapping Apple's PyTorch state dicts onto the MLX model.

`sanitize` is the one place where checkpoint keys and layouts are changed.
"""

from __future__ import annotations

from typing import Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

# PyTorch bookkeeping that MLX's BatchNorm has no use for.
_DROPPED_SUFFIXES = ("num_batches_tracked",)
_CONV_KEY = "preprocessor.patchifier.proj.weight"


def sanitize(weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """Apple's PyTorch key layout -> ours: drop `num_batches_tracked`, conv weight OIHW -> OHWI."""
    out = {}
    for key, value in weights.items():
        if key.endswith(_DROPPED_SUFFIXES):
            continue
        if key == _CONV_KEY and value.ndim == 4:
            value = value.transpose(0, 2, 3, 1)
        out[key] = value
    return out


def check_weights(model: nn.Module, weights: Mapping[str, mx.array], source: str = "checkpoint") -> None:
    """Every key the model has, with the shape it expects: the error names the key and both shapes."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if extra:
            parts.append(f"unexpected keys {extra[:8]}{' ...' if len(extra) > 8 else ''}")
        raise ValueError(f"{source}: " + "; ".join(parts))
    for key, value in weights.items():
        want = tuple(expected[key].shape)
        if tuple(value.shape) != want:
            raise ValueError(f"{source}: key {key!r} has shape {tuple(value.shape)}, expected {want}")


def load_state_dict(model: nn.Module, weights: Mapping[str, mx.array], source: str = "checkpoint") -> nn.Module:
    """Loads Apple-layout weights into `model` strictly, cast to the model's parameter dtype."""
    weights = sanitize(weights)
    check_weights(model, weights, source)
    dtypes = {k: v.dtype for k, v in tree_flatten(model.parameters())}
    model.load_weights([(k, v.astype(dtypes[k])) for k, v in weights.items()], strict=True)
    return model
