"""The architectures' configurations: one dataclass per model family (AIM, AIMv2), and the one registry of
named presets for both."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import reprlib
import typing
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence, Union

from ..fileio import read_json_object, write_json

# Apple's hub `config.json` (huggingface_hub's PyTorch mixin) names only these, under other names.
_APPLE_HUB_KEYS = {
    "img_size": "image_size",
    "patch_size": "patch_size",
    "embed_dim": "width",
    "num_blocks": "depth",
    "num_heads": "num_heads",
}


# Native resolution's default guard on patches per image: AIMv2-native was trained on 112 to 4096 patches. The one
# definition: `AIMv2Config.max_patches` and the data layer's native `Preprocessing` default to it.
MAX_PATCHES = 4096

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


class _TrunkConfig:
    """What both families' configs share: probe layers, copies with changes, and config.json files."""

    name: Optional[str]
    depth: int
    probe_layers: list[int]

    @property
    def max_block_id(self) -> int:
        """The deepest block the probe reads: the trunk stops there for classification."""
        return max(self.probe_layers)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def with_probe_layers(self, probe_layers: ProbeLayers):
        """This config reading other blocks: "last" (the final 6), "best" (a released model's best layers,
        apple/ml-aim's `aim-v1` README; the final 6 for a preset that names none) or block indices; None keeps them."""
        if probe_layers is None:
            return self
        if probe_layers == "last":
            return self.replace(probe_layers=_last_layers(self.depth))
        if probe_layers == "best":
            if self.name not in _PRESETS:
                raise ValueError(f"probe_layers='best' needs a preset's model; {self.name!r} is not one "
                                 f"({', '.join(PRESET_NAMES)})")
            best = _PRESETS[self.name].best
            return self.replace(probe_layers=list(best) if best is not None else _last_layers(self.depth))
        if isinstance(probe_layers, str):
            raise ValueError(f"probe_layers={probe_layers!r}: expected 'best', 'last' or a list of block indices")
        return self.replace(probe_layers=list(probe_layers))

    def _check_probe_layers(self) -> None:
        if not self.probe_layers:
            raise ValueError("config probe_layers is empty: expected at least one block index")
        bad = [i for i in self.probe_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(
                f"config probe_layers {bad} out of range: expected block indices in [0, {self.depth - 1}]"
            )

    @classmethod
    def from_file(cls, path: str | os.PathLike):
        return cls.from_dict(read_json_object(path))

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())


_INT_LIMIT = 2**31  # MLX holds sizes as 32-bit integers: a larger one fails inside it, with no key named
_TYPE_NAMES = {int: "a 32-bit integer", float: "a finite number", str: "a string", dict: "a JSON object",
               list[int]: "a list of integers", type(None): "null"}


