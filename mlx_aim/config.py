"""The architecture's configuration: one dataclass, and the registry of named presets."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from .fileio import write_json

# Apple's hub `config.json` (huggingface_hub's PyTorch mixin) names only these, under other names.
_APPLE_HUB_KEYS = {
    "img_size": "image_size",
    "patch_size": "patch_size",
    "embed_dim": "width",
    "num_blocks": "depth",
    "num_heads": "num_heads",
}


# What `AIMConfig.with_probe_layers` and `get_config` take: "best", "last", block indices, or None (keep).
ProbeLayers = Union[str, Sequence[int], None]


def _last_layers(depth: int) -> list[int]:
    """The "last" probe layers: the final 6 blocks (AIM section 4), all of them in a shallower trunk."""
    return list(range(max(depth - 6, 0), depth))


def parse_probe_layers(text: Optional[str]) -> ProbeLayers:
    """The command-line form of probe layers: None, "best", "last" or comma-separated block indices."""
    if text is None or text in ("best", "last"):
        return text
    try:
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise ValueError(
            f"{text!r}: expected 'best', 'last' or comma-separated block indices such as 14,15,16"
        ) from None


@dataclass
class AIMConfig:
    """Everything needed to build an AIM model. Saved as `config.json` next to the weights."""

    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    width: int = 1536
    depth: int = 24
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    # Blocks whose raw outputs the attentive probe averages (0-indexed). None: the last 6 blocks.
    # `with_probe_layers` turns "best" / "last" / indices into this list.
    probe_layers: Optional[list[int]] = None
    num_classes: int = 1000
    # Attention used downstream: "bidirectional" after prefix-causal pre-training (AIM's recipe); a model
    # pre-trained with a plain causal mask only works downstream with "causal" kept.
    attention: str = "bidirectional"
    # The pre-training pixel head (AIM paper section 3): discarded after pre-training.
    head_width: int = 2048
    head_depth: int = 12
    # Set by quantized conversions: {"group_size": 64, "bits": 4}.
    quantization: Optional[dict] = None
    name: Optional[str] = None

    def __post_init__(self):
        if self.probe_layers is None:
            self.probe_layers = _last_layers(self.depth)
        self.probe_layers = [int(i) for i in self.probe_layers]
        self.validate()

    def validate(self) -> None:
        for key in ("image_size", "patch_size", "num_channels", "width", "depth", "num_heads"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config {key}={value!r}: expected a positive integer")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"config image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.width % self.num_heads:
            raise ValueError(f"config width={self.width} is not divisible by num_heads={self.num_heads}")
        if self.width % 4:
            raise ValueError(f"config width={self.width}: the 2-D sin-cos embedding needs a multiple of 4")
        if not self.probe_layers:
            raise ValueError("config probe_layers is empty: expected at least one block index")
        bad = [i for i in self.probe_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(
                f"config probe_layers {bad} out of range: expected block indices in [0, {self.depth - 1}]"
            )
        if self.attention not in ("bidirectional", "causal"):
            raise ValueError(f"config attention={self.attention!r}: expected 'bidirectional' or 'causal'")
        if self.head_width % 4:
            raise ValueError(f"config head_width={self.head_width}: expected a multiple of 4")

    # The derived quantities the model needs.
    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.num_channels

    @property
    def max_block_id(self) -> int:
        """The deepest block the probe reads: the trunk stops there for classification."""
        return max(self.probe_layers)

    def replace(self, **changes) -> "AIMConfig":
        return dataclasses.replace(self, **changes)

    def with_probe_layers(self, probe_layers: ProbeLayers) -> "AIMConfig":
        """This config reading other blocks: "last" (the final 6), "best" (a released model's best layers,
        AIM-REFERENCE.md; the final 6 for a preset that names none) or block indices; None keeps them."""
        if probe_layers is None:
            return self
        if probe_layers == "last":
            return self.replace(probe_layers=_last_layers(self.depth))
        if probe_layers == "best":
            if self.name not in _PRESETS:
                raise ValueError(f"probe_layers='best' needs a preset's model; {self.name!r} is not one "
                                 f"({', '.join(PRESET_NAMES)})")
            best = _PRESETS[self.name][1]
            return self.replace(probe_layers=list(best) if best is not None else _last_layers(self.depth))
        if isinstance(probe_layers, str):
            raise ValueError(f"probe_layers={probe_layers!r}: expected 'best', 'last' or a list of block indices")
        return self.replace(probe_layers=list(probe_layers))

    # Round trips through dicts and config.json.
    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["model_type"] = "aim"
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, params: dict) -> "AIMConfig":
        """Builds a config from our `config.json`, or from Apple's hub one; unknown keys are ignored."""
        params = dict(params)
        for apple_key, ours in _APPLE_HUB_KEYS.items():
            if apple_key in params and ours not in params:
                params[ours] = params.pop(apple_key)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "AIMConfig":
        try:
            with open(path) as f:
                params = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(params, dict):
            raise ValueError(f"{path}: expected a JSON object, found {type(params).__name__}")
        return cls.from_dict(params)

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())


def _span(first: int, last: int) -> list[int]:
    return list(range(first, last + 1))


# name -> (config fields, best probe layers). "last" layers are always the final 6 blocks.
_PRESETS: dict[str, tuple[dict[str, Any], Optional[list[int]]]] = {
    "aim-600M": (dict(width=1536, depth=24, num_heads=12), _span(14, 19)),
    "aim-1B": (dict(width=2048, depth=24, num_heads=16), _span(12, 17)),
    "aim-3B": (dict(width=3072, depth=24, num_heads=24), _span(12, 17)),
    "aim-7B": (dict(width=4096, depth=32, num_heads=32), _span(14, 19)),
    # Small variants for local pre-training. Head scaled to the trunk (the paper's 12-block MLP head is
    # sized for 0.6B-7B trunks; its width ablation shows small losses from narrower heads).
    "aim-tiny": (
        dict(width=192, depth=12, num_heads=3, image_size=64, patch_size=8, head_width=192, head_depth=4),
        None,
    ),
    "aim-small": (
        dict(width=384, depth=12, num_heads=6, image_size=224, patch_size=14, head_width=512, head_depth=12),
        None,
    ),
}

PRESET_NAMES: Sequence[str] = tuple(_PRESETS)


def get_config(name: str, probe_layers: ProbeLayers = None, **overrides) -> AIMConfig:
    """A named preset. `probe_layers` is "best" (the default), "last" or explicit indices (see
    `AIMConfig.with_probe_layers`); `overrides` change fields."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}: expected one of {', '.join(PRESET_NAMES)}")
    fields, _ = _PRESETS[name]
    config = AIMConfig(**dict(fields, name=name, **overrides))
    return config.with_probe_layers("best" if probe_layers is None else probe_layers)


# Shared by the recipe dataclasses (train.TrainConfig, probe.ProbeConfig), which unlike AIMConfig refuse unknown keys.


def strict_from_dict(cls, params: dict, what: str):
    """`cls(**params)` for a dataclass `cls`, refusing keys that are not its fields (the error names them)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ValueError(f"{what}: unknown fields {unknown}")
    return cls(**params)


def check_int_fields(config, keys: Sequence[str], minimum: int, what: str) -> None:
    """Each field in `keys` of `config` is an int (not a bool) of at least `minimum` (0 or 1)."""
    expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    for key in keys:
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{what} {key}={value!r}: expected {expected}")
