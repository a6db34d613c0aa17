"""transformers' `Aimv2VisionModel` as the independent AIMv2 reference for tests: random weights that make every
stage count, its outputs stage by stage, and its weights loaded into our model through the library's transformers ->
Apple key mapping (`mlx_aim.checkpoints.weights`). Its config and construction live in `benchmarks/transformers_reference.py`,
which the benchmark shares; they are re-exported here. Test-side only: the library never imports transformers or
torch."""

from __future__ import annotations

import re

import numpy as np
import torch
from transformers import Aimv2VisionModel

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_aim.models.config import AIMv2Config
from mlx_aim.checkpoints.weights import check_shapes, sanitize
from transformers_reference import build_reference, state_dict_numpy, transformers_config

__all__ = ["load_reference_weights", "make_reference", "randomize", "reference_stages", "state_dict_numpy",
           "transformers_config"]


@torch.no_grad()
def randomize(model: Aimv2VisionModel, seed: int) -> Aimv2VisionModel:
    """Weights drawn so every stage shows: linears at 1/sqrt(fan_in) (attention logits of order 1, each block
    moving the residual stream), norm weights around 1, a non-zero conv bias and a unit-scale position
    embedding."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("rms_norm.weight") or re.search(r"rms_norm\d\.weight$", name):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
        elif p.ndim == 2 and "position_embedding" not in name:
            p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=generator) * (0.05 if p.ndim == 4 else 1.0))
    return model


def make_reference(config: AIMv2Config, seed: int = 0) -> Aimv2VisionModel:
    """transformers' model of `config` with `randomize`'s weights, in eval mode."""
    return randomize(build_reference(config), seed).eval()


def load_reference_weights(model, hf_state: dict[str, np.ndarray]):
    """transformers' weights into our model through the library's own mapping (`sanitize` of the "transformers"
    layout): every preprocessor and trunk parameter, with its shape (a probed model's head is left as it is:
    transformers' encoder, like every released checkpoint, has none)."""
    weights = sanitize({k: mx.array(v) for k, v in hf_state.items()}, "transformers")
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters()) if not k.startswith("head.")}
    check_shapes(expected, {k: tuple(v.shape) for k, v in weights.items()}, "transformers weights")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return model


@torch.no_grad()
def reference_stages(model: Aimv2VisionModel, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """transformers' outputs stage by stage: "embedding" (patch conv, norm and position), "block_{i}" (each
    block's raw output) and "trunk" (after the final norm), read with forward hooks."""
    stages = {}

    def keep(name):
        return lambda module, args, output: stages.__setitem__(name, output.detach().numpy().copy())

    hooks = [model.embeddings.register_forward_hook(keep("embedding")),
             model.rms_norm.register_forward_hook(keep("trunk"))]
    hooks += [layer.register_forward_hook(keep(f"block_{i}")) for i, layer in enumerate(model.encoder.layers)]
    try:
        model(pixel_values=torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))))
    finally:
        for hook in hooks:
            hook.remove()
    return stages