@functools.cache
def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_of(value, hint) -> bool:
    """Whether `value` is of the annotated type `hint`: JSON's bool is no integer, nor a float or a string a number."""
    if typing.get_origin(hint) is Union:
        return any(_is_of(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return isinstance(value, (list, tuple)) and all(_is_of(v, typing.get_args(hint)[0]) for v in value)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and -_INT_LIMIT < value < _INT_LIMIT
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    if typing.get_origin(hint) is Union:
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return _TYPE_NAMES.get(hint, "a JSON object")  # a nested config


def _check_types(config) -> None:
    """Every field of a config dataclass of its annotated type, before any is used: a config.json's "128", true,
    12.0 or [1] where an integer belongs is refused here, naming the key and the type, not met as a TypeError later.
    `quantization` holds positive integer "bits" and "group_size"."""
    types = _field_types(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _is_of(value, types[f.name]):
            raise ValueError(f"config {f.name}={reprlib.repr(value)}: expected {_type_name(types[f.name])}")
    q = config.quantization
    if q is not None and not all(_is_of(q.get(k), int) and q[k] > 0 for k in ("bits", "group_size")):
        raise ValueError(f"config quantization={reprlib.repr(q)}: expected positive integers \"bits\" and "
                         "\"group_size\"")


def _check_positive_ints(config, keys: Sequence[str]) -> None:
    for key in keys:
        value = getattr(config, key)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"config {key}={value!r}: expected a positive integer")


def _check_model_type(params: dict, expected: str, cls_name: str) -> None:
    """A config.json of another model family (its "model_type") is refused, not read as this one."""
    model_type = params.get("model_type", expected)
    if model_type != expected:
        raise ValueError(f"config model_type={model_type!r}: {cls_name} reads {expected!r} configs "
                         "(config_from_dict picks the class from model_type)")


def _known_fields(cls, params: dict) -> dict:
    """The entries of `params` that are fields of the dataclass `cls` (a config.json may carry others)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in params.items() if k in names}


@dataclass
class AIMConfig(_TrunkConfig):
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
        _check_types(self)
        if self.probe_layers is None:
            self.probe_layers = _last_layers(self.depth)
        self.probe_layers = [int(i) for i in self.probe_layers]
        self.validate()

    def validate(self) -> None:
        _check_positive_ints(self, ("image_size", "patch_size", "num_channels", "width", "depth", "num_heads"))
        if self.image_size % self.patch_size:
            raise ValueError(
                f"config image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.width % self.num_heads:
            raise ValueError(f"config width={self.width} is not divisible by num_heads={self.num_heads}")
        if self.width % 4:
            raise ValueError(f"config width={self.width}: the 2-D sin-cos embedding needs a multiple of 4")
        self._check_probe_layers()
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

    # Round trips through dicts and config.json.
    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["model_type"] = "aim"
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, params: dict) -> "AIMConfig":
        """Builds a config from our `config.json`, or from Apple's hub one; unknown keys are ignored."""
        _check_model_type(params, "aim", cls.__name__)
        params = dict(params)
        for apple_key, ours in _APPLE_HUB_KEYS.items():
            if apple_key in params and ours not in params:
                params[ours] = params.pop(apple_key)
        return cls(**_known_fields(cls, params))


@dataclass
class AIMv2Config(_TrunkConfig):
    """Everything needed to build an AIMv2 vision encoder (arXiv 2411.14402; apple/ml-aim `aim-v2/`). Saved as
    `config.json` next to the weights, with "model_type": "aimv2"."""

    name: Optional[str] = None
    # None: native resolution (any size whose sides are multiples of the patch size, up to `max_patches`).
    image_size: Optional[int] = 224
    patch_size: int = 14
    num_channels: int = 3
    width: int = 1024
    depth: int = 24
    num_heads: int = 8
    hidden_dim: int = 2816  # SwiGLU's hidden size
    norm_eps: float = 1e-5
    # "learned": a stored (1, num_patches, width) embedding, fixed-size checkpoints; "sincos": the 2-D sin-cos
    # embedding computed for each input grid, native resolution. None: whichever `image_size` implies.
    pos_embed: Optional[str] = None
    # Native resolution's guard against huge inputs (attention's cost grows with the square of the patches).
    max_patches: int = MAX_PATCHES
    # Blocks whose raw outputs the attentive probe averages (0-indexed). None: the last 6 blocks.
    probe_layers: Optional[list[int]] = None
    num_classes: int = 1000
    # Set by quantized conversions: {"group_size": 64, "bits": 4}.
    quantization: Optional[dict] = None

    def __post_init__(self):
        _check_types(self)
        if self.pos_embed is None:
            self.pos_embed = "sincos" if self.image_size is None else "learned"
        if self.probe_layers is None:
            self.probe_layers = _last_layers(self.depth)
        self.probe_layers = [int(i) for i in self.probe_layers]
        self.validate()

    def validate(self) -> None:
        _check_positive_ints(self, ("patch_size", "num_channels", "width", "depth", "num_heads", "hidden_dim",
                                    "max_patches"))
        if self.pos_embed not in ("learned", "sincos"):
            raise ValueError(f"config pos_embed={self.pos_embed!r}: expected 'learned' or 'sincos'")
        if self.image_size is None:
            if self.pos_embed != "sincos":
                raise ValueError("config image_size=None (native resolution) needs pos_embed='sincos': "
                                 "a learned position embedding has one grid size")
        else:
            _check_positive_ints(self, ("image_size",))
            if self.image_size % self.patch_size:
                raise ValueError(
                    f"config image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
                )
            if self.pos_embed != "learned":
                raise ValueError(f"config pos_embed={self.pos_embed!r} with image_size={self.image_size}: "
                                 "the sin-cos embedding is native resolution's (image_size=None)")
        if self.width % self.num_heads:
            raise ValueError(f"config width={self.width} is not divisible by num_heads={self.num_heads}")
        if self.pos_embed == "sincos" and self.width % 4:
            raise ValueError(f"config width={self.width}: the 2-D sin-cos embedding needs a multiple of 4")
        self._check_probe_layers()

    # The derived quantities the model needs.
    @property
    def native(self) -> bool:
        """Native resolution: the image's own size, not one fixed size."""
        return self.image_size is None

    @property
    def grid_size(self) -> Optional[int]:
        """Patches per side of the fixed image size; None at native resolution."""
        return None if self.native else self.image_size // self.patch_size

    @property
    def num_patches(self) -> Optional[int]:
        """Tokens of the fixed image size (the learned position embedding's length); None at native resolution."""
        return None if self.native else self.grid_size**2

    # Round trips through dicts and config.json.
    def to_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k == "image_size"}
        out["model_type"] = "aimv2"
        return out

    @classmethod
    def from_dict(cls, params: dict) -> "AIMv2Config":
        """Builds a config from our `config.json` ("model_type": "aimv2"); unknown keys are ignored."""
        _check_model_type(params, "aimv2", cls.__name__)
        return cls(**_known_fields(cls, params))


@dataclass
class AIMv2LiTConfig:
    """AIMv2-LiT (aimv2-large-patch14-224-lit, the hub model card): its image encoder's `AIMv2Config`, the
    causal text tower's fields and the shared embedding's size. Saved as `config.json` with "model_type":
    "aimv2_lit" and the image encoder's config under "image"."""

    image: AIMv2Config = dataclasses.field(default_factory=lambda: AIMv2Config(**_AIMV2_TRUNKS["large"]))
    name: Optional[str] = None
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 768
    text_depth: int = 12
    text_num_heads: int = 6
    text_hidden_dim: int = 2048  # the text tower's SwiGLU hidden size
    text_norm_eps: float = 1e-5
    projection_dim: int = 768  # transformers' default is 512: read it from the checkpoint
    eos_token_id: int = 49407  # CLIP's <|endoftext|>: the text tower pools its first occurrence
    max_logit_scale: float = 100.0
    # Set by quantized conversions: {"group_size": 64, "bits": 4}.
    quantization: Optional[dict] = None

    def __post_init__(self):
        if isinstance(self.image, dict):
            self.image = AIMv2Config.from_dict(self.image)
        _check_types(self)
        self.validate()

    def validate(self) -> None:
        _check_positive_ints(self, ("vocab_size", "context_length", "text_width", "text_depth", "text_num_heads",
                                    "text_hidden_dim", "projection_dim"))
        if self.text_width % self.text_num_heads:
            raise ValueError(f"config text_width={self.text_width} is not divisible by "
                             f"text_num_heads={self.text_num_heads}")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(f"config eos_token_id={self.eos_token_id}: expected a token id below vocab_size="
                             f"{self.vocab_size}")
        if self.image.native:
            raise ValueError("config image: the LiT's image encoder has a fixed image size")

    def replace(self, **changes) -> "AIMv2LiTConfig":
        return dataclasses.replace(self, **changes)

    def with_probe_layers(self, probe_layers: ProbeLayers) -> "AIMv2LiTConfig":
        """The LiT has no probe (its image side pools with its own trained head): only None is taken."""
        if probe_layers is not None:
            raise ValueError(f"probe_layers={probe_layers!r}: the LiT model has no probe; it pools with its own head")
        return self

    def to_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "image"}
        out["image"] = self.image.to_dict()
        out["model_type"] = "aimv2_lit"
        return out

    @classmethod
    def from_dict(cls, params: dict) -> "AIMv2LiTConfig":
        """Builds a config from our `config.json` ("model_type": "aimv2_lit"); unknown keys are ignored."""
        _check_model_type(params, "aimv2_lit", cls.__name__)
        return cls(**_known_fields(cls, params))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "AIMv2LiTConfig":
        return cls.from_dict(read_json_object(path))

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())


