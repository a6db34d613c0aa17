"""Weights I/O: mapping Apple's PyTorch state dicts onto the MLX model.

`sanitize` is the one place where checkpoint keys and layouts are changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .config import AIMv2Config, Config
from .fileio import atomic_directory

# PyTorch bookkeeping that MLX's BatchNorm has no use for.
_DROPPED_SUFFIXES = ("num_batches_tracked",)
_CONV_KEY = "preprocessor.patchifier.proj.weight"


def sanitize_tensor(key: str, value: mx.array) -> "mx.array | None":
    """One of Apple's PyTorch tensors in our layout, or None for bookkeeping that MLX has no use for."""
    if is_dropped(key):
        return None
    if key == _CONV_KEY and value.ndim == 4:
        return value.transpose(0, 2, 3, 1)  # PyTorch conv OIHW -> MLX OHWI
    return value


def sanitized_shape(key: str, shape: tuple) -> tuple:
    return (shape[0], shape[2], shape[3], shape[1]) if key == _CONV_KEY and len(shape) == 4 else tuple(shape)


def sanitize(weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """Apple's PyTorch key layout -> ours: drop `num_batches_tracked`, conv weight OIHW -> OHWI."""
    out = {}
    for key, value in weights.items():
        value = sanitize_tensor(key, value)
        if value is not None:
            out[key] = value
    return out


def is_dropped(key: str) -> bool:
    return key.endswith(_DROPPED_SUFFIXES)


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


def check_weights(model: nn.Module, weights: Mapping[str, mx.array], source: str = "checkpoint") -> None:
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    check_shapes(expected, {k: tuple(v.shape) for k, v in weights.items()}, source)


def load_state_dict(model: nn.Module, weights: Mapping[str, mx.array], source: str = "checkpoint") -> nn.Module:
    """Loads Apple-layout weights into `model` strictly, cast to the model's parameter dtype."""
    weights = sanitize(weights)
    check_weights(model, weights, source)
    dtypes = {k: v.dtype for k, v in tree_flatten(model.parameters())}
    model.load_weights([(k, v.astype(dtypes[k])) for k, v in weights.items()], strict=True)
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
) -> Path:
    """Writes an MLX model folder: config.json, model.safetensors (or shards + index), README.md.

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
            writer = _StreamingSafetensors(tmp / shard_name, [(k, source[k][0], source[k][1]) for k in keys], {"format": "mlx"})
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
    return folder


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an MLX model folder, from its index when sharded."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = [folder / "model.safetensors"]
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f}: weight file missing from the model folder")
    return files


def read_safetensors(path: str | os.PathLike) -> dict[str, mx.array]:
    """Lazily maps a safetensors file: tensors are read when evaluated. A missing file raises
    FileNotFoundError, one that is not safetensors ValueError; both name the file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return mx.load(str(path))
    except Exception as e:  # MLX raises RuntimeError/ValueError with no file name
        raise ValueError(f"{path}: cannot read as safetensors ({e})") from None
