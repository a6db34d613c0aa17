"""`load` and `convert`: from a preset name, a hub repo, a local folder or checkpoint files to an MLX model.

Sources, resolved in this order:
- a pre-training run folder (what `scripts/pretrain.py --out RUN` writes): its exported trunk `RUN/model/`;
  likewise a demo run folder (`mlx_aim_demo/seed0`): the trunk of the pre-training run inside it;
- a local MLX model folder (config.json with "model_type": "aim", model.safetensors or shards);
- a local folder in Apple's hub layout (config.json with img_size/embed_dim/..., model.safetensors or
  pytorch_model.bin), or a folder of Apple's `.pth` files;
- checkpoint files: Apple's `apple/AIM` backbone and head `.pth`, `.bin`, `.safetensors`;
- a preset name (aim-600M, ...): Apple's `apple/AIM` files through huggingface_hub, converted once and cached;
- a hub repo id (apple/AIM-600M, or an MLX conversion), through huggingface_hub (offline mode and cache
  settings honoured, as huggingface_hub reads them from the environment).

PyTorch pickles are read by `torch_checkpoint` without torch and without executing anything.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import PRESET_NAMES, AIMConfig, config_from_file, get_config
from .model import AIM, DTYPES, build_model, dtype_name, is_quantized, parse_dtype, parse_quantize
from .torch_checkpoint import open_torch_checkpoint
from .weights import (
    check_shapes,
    is_dropped,
    read_safetensors,
    sanitize_tensor,
    sanitized_shape,
    save_model,
    weight_files,
)

APPLE_REPO = "apple/AIM"
# Preset -> file stem in apple/AIM: {stem}_backbone.pth, {stem}_head_best_layers.pth, ..._head_last_layers.pth
APPLE_FILE_STEMS = {
    "aim-600M": "aim_600m_2bimgs_attnprobe",
    "aim-1B": "aim_1b_5bimgs_attnprobe",
    "aim-3B": "aim_3b_5bimgs_attnprobe",
    "aim-7B": "aim_7b_5bimgs_attnprobe",
}
HUB_REPOS = {"aim-600M": "apple/AIM-600M", "aim-1B": "apple/AIM-1B", "aim-3B": "apple/AIM-3B", "aim-7B": "apple/AIM-7B"}
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def cache_dir() -> Path:
    """Where converted presets are kept: $MLX_AIM_CACHE, else <huggingface cache home>/mlx_aim."""
    if os.environ.get("MLX_AIM_CACHE"):
        return Path(os.environ["MLX_AIM_CACHE"]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "mlx_aim"


# ---------------------------------------------------------------------------------------------------
# A resolved source: its config and its tensors, each read on demand.

@dataclass
class Tensor:
    dtype: mx.Dtype
    shape: tuple
    read: Callable[[], mx.array]


@dataclass
class Source:
    config: AIMConfig
    tensors: dict[str, Tensor]  # in our layout (already sanitized); each is read once
    description: str
    closers: list

    def close(self):
        for close in self.closers:
            close()


def _add_safetensors(tensors: dict, path: Path, apple_layout: bool) -> None:
    arrays = read_safetensors(path)
    for key, value in arrays.items():
        # pop: once evaluated, a mapped array would keep its buffer alive as long as it is referenced
        _add(tensors, key, value.dtype, tuple(value.shape), (lambda k=key: arrays.pop(k)), apple_layout, path)


def _add_torch(tensors: dict, path: Path, closers: list) -> None:
    ckpt = open_torch_checkpoint(path)
    closers.append(ckpt.close)
    for key in ckpt.keys():
        dtype = DTYPES.get(ckpt.dtype(key), getattr(mx, ckpt.dtype(key), None))
        _add(tensors, key, dtype, tuple(ckpt.shape(key)), (lambda k=key: ckpt.read(k)), True, path)


def _add(tensors, key, dtype, shape, read, apple_layout, path):
    if apple_layout:
        if is_dropped(key):
            return
        shape = sanitized_shape(key, shape)
        read = (lambda r=read, k=key: sanitize_tensor(k, r()))
    if key in tensors:
        raise ValueError(f"{path}: key {key!r} appears in more than one of the source files")
    tensors[key] = Tensor(dtype, shape, read)


def _infer_config(tensors: dict[str, Tensor], probe_layers, files: Sequence[Path]) -> AIMConfig:
    """Apple's .pth files carry no config: read the architecture off the shapes, heads from the presets."""
    conv = tensors.get("preprocessor.patchifier.proj.weight")
    if conv is None:
        raise ValueError(f"{', '.join(map(str, files))}: no 'preprocessor.patchifier.proj.weight': not an AIM backbone")
    width, patch, _, channels = conv.shape
    depth = 1 + max(int(m.group(1)) for k in tensors if (m := re.match(r"trunk\.blocks\.(\d+)\.", k)))
    preset = next((n for n in PRESET_NAMES if get_config(n).width == width and get_config(n).depth == depth), None)
    if preset is None:
        raise ValueError(
            f"{files[0]}: width {width} and depth {depth} match no preset, so the head count is unknown; "
            "write a config.json next to the weights"
        )
    if probe_layers is None:
        names = " ".join(p.name for p in files)
        probe_layers = "best" if "best_layers" in names else "last"
    num_classes = tensors["head.linear.weight"].shape[0] if "head.linear.weight" in tensors else 1000
    return get_config(preset, probe_layers=probe_layers, patch_size=patch, num_channels=channels, num_classes=num_classes)