Config = Union[AIMConfig, AIMv2Config, AIMv2LiTConfig]
_CONFIG_CLASSES = {"aim": AIMConfig, "aimv2": AIMv2Config, "aimv2_lit": AIMv2LiTConfig}


def config_from_dict(params: dict) -> Config:
    """The config a `config.json` describes, of the class its "model_type" names (none: AIM, as in Apple's
    AIM hub files)."""
    model_type = params.get("model_type", "aim")
    if not isinstance(model_type, str) or model_type not in _CONFIG_CLASSES:
        raise ValueError(f"config model_type={model_type!r}: expected one of {', '.join(_CONFIG_CLASSES)}")
    return _CONFIG_CLASSES[model_type].from_dict(params)


def config_from_file(path: str | os.PathLike) -> Config:
    """`config_from_dict` of a `config.json` file."""
    return config_from_dict(read_json_object(path))


def _span(first: int, last: int) -> list[int]:
    return list(range(first, last + 1))


class _Preset(NamedTuple):
    config_class: type
    fields: dict[str, Any]
    best: Optional[list[int]]  # best probe layers; None: the final 6 blocks ("last" always is)


# AIMv2's released encoders (the apple/aimv2-* hub configs), by trunk size.
_AIMV2_TRUNKS = {
    "large": dict(width=1024, depth=24, num_heads=8, hidden_dim=2816),
    "huge": dict(width=1536, depth=24, num_heads=12, hidden_dim=4096),
    "1B": dict(width=2048, depth=24, num_heads=16, hidden_dim=5632),
    "3B": dict(width=3072, depth=24, num_heads=24, hidden_dim=8192),
}


