"""transformers' `Aimv2VisionModel`, an AIMv2 implementation written elsewhere: the tests' reference and the
benchmark's opponent for AIMv2, as `torch_reference.py` is for AIM.

- `transformers_config`: transformers' config of one of our `AIMv2Config`s (vision encoder only, no head);
- `build_reference`: that model with its parameters allocated and not initialised (the caller fills them);
- `transformers_state_dict`: our MLX weights under transformers' keys, the library's mapping
  (`mlx_aim.checkpoints.weights`, whose docstring lists the checkpoint layouts) run backwards; `load_mlx_weights` puts our
  weights into the reference, strictly;
- `build_lit_reference`, `lit_weights`: transformers' whole AIMv2-LiT (`Aimv2Model`, its text attention made causal)
  with its own random weights, and those weights under our keys (the library's mapping run forwards).

The parity tests (`tests/aimv2_reference.py`) draw its weights; `scripts/benchmark.py --compare-torch` on an AIMv2
preset times it against MLX on the same weights. Like `torch_reference.py` it lives outside the `mlx_aim`
package, in a source checkout only: mlx-aim never needs torch or transformers at run time.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from transformers import Aimv2Config, Aimv2Model, Aimv2VisionConfig, Aimv2VisionModel

import mlx.core as mx

from mlx_aim.checkpoints.weights import TRANSFORMERS_BLOCK_KEYS, TRANSFORMERS_KEYS, TRANSFORMERS_QKV, plan_lit_keys


def transformers_config(config) -> Aimv2VisionConfig:
    """The transformers config of the same encoder (an `AIMv2Config`), without its attention-pool head (as the
    released vision-only checkpoints)."""
    return Aimv2VisionConfig(
        hidden_size=config.width, intermediate_size=config.hidden_dim, num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads, num_channels=config.num_channels, patch_size=config.patch_size,
        image_size=config.image_size or 224, rms_norm_eps=config.norm_eps, is_native=config.native, use_head=False,
    )


@torch.no_grad()
def build_reference(config) -> Aimv2VisionModel:
    """transformers' model of `config` in eval mode, its parameters allocated but not initialised."""
    with torch.device("meta"):  # skips transformers' own initialisation: the caller sets every parameter
        model = Aimv2VisionModel(transformers_config(config))
    model = model.to_empty(device="cpu")
    position_ids = model.embeddings.position_ids  # a buffer: to_empty leaves it unset
    position_ids.copy_(torch.arange(position_ids.shape[-1]).expand_as(position_ids))
    return model.eval()


def transformers_state_dict(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our model's float weights (Apple's keys, MLX layouts: conv (out, kh, kw, in)) under transformers' keys and
    layouts: conv (out, in, kh, kw), qkv split into q, k, v, `pos_embed` (1, N, D) as the (N, D) table. The probe
    head (`head.*`) has no counterpart and is left out."""
    top = {apple: theirs for theirs, apple in TRANSFORMERS_KEYS.items()}
    block = {apple: theirs for theirs, apple in TRANSFORMERS_BLOCK_KEYS.items()}
    out = {}
    for key, value in weights.items():
        if key.startswith("head."):
            continue
        if key == "preprocessor.patchifier.proj.weight":
            out[top[key]] = value.transpose(0, 3, 1, 2)
        elif key == "preprocessor.pos_embed":
            out[top[key]] = value[0]
        elif key in top:
            out[top[key]] = value
        else:
            i, rest = re.fullmatch(r"trunk\.blocks\.(\d+)\.(.+)", key).groups()
            if rest == "attn.qkv.weight":
                for name, part in zip(TRANSFORMERS_QKV, np.split(value, 3, axis=0)):
                    out[f"encoder.layers.{i}.{name}"] = part
            else:
                out[f"encoder.layers.{i}.{block[rest]}"] = value
    return out


def load_mlx_weights(model: Aimv2VisionModel, weights: dict[str, np.ndarray]) -> Aimv2VisionModel:
    """Our model's float32 numpy weights (`transformers_state_dict`) into `model`, strictly: every parameter of
    the reference given, with its shape."""
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in transformers_state_dict(weights).items()}
    model.load_state_dict(state, strict=True)
    return model


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def lit_config(config) -> Aimv2Config:
    """transformers' config of the same AIMv2-LiT (an `AIMv2LiTConfig`): the image encoder with its pooling head."""
    return Aimv2Config(
        vision_config={**transformers_config(config.image).to_dict(), "use_head": True},
        text_config=dict(hidden_size=config.text_width, intermediate_size=config.text_hidden_dim,
                         num_hidden_layers=config.text_depth, num_attention_heads=config.text_num_heads,
                         vocab_size=config.vocab_size, max_position_embeddings=config.context_length,
                         eos_token_id=config.eos_token_id, rms_norm_eps=config.text_norm_eps),
        projection_dim=config.projection_dim, max_logit_scale=config.max_logit_scale)


@torch.no_grad()
def build_lit_reference(config, seed: int = 0) -> Aimv2Model:
    """transformers' AIMv2-LiT of `config` with its own random initialisation, in eval mode, its text attention
    made causal (`is_causal` forced, as Apple's tower is; transformers 5.24's is not: tests/test_aimv2_lit.py)."""
    torch.manual_seed(seed)
    reference = lit_config(config)
    reference._attn_implementation = "sdpa"
    model = Aimv2Model(reference).eval()
    for layer in model.text_model.encoder.layers:
        layer.attention.is_causal = True
    return model


def lit_weights(model: Aimv2Model) -> list[tuple[str, mx.array]]:
    """A transformers LiT's weights under our keys and layouts (`weights.plan_lit_keys`), for `load_weights`."""
    state = state_dict_numpy(model)
    plan = plan_lit_keys("transformers", {k: v.shape for k, v in state.items()})
    return [(key, m.build(*(mx.array(state[s]) for s in m.sources))) for key, m in plan.tensors.items()]


__all__ = ["build_lit_reference", "build_reference", "lit_config", "lit_weights", "load_mlx_weights",
           "state_dict_numpy", "transformers_config", "transformers_state_dict"]