def _is_mlx_config(path: Path) -> bool:
    try:
        params = json.loads(path.read_text())
        # transformers' AIMv2 config.json says "aimv2" too, with hidden_size where ours has width
        return params.get("model_type") == "aim" or (params.get("model_type") == "aimv2" and "width" in params)
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _has_own_weights(folder: Path) -> bool:
    return (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()


def _is_pretraining_run(folder: Path) -> bool:
    """A run folder of `train.pretrain`: train_config.json or checkpoints/step_*/ (written there and nowhere
    else), and no weights of its own (a folder with model.safetensors is a model folder, whatever else it
    holds)."""
    from .train import TRAIN_CONFIG_NAME, list_checkpoints

    if not folder.is_dir() or _has_own_weights(folder):
        return False
    return (folder / TRAIN_CONFIG_NAME).is_file() or bool(list_checkpoints(folder))


def _missing_trunk_error(run: Path, demo: bool) -> ValueError:
    from .train import MODEL_DIR, TRAIN_CONFIG_NAME, latest_checkpoint

    found = latest_checkpoint(run)
    where = f"{run}: a pre-training run folder, but its exported trunk {run / MODEL_DIR} is missing"
    again = ("scripts/demo.py with the demo's --out and --seed" if demo else
             f"scripts/pretrain.py --out {run} --resume with the run's settings")
    if found is None:
        return ValueError(f"{where}, and so is any checkpoint: the run stopped (or is still running) before its "
                          f"first checkpoint. Run it again ({again}; it starts from step 0): {MODEL_DIR}/ is "
                          "written at every checkpoint")
    try:
        step = int(json.loads((found / "state.json").read_text())["step"])
        steps = int(json.loads((run / TRAIN_CONFIG_NAME).read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        step = steps = None
    export = (f'python -c "from mlx_aim.train import export_trunk, load_pretraining_checkpoint as c; '
              f"export_trunk('{run / MODEL_DIR}', c('{found}')[0])\"")
    if step is not None and step < steps:
        return ValueError(f"{where}. Its newest checkpoint is {found} (step {step} of {steps}): continue the run "
                          f"({again}; {MODEL_DIR}/ is written at its next checkpoint), or export that "
                          f"checkpoint's trunk now: {export}")
    return ValueError(f"{where}. Export it from the newest checkpoint, {found}: {export}")


def _demo_run(folder: Path) -> Optional[Path]:
    from .train import DEMO_RUN_DIR

    return folder / DEMO_RUN_DIR if _is_pretraining_run(folder / DEMO_RUN_DIR) else None


def resolve_folder(folder: str | os.PathLike) -> Path:
    """The model folder a local folder stands for: a pre-training run folder `RUN` stands for its exported
    trunk `RUN/model/`, a demo run folder (`mlx_aim_demo/seed0`, no config.json of its own) for that of its
    pre-training run; any other folder for itself. A run folder without `model/` (a run stopped before its
    first checkpoint, or whose export was removed) raises a ValueError that says how to get it."""
    from .train import MODEL_DIR

    folder = Path(folder)
    run = folder if _is_pretraining_run(folder) else None
    if run is None and not (folder / "config.json").exists():
        run = _demo_run(folder)
    if run is None:
        return folder
    if not (run / MODEL_DIR).is_dir():
        raise _missing_trunk_error(run, demo=run != folder)
    return run / MODEL_DIR


def _as_list(sources) -> list[str]:
    return [os.fspath(sources)] if isinstance(sources, (str, os.PathLike)) else [os.fspath(s) for s in sources]


def _preset_name(sources) -> Optional[str]:
    """The preset a source names (a preset name that is no local path), else None."""
    sources = _as_list(sources)
    if len(sources) == 1 and sources[0] in PRESET_NAMES and not Path(sources[0]).exists():
        return sources[0]
    return None


@dataclass
class _Located:
    """Where a source's weights are, before any of them is opened."""

    files: list[Path]
    config: Optional[AIMConfig]  # from its config.json; None: to be read off the tensors' shapes
    mlx_layout: bool  # keys and layouts already ours (an MLX model folder), else Apple's
    description: str


def _locate(sources, probe_layers) -> _Located:
    """The dispatch over the kinds of source: presets and hub ids are downloaded, run folders stand for their
    model/, a folder's config.json is read; no weight file is opened."""
    sources = _as_list(sources)
    preset = _preset_name(sources)
    if preset is not None:
        return _locate(_download_apple_files(preset, probe_layers or "best"), probe_layers or "best")
    if len(sources) == 1 and not Path(sources[0]).exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", sources[0]):
            return _locate(_download_repo(sources[0]), probe_layers)
        raise FileNotFoundError(
            f"{sources[0]}: no such file or folder, and not a preset ({', '.join(PRESET_NAMES)}) or a hub repo id"
        )
    missing = [s for s in sources if not Path(s).exists()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no such file or folder")
    if not (len(sources) == 1 and Path(sources[0]).is_dir()):
        files = [Path(s) for s in sources]
        return _Located(files, None, False, ", ".join(str(f) for f in files))
    folder = resolve_folder(sources[0])
    config_path = folder / "config.json"
    if config_path.exists() and _is_mlx_config(config_path):
        return _Located(weight_files(folder), config_from_file(config_path), True, f"MLX model folder {folder}")
    if config_path.exists():  # Apple's hub layout (huggingface_hub PyTorch mixin)
        config = AIMConfig.from_file(config_path)
        if _has_own_weights(folder):
            files = weight_files(folder)
        elif (folder / "pytorch_model.bin").exists():
            files = [folder / "pytorch_model.bin"]
        else:
            raise FileNotFoundError(f"{folder}: config.json but neither model.safetensors nor pytorch_model.bin")
        return _Located(files, config, False, ", ".join(str(f) for f in files))
    files = sorted(p for p in folder.iterdir() if p.suffix in TORCH_SUFFIXES + (".safetensors",))
    if not files:
        raise FileNotFoundError(f"{folder}: no config.json and no checkpoint files (.pth, .bin, .safetensors)")
    return _Located(files, None, False, ", ".join(str(f) for f in files))


def _open(located: _Located, probe_layers) -> Source:
    tensors, closers = {}, []
    try:
        for f in located.files:
            if f.suffix == ".safetensors":
                _add_safetensors(tensors, f, apple_layout=not located.mlx_layout)
            else:
                _add_torch(tensors, f, closers)
        if located.config is None:
            config = _infer_config(tensors, probe_layers, located.files)
        else:
            config = located.config.with_probe_layers(probe_layers)
    except BaseException:
        for close in closers:
            close()
        raise
    return Source(config, tensors, located.description, closers)


def open_source(sources: str | os.PathLike | Sequence, probe_layers=None) -> Source:
    """Resolves a preset, hub id, folder or checkpoint files into a config and lazily read tensors.
    `probe_layers` ("best", "last" or indices; `AIMConfig.with_probe_layers`) overrides the source's."""
    return _open(_locate(sources, probe_layers), probe_layers)


def source_config(sources: str | os.PathLike | Sequence, probe_layers=None) -> AIMConfig:
    """The config of a source (anything `open_source` takes) without reading its weights: a preset's from the
    registry (nothing downloaded), a folder's from its config.json, checkpoint files' from their tensors'
    shapes (their headers)."""
    preset = _preset_name(sources)
    if preset is not None:
        return get_config(preset, probe_layers=probe_layers)
    located = _locate(sources, probe_layers)
    if located.config is not None:
        return located.config.with_probe_layers(probe_layers)
    source = _open(located, probe_layers)
    source.close()
    return source.config


def _download_apple_files(preset: str, probe_layers: str) -> list[str]:
    from huggingface_hub import hf_hub_download

    if probe_layers not in ("best", "last"):
        raise ValueError(f"probe_layers={probe_layers!r}: Apple publishes 'best' and 'last' heads only")
    stem = APPLE_FILE_STEMS[preset]
    return [
        hf_hub_download(APPLE_REPO, f"{stem}_backbone.pth"),
        hf_hub_download(APPLE_REPO, f"{stem}_head_{probe_layers}_layers.pth"),
    ]


def _download_repo(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.md"])
    if not any(Path(path).glob("*.safetensors")):  # Apple's repos may hold only the pickled .bin
        path = snapshot_download(repo_id, allow_patterns=["*.json", "pytorch_model.bin"])
    return path


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
        target = dtype if dtype is not None and mx.issubdtype(t.dtype, mx.floating) else t.dtype

        def cast(t=t, target=target):
            return t.read().astype(target)

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


def _check_source(model: AIM, source: Source, converted: dict) -> None:
    """Every key and shape against the config, before any tensor is read or written."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    if not any(k.startswith("head.") for k in converted):  # a trunk without a trained probe (pre-training export)
        expected = {k: v for k, v in expected.items() if not k.startswith("head.")}
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
    """Converts a source (see `open_source`) into an MLX model folder at `out`, one tensor at a time."""
    dtype = parse_dtype(dtype)
    quantization = parse_quantize(quantize, q_group_size)
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists: pass --force (force=True) to replace it")
    source = open_source(src, probe_layers)
    try:
        config = source.config.replace(quantization=quantization)
        converted = _converted(source, dtype, quantization)
        _check_source(build_model(config), source, converted)
        kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        save_model(out, converted, config, force=force, source_note=f"Converted from {source.description}.", **kwargs)
    finally:
        source.close()
    if upload_repo:
        upload(out, upload_repo)
    return out


def upload(folder: str | os.PathLike, repo_id: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload AIM converted with mlx-aim")


# ---------------------------------------------------------------------------------------------------
# Loading.

def _cached_conversion(preset: str, probe_layers, dtype, quantization) -> Path:
    probe = probe_layers or "best"
    parts = [preset, f"{probe}-layers", dtype_name(dtype or mx.float32)]
    if quantization:
        parts.append(f"q{quantization['bits']}g{quantization['group_size']}")
    folder = cache_dir() / "-".join(parts)
    if not folder.exists():
        convert(preset, folder, dtype=dtype, quantize=quantization, probe_layers=probe)
    return folder


def load(
    name_or_path,
    dtype=None,
    quantize=None,
    probe_layers=None,
    head: Optional[str | os.PathLike] = None,
    q_group_size: int = 64,
) -> AIM:
    """Loads an AIM classifier in eval mode from a preset, hub repo id, folder or checkpoint files.

    dtype: "float32", "bfloat16" or "float16" (default: as stored). quantize: 4 or 8 bits for the trunk's
    linear layers. probe_layers: "best", "last" or indices (default: what the source says; Apple's hub
    configs mean the last 6 blocks). head: a probe head file (safetensors with Apple's `head.*` keys) to
    load over the source's. A source without `head.*` weights (a pre-training export) gets a freshly
    initialised probe, and `model.has_trained_head` is False.
    """
    dtype = parse_dtype(dtype)
    quantization = parse_quantize(quantize, q_group_size)
    preset = _preset_name(name_or_path)
    if preset is not None:
        name_or_path = _cached_conversion(preset, probe_layers, dtype, quantization)
        probe_layers = dtype = quantization = None
    source = open_source(name_or_path, probe_layers)
    try:
        stored_q = source.config.quantization
        if stored_q and quantization and stored_q != quantization:
            raise ValueError(f"{source.description}: already quantized as {stored_q}; cannot re-quantize")
        if stored_q:  # stored quantized: the triple is loaded as it is
            quantization = None
        config = source.config.replace(quantization=stored_q or quantization)
        if head is not None:
            config = _merge_head(source, Path(head), config, probe_layers)
        converted = _converted(source, dtype, quantization)
        model = build_model(config, dtype)  # a fresh probe head, where the source has none, in `dtype` too
        _check_source(model, source, converted)
        # Tensor by tensor, so that a cast or quantization never holds two copies of the model.
        loaded = []
        for key, (_, _, produce) in converted.items():
            loaded.append((key, produce()))
            mx.eval(loaded[-1][1])
        model.load_weights(loaded, strict=False)  # keys and shapes were checked above
    finally:
        source.close()
    if any(k.startswith("head.") for k in converted):
        model.attach_head(model.head)  # its weights, just loaded, are a trained probe
    return model


def _merge_head(source: Source, path: Path, config: AIMConfig, probe_layers) -> AIMConfig:
    """Puts a probe head file's `head.*` tensors over the source's; returns the config the head implies.

    The class count comes from the head's classifier rows; the probe layers from the file's metadata
    (written by `mlx_aim.probe`) unless the caller named them.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: probe head file not found")
    head, metadata = {}, {}
    if path.suffix == ".safetensors":
        _add_safetensors(head, path, apple_layout=False)
        metadata = mx.load(str(path), return_metadata=True)[1]
    else:
        _add_torch(head, path, source.closers)
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
            config = config.replace(probe_layers=[int(i) for i in json.loads(metadata["probe_layers"])])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: metadata probe_layers={metadata['probe_layers']!r} is not a list of "
                             "block indices") from e
    return config
