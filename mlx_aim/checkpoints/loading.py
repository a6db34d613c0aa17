"""`load` and `convert`: from a preset name, a hub repo, a local folder or checkpoint files to an MLX model, one
tensor at a time.

Each question has its own module:
- which kind of source a name is, and where its weights and config are: `sources.locate`, one resolver per kind,
  tried in the order its docstring gives (presets, hub repos, checkpoint files, run folders, checkpoint folders, our
  MLX folders, hub layouts, folders of loose checkpoint files);
- what the hub holds, what is downloaded of it and where conversions are cached: `hub`;
- what architecture a checkpoint without our config.json has: `infer`, from its tensors' shapes;
- how a checkpoint's keys and layouts become ours: `weights.plan_keys`.

Here: the located files opened as tensors read on demand (`open_source`), and the one conversion path, `_converted`,
in which each tensor is cast or quantized as it is read: `convert` streams it into a folder, `load` into a model,
so that neither ever holds two copies of the model.

dtype and quantization are parsed once, where they come in (`load`, `convert`); what lies below takes the parsed
values (an mx.Dtype or None; a quantization dict or None). A preset is converted once into the cache (`hub.cache_dir`)
and loaded from there. The model `load` returns records where it came from (`model.source`, a
`sources.ModelSource`: what was named, its local folder, the files read), so that a caller never works it out again.

A whole LiT checkpoint (both projections; `weights.is_lit`) is read by `load` and `convert` as `AIMv2LiT`, its text
tower's architecture from its shapes and transformers' config.json; `open_source` reads its image encoder only
unless asked (`lit`), leaving out its text tower, projections and pooling head (and saying so).

PyTorch pickles are read by `torch_checkpoint` without torch and without executing anything; nothing here imports
torch or transformers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from ..data.preprocessing import PREPROCESSOR_CONFIG
from ..fileio import confined, parse_json
from ..models.config import AIMV2_PRESET_NAMES, LIT_NAME, AIMv2LiTConfig, Config, get_config
from ..models.model import (
    AIM, AIMEncoder, AIMv2, AIMv2LiT, DTYPES, ProbedAIMv2, TrunkModel, build_model, dtype_name, is_quantized,
    parse_dtype, parse_quantize,
)
from ..models.tokenizer import TOKENIZER_FILES
from . import infer
from .adapters import apply_adapters
from .hub import AIMV2_REVISIONS, APPLE_FILE_STEMS, cache_dir, upload
from .sources import Located, ModelSource, as_list, local_folder, locate, preset_name, resolve_folder, tokenizer_folder
from .torch_checkpoint import open_torch_checkpoint
from .weights import (
    cast_weight, check_shapes, detect_layout, is_lit, plan_keys, plan_lit_keys, read_safetensors, save_model,
)

# Where callers have found them: the hub's pins, the LiT's name, the folder look-ups.
__all__ = ["AIMV2_REVISIONS", "APPLE_FILE_STEMS", "LIT_NAME", "ModelSource", "Source", "Tensor", "cache_dir",
           "convert", "load", "local_folder", "open_source", "resolve_folder", "source_config", "tokenizer_folder",
           "upload"]


# ---------------------------------------------------------------------------------------------------
# An opened source: its config and its tensors, each read on demand.

@dataclass
class Tensor:
    dtype: mx.Dtype
    shape: tuple
    read: Callable[[], mx.array]


@dataclass
class Source:
    config: Config
    tensors: dict[str, Tensor]  # in our layout (already sanitized); each is read once
    description: str
    closers: list
    # What ships beside the weights and is carried into a conversion (a preprocessor_config.json).
    extra_files: list[Path] = field(default_factory=list)
    folder: Optional[Path] = None  # the local folder those are read from (`Located.folder`)

    def close(self):
        for close in self.closers:
            close()


def _read_safetensors(raw: dict, path: Path) -> bool:
    """Adds a safetensors file's tensors to `raw`; whether the file says it is MLX's ({"format": "mlx"})."""
    arrays, metadata = read_safetensors(path, return_metadata=True)
    for key, value in arrays.items():
        # pop: once evaluated, a mapped array would keep its buffer alive as long as it is referenced
        _add(raw, key, Tensor(value.dtype, tuple(value.shape), (lambda k=key: arrays.pop(k))), path)
    return metadata.get("format") == "mlx"


def _read_torch(raw: dict, path: Path, closers: list) -> None:
    ckpt = open_torch_checkpoint(path)
    closers.append(ckpt.close)
    for key in ckpt.keys():
        dtype = DTYPES.get(ckpt.dtype(key), getattr(mx, ckpt.dtype(key), None))
        _add(raw, key, Tensor(dtype, tuple(ckpt.shape(key)), (lambda k=key: ckpt.read(k))), path)


def _add(raw: dict, key: str, tensor: Tensor, path: Path) -> None:
    if key in raw:
        raise ValueError(f"{path}: key {key!r} appears in more than one of the source files")
    raw[key] = tensor


def _read_files(files: Sequence[Path], closers: list) -> tuple[dict[str, Tensor], bool]:
    """The files' tensors under their own keys, each read on demand; whether every file says it is MLX's."""
    raw, mlx_format = {}, True
    for f in files:
        if f.suffix == ".safetensors":
            mlx_format &= _read_safetensors(raw, f)
        else:
            _read_torch(raw, f, closers)
            mlx_format = False
    return raw, mlx_format


def _in_our_layout(raw: dict[str, Tensor], layout: str, plan_for=plan_keys) -> tuple[dict[str, Tensor], list[str]]:
    """The tensors under our keys and in our layouts (`weights.plan_keys`, or `plan_lit_keys` for a whole
    AIMv2-LiT), and the keys left out."""
    plan = plan_for(layout, {k: t.shape for k, t in raw.items()})
    tensors = {}
    for key, m in plan.tensors.items():
        read = (lambda m=m: m.build(*(raw[s].read() for s in m.sources)))
        tensors[key] = Tensor(raw[m.sources[0]].dtype, m.shape, read)
    return tensors, plan.left_out


def _shapes(tensors: dict[str, Tensor]) -> dict[str, tuple]:
    return {k: t.shape for k, t in tensors.items()}


def _open(located: Located, probe_layers, lit: bool = False) -> Source:
    closers = []
    try:
        raw, mlx_format = _read_files(located.files, closers)
        layout = located.layout or detect_layout(list(raw), located.files[0].name, mlx_format)
        if isinstance(located.config, AIMv2LiTConfig) or (lit and located.config is None and is_lit(list(raw))):
            tensors, left_out = _in_our_layout(raw, layout, plan_lit_keys)
            config = located.config or infer.lit_config(
                _shapes(_in_our_layout(raw, layout)[0]), _shapes(tensors), located.stated, located.stated_text,
                located.name, located.files)
            config = config.with_probe_layers(probe_layers)
        else:
            tensors, left_out = _in_our_layout(raw, layout)
            if located.config is not None:
                config = located.config.with_probe_layers(probe_layers)
            else:
                config = infer.encoder_config(_shapes(tensors), located.stated, located.name, located.files,
                                              probe_layers)
    except BaseException:
        for close in closers:
            close()
        raise
    description = located.description
    dropped = [k for k in tensors if located.drop_prefix and k.startswith(located.drop_prefix)]
    for key in dropped:
        del tensors[key]
    if dropped:
        description += f" (its trunk: the pixel head's {len(dropped)} tensors, which only pre-training uses, left out)"
    if left_out:
        parts = sorted({re.match(r"(?:vision_model\.|image_encoder\.)?[^.]+", k)[0] for k in left_out})
        description += f" (image encoder only: {len(left_out)} tensors left out, of {', '.join(parts)})"
    beside = (PREPROCESSOR_CONFIG, *TOKENIZER_FILES)  # carried into a conversion: preprocessing, a LiT's tokenizer
    extra = [confined(located.folder, name) for name in beside] if located.folder is not None else []
    return Source(config, tensors, description, closers, [f for f in extra if f.is_file()], located.folder)


def open_source(sources: str | os.PathLike | Sequence, probe_layers=None, lit: bool = False) -> Source:
    """Resolves a preset, hub id, folder or checkpoint files (`sources.locate`) into a config and lazily read
    tensors. `probe_layers` ("best", "last" or indices; `with_probe_layers`) overrides the source's. A whole
    AIMv2-LiT checkpoint (`weights.is_lit`) is read as the LiT model with `lit`, else as its image encoder only."""
    return _open(locate(sources, probe_layers), probe_layers, lit)


def source_config(sources: str | os.PathLike | Sequence, probe_layers=None) -> Config:
    """The config of a source (anything `open_source` takes) without reading its weights: a preset's from the
    registry (nothing downloaded), a folder's from its config.json, checkpoint files' from their tensors'
    shapes (their headers)."""
    preset = preset_name(sources)
    if preset is not None:
        return get_config(preset, probe_layers=probe_layers)
    located = locate(sources, probe_layers)
    if located.config is not None:
        return located.config.with_probe_layers(probe_layers)
    source = _open(located, probe_layers)
    source.close()
    return source.config


# ---------------------------------------------------------------------------------------------------
# Conversion: source tensors -> cast / quantized tensors, produced one at a time.

class _SharedResult:
    """A tuple computed once (reading its source once) and handed out one element at a time."""

    def __init__(self, compute: Callable[[], tuple]):
        self.compute, self.values = compute, None

    def take(self, i: int) -> mx.array:
        if self.values is None:
            self.values = list(self.compute())
        value, self.values[i] = self.values[i], None
        if all(v is None for v in self.values):
            self.values = None
        return value


def _converted(source: Source, dtype: Optional[mx.Dtype], quantization: Optional[dict]):
    """name -> (dtype, shape, producer) of the converted tensors, planned without reading any tensor."""
    out = {}
    for key, t in source.tensors.items():
        target = t.dtype
        if mx.issubdtype(t.dtype, mx.floating):
            target = dtype or (mx.float32 if t.dtype == mx.float64 else t.dtype)  # no model computes in float64

        def cast(t=t, target=target):
            return cast_weight(t.read(), target)

        if is_quantized(key, t.shape, quantization):
            q = quantization
            # Shapes of the quantized triple, from a lazy placeholder that is never evaluated.
            planned = mx.quantize(mx.zeros(t.shape, dtype=target), q["group_size"], q["bits"])
            stem = key[: -len(".weight")]
            triple = _SharedResult(lambda cast=cast, q=q: mx.quantize(cast(), q["group_size"], q["bits"]))
            for i, suffix in enumerate((".weight", ".scales", ".biases")):
                out[stem + suffix] = (planned[i].dtype, tuple(planned[i].shape), (lambda t=triple, i=i: t.take(i)))
        else:
            out[key] = (target, t.shape, cast)
    return out


def _has_probe(converted: dict) -> bool:
    """Whether a source holds a trained probe (Apple's `head.*` keys): the model it builds is then probed."""
    return any(k.startswith("head.") for k in converted)


def _check_source(model: TrunkModel | AIMv2LiT, source: Source, converted: dict) -> None:
    """Every key and shape against the model the config and the source's probe (or none) build, before any tensor
    is read or written."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    check_shapes(expected, {k: shape for k, (_, shape, _) in converted.items()}, source.description)


def convert(
    src,
    out: str | os.PathLike,
    *,
    dtype=None,
    quantize=None,
    q_group_size: int = 64,
    probe_layers=None,
    force: bool = False,
    upload_repo: Optional[str] = None,
    max_shard_bytes: Optional[int] = None,
) -> Path:
    """Converts a source (see `open_source`; a whole AIMv2-LiT as the LiT) into an MLX model folder at `out`, one
    tensor at a time. dtype: "float32", "bfloat16", "float16" or an mx.Dtype (default: as stored; float64 becomes
    float32). quantize: 4 or 8 bits (`q_group_size` weights per scale), or a quantization dict."""
    return _convert(src, Path(out), parse_dtype(dtype), parse_quantize(quantize, q_group_size), probe_layers,
                    force=force, upload_repo=upload_repo, max_shard_bytes=max_shard_bytes)


def _convert(src, out: Path, dtype: Optional[mx.Dtype], quantization: Optional[dict], probe_layers, *,
             force: bool = False, upload_repo: Optional[str] = None, max_shard_bytes: Optional[int] = None) -> Path:
    """`convert` with dtype and quantization parsed."""
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists: pass --force (force=True) to replace it")
    source = open_source(src, probe_layers, lit=True)
    try:
        config = source.config.replace(quantization=quantization)
        converted = _converted(source, dtype, quantization)
        _check_source(build_model(config, probe=_has_probe(converted)), source, converted)
        kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        save_model(out, converted, config, force=force, source_note=f"Converted from {source.description}.",
                   extra_files=source.extra_files, **kwargs)
    finally:
        source.close()
    if upload_repo:
        upload(out, upload_repo)
    return out


# ---------------------------------------------------------------------------------------------------
# Loading.

def _cached_conversion(preset: str, probe_layers, dtype: Optional[mx.Dtype], quantization: Optional[dict]) -> Path:
    """A preset converted once into the cache, in float32 unless `dtype` says otherwise. AIM's preset folders are
    per probe head file ("best" or "last"); AIMv2's, which have no head, serve any probe layers."""
    dtype = dtype or mx.float32
    probe = None if preset in AIMV2_PRESET_NAMES else probe_layers or "best"
    # The LiT's folder holds the whole model (a folder of its image encoder alone was cached under its plain name).
    parts = [preset, *(["whole"] if preset == LIT_NAME else []), *([f"{probe}-layers"] if probe else []),
             dtype_name(dtype)]
    if quantization:
        parts.append(f"q{quantization['bits']}g{quantization['group_size']}")
    folder = cache_dir() / "-".join(parts)
    if not folder.exists():
        _convert(preset, folder, dtype, quantization, probe)
    return folder


def load(
    name_or_path,
    dtype=None,
    quantize=None,
    probe_layers=None,
    head: Optional[str | os.PathLike] = None,
    q_group_size: int = 64,
    text_tower: bool = True,
    adapters: Optional[str | os.PathLike] = None,
) -> AIM | AIMEncoder | AIMv2 | ProbedAIMv2 | AIMv2LiT:
    """Loads a model in eval mode from a preset, hub repo id, folder or checkpoint files: an AIM or AIMv2 trunk
    with a trained probe (`head.*` weights in the source, or `head`) as `AIM` / `ProbedAIMv2` (`model(images)`:
    logits); without one as `AIMEncoder` / `AIMv2` (an AIMv2 encoder's `model(images)`: its normalised tokens, as
    Apple's); a whole AIMv2-LiT checkpoint (transformers' `Aimv2Model` layout, Apple's keys in PyTorch or MLX
    layouts, or our folder of one) as `AIMv2LiT`.

    dtype: "float32", "bfloat16", "float16" or an mx.Dtype (default: as stored). quantize: 4 or 8 bits for the
    trunk's linear layers, or a quantization dict. probe_layers: "best", "last" or indices (default: what the
    source says; Apple's hub configs mean the last 6 blocks). head: a probe head file (safetensors with Apple's
    `head.*` keys) to load over the source's. A source without `head.*` weights (a pre-training export, every
    released AIMv2) gets no probe: no untrained head ever answers. text_tower=False: a LiT's text tower and text
    projection are neither read nor built (`AIMv2LiT.drop_text_tower`), for image-only use; other models ignore it.
    adapters: a LoRA adapter folder (`adapters.save_adapters`: adapters.safetensors + adapter_config.json) to put on
    the loaded model (`adapters.apply_adapters`), refused when it was made for another base or its shapes differ.
    The model records where it came from in `model.source` (`sources.ModelSource`).
    """
    dtype = parse_dtype(dtype)
    quantization = parse_quantize(quantize, q_group_size)
    named = tuple(as_list(name_or_path))
    preset = preset_name(named)
    if preset is not None:
        name_or_path = _cached_conversion(preset, probe_layers, dtype, quantization)
        dtype = quantization = None
        if preset not in AIMV2_PRESET_NAMES:  # AIM's cached folder holds the probe head of these layers
            probe_layers = None
    source = open_source(name_or_path, probe_layers, lit=True)
    try:
        lit = isinstance(source.config, AIMv2LiTConfig)
        if head is not None and lit:
            raise ValueError(f"{head}: {source.description} is an AIMv2-LiT model, which pools with its own head "
                             "and takes no probe head file (a zero-shot head from `mlx-aim zero-shot --save-head` "
                             "opens with mlx_aim.tasks.zeroshot.open_zero_shot, or `mlx-aim classify --head`)")
        if lit and not text_tower:
            for key in [k for k in source.tensors if k.startswith(("text_encoder.", "text_projector."))]:
                del source.tensors[key]
        stored_q = source.config.quantization
        if stored_q and quantization and stored_q != quantization:
            raise ValueError(f"{source.description}: already quantized as {stored_q}; cannot re-quantize")
        if stored_q:  # stored quantized: the triple is loaded as it is
            quantization = None
        config = source.config.replace(quantization=stored_q or quantization)
        if head is not None:
            config = _merge_head(source, Path(head), config, probe_layers)
        converted = _converted(source, dtype, quantization)
        model = build_model(config, dtype, probe=_has_probe(converted))  # probed where a trained probe is loaded
        if lit and not text_tower:
            model.drop_text_tower()  # before any of its (lazy) weights is materialised
        _check_source(model, source, converted)
        # Tensor by tensor, so that a cast or quantization never holds two copies of the model.
        loaded = []
        for key, (_, _, produce) in converted.items():
            loaded.append((key, produce()))
            mx.eval(loaded[-1][1])
        model.load_weights(loaded, strict=False)  # keys and shapes were checked above
    finally:
        source.close()
    if adapters is not None:
        if lit:
            raise ValueError(f"{adapters}: {source.description} is an AIMv2-LiT model; LoRA adapters go on an AIM or "
                             "AIMv2 trunk")
        model = apply_adapters(model, adapters)
    model.source = ModelSource(named, source.folder, source.description)
    return model


def _merge_head(source: Source, path: Path, config: Config, probe_layers) -> Config:
    """Puts a probe head file's `head.*` tensors over the source's; returns the config the head implies.

    The class count comes from the head's classifier rows; the probe layers from the file's metadata
    (written by `mlx_aim.training.probe`) unless the caller named them.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: probe head file not found")
    safetensors = path.suffix == ".safetensors"
    head, _ = _in_our_layout(_read_files([path], source.closers)[0], "mlx" if safetensors else "torch")
    metadata = read_safetensors(path, return_metadata=True)[1] if safetensors else {}
    bad = [k for k in head if not k.startswith("head.")]
    if bad or "head.linear.weight" not in head:
        raise ValueError(f"{path}: a probe head file holds Apple's head.* keys (head.linear.weight, ...), "
                         f"found {sorted(head)[:4]}")
    for key in [k for k in source.tensors if k.startswith("head.")]:
        del source.tensors[key]
    source.tensors.update(head)
    config = config.replace(num_classes=head["head.linear.weight"].shape[0])
    if probe_layers is None and "probe_layers" in metadata:
        try:
            layers = parse_json(metadata["probe_layers"], f"{path}: metadata probe_layers")
            config = config.replace(probe_layers=[int(i) for i in layers])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: metadata probe_layers={metadata['probe_layers']!r} is not a list of "
                             "block indices") from e
    return config
