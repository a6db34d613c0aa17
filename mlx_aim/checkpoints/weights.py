"""Weights I/O: checkpoint layouts mapped onto the MLX model, strict key and shape checks, and model folders
written one tensor at a time.

Our parameter names are Apple's keys. Checkpoints hold the same weights in three layouts (`LAYOUTS`; Apple's
apple/ml-aim `aim-v2/aim/v2/torch/models.py` and transformers' `models/aimv2/modeling_aimv2.py` name them):

- "mlx": Apple's keys in MLX's layouts (patch conv OHWI): our model folders, Apple's `mlx_model.safetensors`;
- "torch": Apple's keys in PyTorch's layouts (patch conv OIHW): AIM's `.pth`, `.bin` and hub files, AIMv2's
  `model.safetensors` at Apple's revisions;
- "transformers": transformers' `Aimv2VisionModel` keys (or the `vision_model.` part of its `Aimv2Model`): the
  AIMv2 hub repos' `model.safetensors` since they were converted; q, k and v stored apart, the position table
  without its batch axis.

`plan_keys` is the one place where checkpoint keys and layouts are changed: each of our tensors as the checkpoint
tensors it is made of and the function that makes it. `sanitize` applies it to arrays in memory; the loader
(`mlx_aim.checkpoints.loading`) to tensors read one at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..models.config import AIMv2Config, AIMv2LiTConfig, Config
from ..fileio import atomic_directory, confined, read_json_object

LAYOUTS = ("mlx", "torch", "transformers")
# Bookkeeping no model here has a place for: PyTorch BatchNorm's step counter, transformers' index buffer.
_BOOKKEEPING_SUFFIXES = ("num_batches_tracked", "embeddings.position_ids")
_CONV_KEY = "preprocessor.patchifier.proj.weight"
# AIMv2 LiT (aimv2-large-patch14-224-lit) in Apple's keys: the image encoder under this prefix, beside the text
# tower, the projections and the logit scale. Its attention-pool `head` pools for the text side, not our probe.
_LIT_IMAGE_PREFIX = "image_encoder."
_MLX_FILE = "mlx_model.safetensors"  # Apple's AIMv2 file in MLX layouts, in every hub repo

# transformers' AIMv2 keys -> Apple's: the whole-model ones, and block i's (`encoder.layers.{i}.` there,
# `trunk.blocks.{i}.` here). The LiT's `Aimv2Model` puts the encoder under `vision_model.`.
TRANSFORMERS_VISION_PREFIX = "vision_model."
TRANSFORMERS_KEYS = {
    "embeddings.patch_embed.weight": _CONV_KEY,
    "embeddings.patch_embed.bias": "preprocessor.patchifier.proj.bias",
    "embeddings.rms_norm.weight": "preprocessor.patchifier.norm.weight",
    "embeddings.position_embedding.weight": "preprocessor.pos_embed",
    "rms_norm.weight": "trunk.post_trunk_norm.weight",
}
TRANSFORMERS_BLOCK_KEYS = {
    "attention.out_proj.weight": "attn.proj.weight",
    "rms_norm1.weight": "norm_1.weight",
    "rms_norm2.weight": "norm_2.weight",
    "ffn.gate_proj.weight": "mlp.fc1.weight",
    "ffn.down_proj.weight": "mlp.fc2.weight",
    "ffn.up_proj.weight": "mlp.fc3.weight",
}
TRANSFORMERS_QKV = ("attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight")


class Mapped(NamedTuple):
    """One of our tensors, planned: made by `build` from these checkpoint tensors (in this order), of this shape."""

    sources: tuple[str, ...]
    shape: tuple
    build: Callable[..., mx.array]


class KeyPlan(NamedTuple):
    tensors: dict[str, Mapped]  # our key -> its plan
    left_out: list[str]  # checkpoint keys of parts no model here has (the LiT's text tower, pooling head, ...)


def _unchanged(value: mx.array) -> mx.array:
    return value


def _conv_to_ohwi(value: mx.array) -> mx.array:
    return value.transpose(0, 2, 3, 1)  # PyTorch conv OIHW -> MLX OHWI


def _with_batch_axis(value: mx.array) -> mx.array:
    return value[None]  # transformers' (N, D) position table -> Apple's (1, N, D) pos_embed


def _concatenated(*values: mx.array) -> mx.array:
    return mx.concatenate(values, axis=0)  # q, k, v (D, D) each -> Apple's fused qkv (3D, D), in that order


def _conv_plan(key: str, shape: tuple) -> Mapped:
    if len(shape) != 4:
        return Mapped((key,), tuple(shape), _unchanged)
    return Mapped((key,), (shape[0], shape[2], shape[3], shape[1]), _conv_to_ohwi)


def detect_layout(keys: Sequence[str], file_name: str, mlx_format: bool = False) -> str:
    """The layout of checkpoint files without a config of ours: transformers' keys name themselves; Apple's keys are
    in MLX layouts in a file that says so (`{"format": "mlx"}`, as `save_model` writes) and in `mlx_model.safetensors`
    (Apple's name for its MLX file), in PyTorch's everywhere else."""
    if any(k.startswith(("embeddings.", "encoder.layers.", TRANSFORMERS_VISION_PREFIX)) for k in keys):
        return "transformers"
    return "mlx" if mlx_format or file_name == _MLX_FILE else "torch"


def plan_keys(layout: str, shapes: Mapping[str, tuple]) -> KeyPlan:
    """How a checkpoint's tensors (key -> shape) become ours, in a layout of `LAYOUTS`. Keys this does not know keep
    their names, so the strict check (`check_shapes`) names them."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    shapes = {k: tuple(s) for k, s in shapes.items() if not k.endswith(_BOOKKEEPING_SUFFIXES)}
    if layout == "transformers":
        return _plan_transformers(shapes)
    plan, left_out = {}, []
    lit = any(k.startswith(_LIT_IMAGE_PREFIX) for k in shapes)
    for key, shape in shapes.items():
        ours = key
        if lit:
            if not key.startswith(_LIT_IMAGE_PREFIX) or key.startswith(_LIT_IMAGE_PREFIX + "head."):
                left_out.append(key)
                continue
            ours = key[len(_LIT_IMAGE_PREFIX):]
        if layout == "torch" and ours == _CONV_KEY:
            plan[ours] = _conv_plan(key, shape)
        else:
            plan[ours] = Mapped((key,), shape, _unchanged)
    return KeyPlan(plan, left_out)


def _plan_transformers(shapes: dict[str, tuple], prefix: Optional[str] = None) -> KeyPlan:
    """transformers' encoder keys (under `prefix`; default: `vision_model.` where there is one) -> Apple's."""
    if prefix is None:
        prefix = TRANSFORMERS_VISION_PREFIX if any(k.startswith(TRANSFORMERS_VISION_PREFIX) for k in shapes) else ""
    plan, left_out = {}, []
    for key, shape in shapes.items():
        name = key[len(prefix):]
        if not key.startswith(prefix) or name.startswith("head."):  # text tower, projections; the pooling head
            left_out.append(key)
            continue
        block = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", name)
        if name == "embeddings.patch_embed.weight":
            plan[_CONV_KEY] = _conv_plan(key, shape)
        elif name == "embeddings.position_embedding.weight":
            plan[TRANSFORMERS_KEYS[name]] = Mapped((key,), (1, *shape), _with_batch_axis)
        elif name in TRANSFORMERS_KEYS:
            plan[TRANSFORMERS_KEYS[name]] = Mapped((key,), shape, _unchanged)
        elif block and block[2] in TRANSFORMERS_BLOCK_KEYS:
            plan[f"trunk.blocks.{block[1]}.{TRANSFORMERS_BLOCK_KEYS[block[2]]}"] = Mapped((key,), shape, _unchanged)
        elif block and block[2] in TRANSFORMERS_QKV:
            parts = tuple(f"{prefix}encoder.layers.{block[1]}.{n}" for n in TRANSFORMERS_QKV)
            if not all(p in shapes for p in parts):  # one missing: each keeps its name, the strict check names both
                plan[key] = Mapped((key,), shape, _unchanged)
            elif block[2] == TRANSFORMERS_QKV[0]:
                rows = sum(shapes[p][0] for p in parts)
                plan[f"trunk.blocks.{block[1]}.attn.qkv.weight"] = Mapped(parts, (rows, *shape[1:]), _concatenated)
        else:
            plan[key] = Mapped((key,), shape, _unchanged)
    return KeyPlan(plan, left_out)


# AIMv2-LiT's whole model (`AIMv2LiT`, Apple's keys) from transformers' `Aimv2Model`: its parts outside the two
# encoders' blocks, then the text encoder's blocks (`text_model.encoder.layers.{i}.`, same names as the vision's).
TRANSFORMERS_TEXT_PREFIX = "text_model."
TRANSFORMERS_LIT_KEYS = {
    "vision_model.head.cls_token": "image_encoder.head.cls_token",
    "vision_model.head.k_proj.weight": "image_encoder.head.k.weight",
    "vision_model.head.v_proj.weight": "image_encoder.head.v.weight",
    "vision_model.head.output_proj.weight": "image_encoder.head.linear.weight",
    "vision_model.head.output_proj.bias": "image_encoder.head.linear.bias",
    "text_model.embeddings.token_embedding.weight": "text_encoder.preprocessor.text_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "text_encoder.preprocessor.positional_embedding",
    "text_model.rms_norm.weight": "text_encoder.trunk.post_trunk_norm.weight",
    "visual_projection.weight": "image_projector.weight",
    "text_projection.weight": "text_projector.weight",
    "logit_scale": "log_logit_scale",
}
# What marks a checkpoint as a whole LiT (text tower and projections), in Apple's keys and in transformers'.
_LIT_MARKERS = (("text_projector.weight", "image_projector.weight"),
                ("text_projection.weight", "visual_projection.weight"))


def is_lit(keys: Sequence[str]) -> bool:
    """Whether checkpoint keys hold a whole AIMv2-LiT: both projections, in Apple's keys or transformers'."""
    keys = set(keys)
    return any(all(k in keys for k in marker) for marker in _LIT_MARKERS)


def plan_lit_keys(layout: str, shapes: Mapping[str, tuple]) -> KeyPlan:
    """`plan_keys` for a whole AIMv2-LiT (`AIMv2LiT`, Apple's keys): its image encoder under `image_encoder.` and
    text encoder under `text_encoder.`, the pooling head, projections and logit scale; nothing is left out."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    shapes = {k: tuple(s) for k, s in shapes.items() if not k.endswith(_BOOKKEEPING_SUFFIXES)}
    if layout != "transformers":
        conv = _LIT_IMAGE_PREFIX + _CONV_KEY
        plan = {k: (_conv_plan(k, s) if layout == "torch" and k == conv else Mapped((k,), s, _unchanged))
                for k, s in shapes.items()}
        return KeyPlan(plan, [])
    plan = {}
    for theirs, ours in ((TRANSFORMERS_VISION_PREFIX, _LIT_IMAGE_PREFIX), (TRANSFORMERS_TEXT_PREFIX, "text_encoder.")):
        tower = {k: s for k, s in shapes.items() if k.startswith(theirs) and k not in TRANSFORMERS_LIT_KEYS}
        plan.update({ours + k: m for k, m in _plan_transformers(tower, theirs).tensors.items()})
    for key, shape in shapes.items():
        if key in TRANSFORMERS_LIT_KEYS:
            plan[TRANSFORMERS_LIT_KEYS[key]] = Mapped((key,), shape, _unchanged)
        elif not key.startswith((TRANSFORMERS_VISION_PREFIX, TRANSFORMERS_TEXT_PREFIX)):
            plan[key] = Mapped((key,), shape, _unchanged)  # unknown: kept, so that the strict check names it
    return KeyPlan(plan, [])


def sanitize(weights: Mapping[str, mx.array], layout: str = "torch") -> dict[str, mx.array]:
    """Checkpoint arrays in `layout` (default Apple's PyTorch one) -> ours, as `plan_keys` says."""
    plan = plan_keys(layout, {k: tuple(v.shape) for k, v in weights.items()})
    return {key: m.build(*(weights[s] for s in m.sources)) for key, m in plan.tensors.items()}


# transformers' AIMv2 config.json names (Apple's remote-code config.json uses the same ones) -> AIMv2Config's.
_HUB_AIMV2_FIELDS = {
    "hidden_size": "width", "num_hidden_layers": "depth", "num_attention_heads": "num_heads",
    "intermediate_size": "hidden_dim", "patch_size": "patch_size", "num_channels": "num_channels",
    "image_size": "image_size", "rms_norm_eps": "norm_eps",
}
_HUB_BIAS_FLAGS = ("qkv_bias", "mlp_bias", "use_bias", "attention_bias")


def hub_aimv2_fields(params: Mapping, source: str) -> dict:
    """The `AIMv2Config` fields that a transformers AIMv2 `config.json` (`Aimv2VisionConfig`, or an `Aimv2Config`'s
    `vision_config`) or Apple's remote-code one states. `pos_embed` only where the file says `is_native` (Apple's
    remote-code file does not: the weights say it). Biases, which no released encoder has, are refused."""
    vision = params.get("vision_config", params)
    if not isinstance(vision, Mapping):
        raise ValueError(f"{source}: vision_config={vision!r}: expected a JSON object")
    biased = [flag for flag in _HUB_BIAS_FLAGS if vision.get(flag)]
    if biased:
        raise ValueError(f"{source}: {', '.join(f'{f}=true' for f in biased)}: AIMv2's attention and MLP have no "
                         "biases here (nor in any released checkpoint)")
    fields = {ours: vision[theirs] for theirs, ours in _HUB_AIMV2_FIELDS.items() if theirs in vision}
    if "is_native" in vision:
        fields["pos_embed"] = "sincos" if vision["is_native"] else "learned"
        if vision["is_native"]:
            fields["image_size"] = None
    return fields


# transformers' `Aimv2TextConfig` names (an `Aimv2Config`'s "text_config") -> AIMv2LiTConfig's, for what no shape shows.
_HUB_LIT_TEXT_FIELDS = {"num_attention_heads": "text_num_heads", "rms_norm_eps": "text_norm_eps",
                        "eos_token_id": "eos_token_id"}


def hub_lit_text_fields(params: Mapping) -> dict:
    """The `AIMv2LiTConfig` text fields that a transformers `Aimv2Config` file states (none where it has no
    "text_config"), and its `max_logit_scale`."""
    text = params.get("text_config")
    if not isinstance(text, Mapping):
        return {}
    fields = {ours: text[theirs] for theirs, ours in _HUB_LIT_TEXT_FIELDS.items() if text.get(theirs) is not None}
    if "max_logit_scale" in params:
        fields["max_logit_scale"] = params["max_logit_scale"]
    return fields


def check_shapes(expected: Mapping[str, tuple], found: Mapping[str, tuple], source: str = "checkpoint") -> None:
    """Every expected key, with the expected shape: the error names the key and both shapes."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if extra:
            parts.append(f"unexpected keys {extra[:8]}{' ...' if len(extra) > 8 else ''}")
        raise ValueError(f"{source}: " + "; ".join(parts))
    for key, shape in found.items():
        if tuple(shape) != tuple(expected[key]):
            raise ValueError(f"{source}: key {key!r} has shape {tuple(shape)}, expected {tuple(expected[key])}")


def cast_weight(value, dtype: mx.Dtype):
    """`value.astype(dtype)`; a float64 tensor is cast on the CPU stream, the only one with float64 (Metal has
    none, so a cast on the default device fails on a Mac)."""
    if value.dtype == mx.float64:
        return value.astype(dtype, stream=mx.cpu)
    return value.astype(dtype)


def check_weights(model: nn.Module, weights: Mapping[str, mx.array], source: str = "checkpoint") -> None:
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    check_shapes(expected, {k: tuple(v.shape) for k, v in weights.items()}, source)


def load_state_dict(model: nn.Module, weights: Mapping[str, mx.array], source: str = "checkpoint") -> nn.Module:
    """Loads Apple-layout weights into `model` strictly, cast to the model's parameter dtype."""
    weights = sanitize(weights)
    check_weights(model, weights, source)
    dtypes = {k: v.dtype for k, v in tree_flatten(model.parameters())}
    model.load_weights([(k, cast_weight(v, dtypes[k])) for k, v in weights.items()], strict=True)
    return model


# ---------------------------------------------------------------------------------------------------
# Writing model folders: config.json + model.safetensors (or shards with an index), written atomically.


MAX_SHARD_BYTES = 5 * 1024**3  # as mlx-lm: shards past ~5 GB
_ST_DTYPES = {
    mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.float64: "F64",
    mx.int64: "I64", mx.int32: "I32", mx.int16: "I16", mx.int8: "I8",
    mx.uint64: "U64", mx.uint32: "U32", mx.uint16: "U16", mx.uint8: "U8", mx.bool_: "BOOL",
}


def _array_bytes(a: mx.array) -> memoryview:
    """The raw little-endian bytes of an evaluated array (numpy cannot hold bfloat16, so view it)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return memoryview(np.ascontiguousarray(np.asarray(a))).cast("B")


class _StreamingSafetensors:
    """Writes one safetensors file whose tensors are produced one at a time.

    mx.save_safetensors needs every tensor in memory at once; here the header is written from the planned
    shapes first, then each tensor is computed, written and freed, so peak memory stays at one tensor.
    """

    def __init__(self, path: Path, plan: list[tuple[str, mx.Dtype, tuple]], metadata: dict):
        header, offset = {"__metadata__": metadata}, 0
        for name, dtype, shape in plan:
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.size
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.plan = {name: (dtype, tuple(shape)) for name, dtype, shape in plan}
        self.file = open(path, "wb")
        self.file.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, value: mx.array) -> None:
        dtype, shape = self.plan[name]
        if value.dtype != dtype or tuple(value.shape) != shape:
            raise RuntimeError(f"tensor {name}: planned {dtype}{shape}, produced {value.dtype}{tuple(value.shape)}")
        mx.eval(value)
        self.file.write(_array_bytes(value))

    def close(self) -> None:
        self.file.close()


# A tensor producer for save_model: name -> (planned dtype, planned shape, function computing it).
TensorSource = dict[str, tuple[mx.Dtype, tuple, Callable[[], mx.array]]]


def _plan_shards(source: TensorSource, max_shard_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name, (dtype, shape, _) in source.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.size
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _model_card(config: Config, source_note: str) -> str:
    q = config.quantization
    precision = f"{q['bits']}-bit (group size {q['group_size']})" if q else "float"
    if isinstance(config, AIMv2LiTConfig):
        image = config.image
        return (
            f"# {config.name or 'AIMv2-LiT'} for MLX\n\n"
            "AIMv2-LiT (arXiv 2411.14402), zero-shot image-text, in MLX format for "
            f"[mlx-aim](https://pypi.org/project/mlx-aim/). {source_note}\n\n"
            f"- image encoder: width {image.width}, depth {image.depth}, heads {image.num_heads}, image "
            f"{image.image_size}, patch {image.patch_size}\n"
            f"- text encoder: width {config.text_width}, depth {config.text_depth}, heads {config.text_num_heads}, "
            f"context {config.context_length}, vocabulary {config.vocab_size}\n"
            f"- embedding {config.projection_dim}; weights: {precision}\n\n"
            "```python\nimport mlx_aim\nmodel = mlx_aim.load(\"path/to/this/folder\")\n"
            "logits_per_image, logits_per_text = model(images, token_ids)  # CLIP-tokenized text\n```\n"
        )
    if isinstance(config, AIMv2Config):
        title, paper = "AIMv2", "the AIMv2 vision encoder (arXiv 2411.14402)"
        image = "native resolution" if config.native else f"image {config.image_size}"
        preprocess = "mlx_aim.data.preprocessing_for(model.config, folder)"
    else:
        title, paper = "AIM", "AIM (Autoregressive Image Model, arXiv 2401.08541)"
        image, preprocess = f"image {config.image_size}", "mlx_aim.data.eval_transform"
    return (
        f"# {config.name or title} for MLX\n\n"
        f"{paper[0].upper() + paper[1:]} in MLX format for "
        f"[mlx-aim](https://pypi.org/project/mlx-aim/). {source_note}\n\n"
        f"- width {config.width}, depth {config.depth}, heads {config.num_heads}, "
        f"{image}, patch {config.patch_size}\n"
        f"- probe layers {config.probe_layers}, {config.num_classes} classes\n"
        f"- weights: {precision}\n\n"
        "```python\nimport mlx_aim\nmodel = mlx_aim.load(\"path/to/this/folder\")\n"
        f"logits = model(images)  # NHWC float images, see {preprocess}\n```\n"
    )


def save_model(
    folder: str | os.PathLike,
    weights: "dict[str, mx.array] | TensorSource",
    config: Config,
    *,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    source_note: str = "",
    extra_files: Sequence[Path] = (),
) -> Path:
    """Writes an MLX model folder: config.json, model.safetensors (or shards + index), README.md, and copies of
    `extra_files` (what ships beside the weights, such as a preprocessor_config.json).

    `weights` maps names to arrays, or to (dtype, shape, producer) triples so that a conversion can stream
    tensors one at a time. The folder is built under a temporary name and renamed into place only when
    complete; an existing folder is replaced only with `force`.
    """
    folder = Path(folder)
    if folder.exists() and not force:
        raise FileExistsError(f"{folder} already exists: pass force=True (--force) to replace it")
    source: TensorSource = {}
    for name, value in weights.items():
        if isinstance(value, mx.array):
            source[name] = (value.dtype, tuple(value.shape), (lambda v=value: v))
        else:
            source[name] = value
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(folder, replace=force) as tmp:
        shards = _plan_shards(source, max_shard_bytes)
        names = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
        ]
        weight_map = {}
        for shard_name, keys in zip(names, shards):
            plan = [(k, source[k][0], source[k][1]) for k in keys]
            writer = _StreamingSafetensors(tmp / shard_name, plan, {"format": "mlx"})
            try:
                for key in keys:
                    writer.write(key, source[key][2]())
                    weight_map[key] = shard_name
            finally:
                writer.close()
        if len(shards) > 1:
            total = sum(int(np.prod(s, dtype=np.int64)) * d.size for d, s, _ in source.values())
            index = {"metadata": {"total_size": total, "format": "mlx"}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config.save(tmp / "config.json")
        (tmp / "README.md").write_text(_model_card(config, source_note))
        for path in extra_files:
            shutil.copyfile(path, tmp / Path(path).name)
    return folder


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an MLX model folder, from its index when sharded; each confined to the folder
    (`fileio.confined`: an index naming a file outside it is refused, with the tensor key that names it)."""
    index = confined(folder, "model.safetensors.index.json")
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: not a valid safetensors index (expected a \"weight_map\" object)")
        files = list(dict.fromkeys(confined(folder, name, f"{index}: weight_map[{key!r}]")
                                   for key, name in weight_map.items()))
    else:
        files = [confined(folder, "model.safetensors")]
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f}: weight file missing from the model folder")
    return files


def read_safetensors(path: str | os.PathLike, return_metadata: bool = False):
    """Lazily maps a safetensors file: tensors are read when evaluated; with `return_metadata`, also its header's
    metadata (a dict, empty where there is none). A missing file raises FileNotFoundError, one that is not
    safetensors ValueError; both name the file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:  # MLX raises RuntimeError/ValueError with no file name
        raise ValueError(f"{path}: cannot read as safetensors ({e})") from None
    return (arrays, metadata or {}) if return_metadata else arrays
