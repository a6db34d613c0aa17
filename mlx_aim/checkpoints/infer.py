"""Architectures read off tensor shapes, for checkpoints that carry no config of ours.

Every function takes the shapes of a checkpoint's tensors under our keys (`weights.plan_keys` has renamed and
re-laid them), never the tensors: a config is known before any weight is read.

- AIM (`aim_config`): Apple's `.pth` files carry no config. Width and depth are read off the shapes and must be
  one of AIM's presets', whose head count is then known; the probe layers from the head file's name.
- AIMv2 (`aimv2_config`): width, depth, patch, channels and MLP width from the shapes; native resolution where
  there is no position embedding, else the image size from its grid. What a config.json states (`stated`:
  `weights.hub_aimv2_fields`) goes over the shapes, so that the strict check compares the file's word with the
  weights. The head count, which no shape shows, from the file, else from the released encoder of that width.
- AIMv2-LiT (`lit_config`): its image encoder as above; its text tower and projection from the shapes, with what
  transformers' config.json states (`weights.hub_lit_text_fields`) over them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ..models.config import AIMV2_PRESET_NAMES, PRESET_NAMES, AIMConfig, AIMv2Config, AIMv2LiTConfig, get_config

Shapes = Mapping[str, tuple]


def count_blocks(shapes: Shapes, prefix: str = "trunk.blocks.") -> int:
    """The number of transformer blocks under `prefix` (blocks 0..N-1)."""
    return 1 + max((int(m.group(1)) for k in shapes if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))),
                   default=-1)


def _patch_conv(shapes: Shapes, files: Sequence[Path]) -> tuple:
    conv = shapes.get("preprocessor.patchifier.proj.weight")
    if conv is None or len(conv) != 4:
        raise ValueError(f"{', '.join(map(str, files))}: no 'preprocessor.patchifier.proj.weight': not an AIM or AIMv2 "
                         "backbone")
    return conv  # (width, patch, patch, channels) in our layout


def is_aimv2(shapes: Shapes) -> bool:
    return "trunk.blocks.0.mlp.fc3.weight" in shapes  # SwiGLU's third linear; AIM's MLP has two


def aim_config(shapes: Shapes, probe_layers, files: Sequence[Path]) -> AIMConfig:
    """Apple's AIM .pth files carry no config: the architecture off the shapes, heads from AIM's presets."""
    width, patch, _, channels = _patch_conv(shapes, files)
    depth = count_blocks(shapes)
    aim = [n for n in PRESET_NAMES if n not in AIMV2_PRESET_NAMES]
    preset = next((n for n in aim if get_config(n).width == width and get_config(n).depth == depth), None)
    if preset is None:
        raise ValueError(
            f"{files[0]}: width {width} and depth {depth} match no preset, so the head count is unknown; "
            "write a config.json next to the weights"
        )
    if probe_layers is None:
        names = " ".join(p.name for p in files)
        probe_layers = "best" if "best_layers" in names else "last"
    num_classes = shapes["head.linear.weight"][0] if "head.linear.weight" in shapes else 1000
    return get_config(preset, probe_layers=probe_layers, patch_size=patch, num_channels=channels,
                      num_classes=num_classes)


def aimv2_config(shapes: Shapes, stated: dict, name: Optional[str], files: Sequence[Path]) -> AIMv2Config:
    """An AIMv2 architecture from the shapes, with what a config.json states (`stated`) over them (module
    docstring). `name`: the released name the source stands for, kept if the architecture is that release's."""
    where = ", ".join(map(str, files))
    width, patch, _, channels = _patch_conv(shapes, files)
    fields = dict(width=width, patch_size=patch, num_channels=channels, depth=count_blocks(shapes))
    if "trunk.blocks.0.mlp.fc1.weight" in shapes:
        fields["hidden_dim"] = shapes["trunk.blocks.0.mlp.fc1.weight"][0]
    pos = shapes.get("preprocessor.pos_embed")
    if "pos_embed" in stated and (stated["pos_embed"] == "learned") != (pos is not None):
        said = "native resolution (is_native true)" if stated["pos_embed"] == "sincos" else "a fixed size"
        has = "has a position embedding" if pos is not None else "has no position embedding"
        raise ValueError(f"{where}: its config.json says {said}, but the checkpoint {has}")
    if pos is None:
        fields.update(image_size=None, pos_embed="sincos")
    else:
        grid = math.isqrt(pos[-2])
        if grid * grid != pos[-2]:
            raise ValueError(f"{where}: a position embedding of {pos[-2]} positions is no square grid")
        fields.update(image_size=stated.get("image_size") or grid * fields["patch_size"], pos_embed="learned")
    fields.update({k: v for k, v in stated.items() if k not in ("image_size", "pos_embed")})
    if "num_heads" not in fields:
        release = next((n for n in AIMV2_PRESET_NAMES if get_config(n).width == fields["width"]), None)
        if release is None:
            raise ValueError(f"{where}: width {fields['width']} is no released AIMv2 encoder's, so the head count is "
                             "unknown; write a config.json next to the weights")
        fields["num_heads"] = get_config(release).num_heads
    config = AIMv2Config(**fields)
    if name in AIMV2_PRESET_NAMES and get_config(name).replace(probe_layers=config.probe_layers) == config.replace(
            name=name):
        config = config.replace(name=name)
    return config


def encoder_config(shapes: Shapes, stated: dict, name: Optional[str], files: Sequence[Path],
                   probe_layers) -> AIMConfig | AIMv2Config:
    """An image encoder's architecture: AIMv2's where a config.json states AIMv2 fields or the MLP is SwiGLU,
    else AIM's. `probe_layers` ("best", "last" or indices) over what the source says."""
    if stated or is_aimv2(shapes):
        return aimv2_config(shapes, stated, name, files).with_probe_layers(probe_layers)
    return aim_config(shapes, probe_layers, files)


def lit_config(image_shapes: Shapes, shapes: Shapes, stated: dict, stated_text: dict, name: Optional[str],
               files: Sequence[Path]) -> AIMv2LiTConfig:
    """A whole LiT's architecture: its image encoder's from `image_shapes` (its keys as an encoder's), the text
    tower's and the projection's from `shapes` (the whole model's keys), with what a transformers config.json states
    (`stated`, `stated_text`) over them. The text head count, which no shape shows, is otherwise the released LiT's
    (6, at width 768)."""
    image = aimv2_config(image_shapes, stated, name, files)
    where = ", ".join(map(str, files))
    try:
        vocab_size, text_width = shapes["text_encoder.preprocessor.text_embedding.weight"]
        fields = dict(
            vocab_size=vocab_size, text_width=text_width,
            context_length=shapes["text_encoder.preprocessor.positional_embedding"][0],
            text_depth=count_blocks(shapes, "text_encoder.trunk.blocks."),
            text_hidden_dim=shapes["text_encoder.trunk.blocks.0.mlp.fc1.weight"][0],
            projection_dim=shapes["text_projector.weight"][0])
    except KeyError as e:
        raise ValueError(f"{where}: an AIMv2-LiT checkpoint without {e.args[0]!r} (in Apple's keys)") from None
    fields.update(stated_text)
    default = AIMv2LiTConfig.__dataclass_fields__["text_num_heads"].default
    if "text_num_heads" not in fields:
        if text_width != AIMv2LiTConfig.__dataclass_fields__["text_width"].default:
            raise ValueError(f"{where}: text width {text_width} is not the released LiT's, so its head count is "
                             "unknown; write a config.json next to the weights")
        fields["text_num_heads"] = default
    return AIMv2LiTConfig(image=image, name=name, **fields)