def _aimv2_presets() -> dict[str, _Preset]:
    """The 16 released AIMv2 names. Apple names no best probe layers for them: "best" means the final 6."""
    presets = {}
    for size, trunk in _AIMV2_TRUNKS.items():
        for image_size in (224, 336, 448):
            presets[f"aimv2-{size}-patch14-{image_size}"] = _Preset(AIMv2Config, dict(trunk, image_size=image_size),
                                                                   None)
    large = _AIMV2_TRUNKS["large"]
    for image_size in (224, 336):
        presets[f"aimv2-large-patch14-{image_size}-distilled"] = _Preset(
            AIMv2Config, dict(large, image_size=image_size), None)
    presets["aimv2-large-patch14-native"] = _Preset(AIMv2Config, dict(large, image_size=None), None)
    # The LiT checkpoint's image encoder; its text tower and projections are not part of this config.
    presets["aimv2-large-patch14-224-lit"] = _Preset(AIMv2Config, dict(large, image_size=224), None)
    return presets


# The one registry of both families' presets, AIM's first.
_PRESETS: dict[str, _Preset] = {
    "aim-600M": _Preset(AIMConfig, dict(width=1536, depth=24, num_heads=12), _span(14, 19)),
    "aim-1B": _Preset(AIMConfig, dict(width=2048, depth=24, num_heads=16), _span(12, 17)),
    "aim-3B": _Preset(AIMConfig, dict(width=3072, depth=24, num_heads=24), _span(12, 17)),
    "aim-7B": _Preset(AIMConfig, dict(width=4096, depth=32, num_heads=32), _span(14, 19)),
    # Small variants for local pre-training. Head scaled to the trunk (the paper's 12-block MLP head is
    # sized for 0.6B-7B trunks; its width ablation shows small losses from narrower heads).
    "aim-tiny": _Preset(
        AIMConfig,
        dict(width=192, depth=12, num_heads=3, image_size=64, patch_size=8, head_width=192, head_depth=4),
        None,
    ),
    "aim-small": _Preset(
        AIMConfig,
        dict(width=384, depth=12, num_heads=6, image_size=224, patch_size=14, head_width=512, head_depth=12),
        None,
    ),
    **_aimv2_presets(),
}

PRESET_NAMES: Sequence[str] = tuple(_PRESETS)
AIMV2_PRESET_NAMES: Sequence[str] = tuple(n for n, p in _PRESETS.items() if p.config_class is AIMv2Config)


def get_config(name: str, probe_layers: ProbeLayers = None, **overrides) -> Config:
    """A named preset, AIM's or AIMv2's (`AIMConfig` or `AIMv2Config`). `probe_layers` is "best" (the default),
    "last" or explicit indices (see `with_probe_layers`); `overrides` change fields."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}: expected one of {', '.join(PRESET_NAMES)}")
    preset = _PRESETS[name]
    config = preset.config_class(**dict(preset.fields, name=name, **overrides))
    return config.with_probe_layers("best" if probe_layers is None else probe_layers)


LIT_NAME = "aimv2-large-patch14-224-lit"  # the one released AIMv2-LiT


def model_config(name: str) -> Config:
    """The config of what `mlx_aim.load(name)` gives for a preset: `get_config`'s, except for the LiT, whose preset
    names its image encoder (the encoder presets' registry) while `load` gives the whole LiT, with the released text
    tower (`AIMv2LiTConfig`'s defaults)."""
    config = get_config(name)
    if name == LIT_NAME:
        return AIMv2LiTConfig(image=config.replace(name=None), name=name)
    return config

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
