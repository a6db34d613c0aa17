"""`load` and `convert`: from a preset name, a hub repo, a local folder or checkpoint files to an MLX model.

Sources, resolved in this order:
- a pre-training run folder (what `scripts/pretrain.py --out RUN` writes): its exported trunk `RUN/model/`;
  likewise a demo run folder (`mlx_aim_demo/seed0`): the trunk of the pre-training run inside it;
- one of a run's checkpoint folders (`RUN/checkpoints/step_X/`): its trunk, the pixel head (which only
  pre-training uses) left out, as `Source.description` says;
- a local MLX model folder (config.json with "model_type" "aim" or "aimv2" as we write it, model.safetensors or
  shards);
- a local folder in a hub layout: AIM's (config.json with img_size/embed_dim/..., model.safetensors or
  pytorch_model.bin) or AIMv2's (below), or a folder of Apple's `.pth` files;
- checkpoint files: Apple's `apple/AIM` backbone and head `.pth`, `.bin`, `.safetensors`, AIMv2's safetensors;
- a preset name: AIM's (aim-600M, ...) from Apple's `apple/AIM` files, AIMv2's (aimv2-large-patch14-224, ...) from
  `mlx_model.safetensors` in `apple/<name>` at Apple's pinned revision; downloaded through huggingface_hub,
  converted once and cached;
- a hub repo id (apple/AIM-600M, apple/aimv2-huge-patch14-448, or an MLX conversion), through huggingface_hub
  (offline mode and cache settings honoured, as huggingface_hub reads them from the environment).

AIMv2 folders (local or downloaded) hold up to three weight files, read in this order, the first found only:
`model.safetensors` (or its shards) in transformers' layout (the hub repos now) or with Apple's keys (Apple's
revisions, beside Apple's remote-code config.json), then `pytorch_model.bin`, then `mlx_model.safetensors` (Apple's
keys in MLX layouts). `Source.description` names the file read and the ones left. The architecture comes from our
config.json, else from the tensors' shapes, with what a transformers or Apple config.json states over them (head
count, norm eps; `weights.hub_aimv2_fields`) and checked against every shape. A fixed-size checkpoint's image size
is its position embedding's grid; a checkpoint without one is native resolution. A whole LiT checkpoint (both
projections; `weights.is_lit`) is read by `load` and `convert` as `AIMv2LiT`, its text tower's architecture from its
shapes and transformers' config.json; `open_source` reads its image encoder only unless asked (`lit`), leaving out
its text tower, projections and pooling head (and saying so).

PyTorch pickles are read by `torch_checkpoint` without torch and without executing anything; nothing here imports
torch or transformers.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from ..models.config import (
    AIMV2_PRESET_NAMES, LIT_NAME, PRESET_NAMES, AIMConfig, AIMv2Config, AIMv2LiTConfig, Config, config_from_dict,
    get_config,
)
from ..data.preprocessing import PREPROCESSOR_CONFIG
from ..fileio import MAX_CONFIG_BYTES, confined, parse_json, read_json, read_json_object
from ..models.tokenizer import TOKENIZER_FILES
from ..models.model import (
    AIM, AIMEncoder, AIMv2, AIMv2LiT, DTYPES, ProbedAIMv2, TrunkModel, build_model, dtype_name, is_quantized,
    parse_dtype, parse_quantize,
)
from .run_folders import (
    DEMO_RUN_DIR, MODEL_DIR, TRAIN_CONFIG_NAME, is_pretraining_checkpoint, latest_checkpoint, list_checkpoints,
)
from .torch_checkpoint import open_torch_checkpoint
from .weights import (
    cast_weight, check_shapes, detect_layout, hub_aimv2_fields, hub_lit_text_fields, is_lit, plan_keys,
    plan_lit_keys, read_safetensors, save_model, weight_files,
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
PIXEL_HEAD_PREFIX = "pixel_head."  # `AIMForPretraining.pixel_head`, in a pre-training checkpoint beside the trunk

# AIMv2 presets are read from Apple's MLX file in `apple/<name>` at the revision Apple's own loader pins
# (apple/ml-aim, aim-v2/aim/v2/utils.py, `MODELS`): the files Apple's code was checked against, before the repos'
# config.json and model.safetensors were replaced by transformers' (mlx_model.safetensors was left as it was).
AIMV2_FILE = "mlx_model.safetensors"
AIMV2_REVISIONS = {
    "aimv2-large-patch14-224": "ac764a25c832c7dc5e11871daa588e98e3cdbfb7",
    "aimv2-huge-patch14-224": "9e0bab0e0abb7b20796d2d0b37f39b7c3b1c1af1",
    "aimv2-1B-patch14-224": "4d24a422f71e87d327d476bc405030fe6593d8b1",
    "aimv2-3B-patch14-224": "df1cbc288096c9742ec8bd6709ff82757972338c",
    "aimv2-large-patch14-336": "639423ae9f07319d24a7fc431b61908110d08d3a",
    "aimv2-huge-patch14-336": "21528bd53a2438a84162e79f1f9a46453b88004c",
    "aimv2-1B-patch14-336": "5a15f23f6757776fdd487283353a018677621939",
    "aimv2-3B-patch14-336": "d1adb39ee92dfd7ecf3114b1ee3aa7e9027ce98f",
    "aimv2-large-patch14-448": "cefb13f21003bdadba65bfbee956c82b976cd23d",
    "aimv2-huge-patch14-448": "44e6440a24a8ea966ad0deadf5399a22d852bcc0",
    "aimv2-1B-patch14-448": "7f292735d3a07a911559c0fabb3ad3e9d141713f",
    "aimv2-3B-patch14-448": "70810b618e4456b724bacc8ef4d2d038060ceda6",
    "aimv2-large-patch14-224-distilled": "d6d09b071e8ba31735c5e05ccd4b2a393020ce90",
    "aimv2-large-patch14-336-distilled": "8fe1704e5cc1c80cefc99c194afcefe21dff1faa",
    "aimv2-large-patch14-native": "cfe7bdbbc924a5f65272d5e2c27fe5f61771a629",
    "aimv2-large-patch14-224-lit": "c2cd59a786c4c06f39d199c50d08cc2eab9f8605",
}


def aimv2_repo(name: str) -> str:
    """The hub repo of a released AIMv2 name: apple/<name>."""
    return f"apple/{name}"


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
    config: Config
    tensors: dict[str, Tensor]  # in our layout (already sanitized); each is read once
    description: str
    closers: list
    # What ships beside the weights and is carried into a conversion (a preprocessor_config.json).
    extra_files: list[Path] = field(default_factory=list)

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


def _depth(tensors: dict[str, Tensor]) -> int:
    return 1 + max((int(m.group(1)) for k in tensors if (m := re.match(r"trunk\.blocks\.(\d+)\.", k))), default=-1)


def _patch_conv(tensors: dict[str, Tensor], files: Sequence[Path]) -> tuple:
    conv = tensors.get("preprocessor.patchifier.proj.weight")
    if conv is None or len(conv.shape) != 4:
        raise ValueError(f"{', '.join(map(str, files))}: no 'preprocessor.patchifier.proj.weight': not an AIM or AIMv2 "
                         "backbone")
    return conv.shape  # (width, patch, patch, channels) in our layout


def _infer_config(tensors: dict[str, Tensor], probe_layers, files: Sequence[Path]) -> AIMConfig:
    """Apple's AIM .pth files carry no config: read the architecture off the shapes, heads from AIM's presets."""
    width, patch, _, channels = _patch_conv(tensors, files)
    depth = _depth(tensors)
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
    num_classes = tensors["head.linear.weight"].shape[0] if "head.linear.weight" in tensors else 1000
    return get_config(preset, probe_layers=probe_layers, patch_size=patch, num_channels=channels,
                      num_classes=num_classes)


def _is_aimv2(tensors: dict[str, Tensor]) -> bool:
    return "trunk.blocks.0.mlp.fc3.weight" in tensors  # SwiGLU's third linear; AIM's MLP has two


def _infer_aimv2_config(tensors: dict[str, Tensor], stated: dict, name: Optional[str],
                        files: Sequence[Path]) -> AIMv2Config:
    """An AIMv2 architecture from the tensors' shapes, with what a config.json states (`stated`) over them, so that
    the strict check compares the file's word with the weights. Native resolution where there is no position
    embedding; a fixed size from the embedding's grid. The head count, which no shape shows, from the file, else
    from the released encoder of that width. `name`: the released name the source stands for, kept if the
    architecture is that release's."""
    where = ", ".join(map(str, files))
    width, patch, _, channels = _patch_conv(tensors, files)
    fields = dict(width=width, patch_size=patch, num_channels=channels, depth=_depth(tensors))
    if "trunk.blocks.0.mlp.fc1.weight" in tensors:
        fields["hidden_dim"] = tensors["trunk.blocks.0.mlp.fc1.weight"].shape[0]
    pos = tensors.get("preprocessor.pos_embed")
    if "pos_embed" in stated and (stated["pos_embed"] == "learned") != (pos is not None):
        said = "native resolution (is_native true)" if stated["pos_embed"] == "sincos" else "a fixed size"
        has = "has a position embedding" if pos is not None else "has no position embedding"
        raise ValueError(f"{where}: its config.json says {said}, but the checkpoint {has}")
    if pos is None:
        fields.update(image_size=None, pos_embed="sincos")
    else:
        grid = math.isqrt(pos.shape[-2])
        if grid * grid != pos.shape[-2]:
            raise ValueError(f"{where}: a position embedding of {pos.shape[-2]} positions is no square grid")
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


def _config_kind(folder: Path) -> tuple[Optional[str], dict]:
    """What a folder's config.json is, and what it holds: "mlx" (ours), "aim" (Apple's AIM hub config), "aimv2"
    (transformers' or Apple's remote-code AIMv2 config), or None (no config.json)."""
    path = confined(folder, "config.json")
    if not path.exists():
        return None, {}
    params = read_json_object(path)
    model_type = params.get("model_type")
    if model_type in ("aim", "aimv2_lit") or (model_type == "aimv2" and "width" in params):  # ours: "width"
        return "mlx", params
    if model_type in ("aimv2", "aimv2_vision_model"):
        return "aimv2", params
    return "aim", params  # AIMConfig.from_dict refuses other model types, naming them


def _has_own_weights(folder: Path) -> bool:
    return (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()


def _is_pretraining_run(folder: Path) -> bool:
    """A run folder of `mlx_aim.training.pretrain`: train_config.json or checkpoints/step_*/ (written there and nowhere
    else), and no weights of its own (a folder with model.safetensors is a model folder, whatever else it
    holds)."""
    if not folder.is_dir() or _has_own_weights(folder):
        return False
    return (folder / TRAIN_CONFIG_NAME).is_file() or bool(list_checkpoints(folder))


def _missing_trunk_error(run: Path, demo: bool) -> ValueError:
    found = latest_checkpoint(run)
    where = f"{run}: a pre-training run folder, but its exported trunk {run / MODEL_DIR} is missing"
    again = ("scripts/demo.py with the demo's --out and --seed" if demo else
             f"scripts/pretrain.py --out {run} --resume with the run's settings")
    if found is None:
        return ValueError(f"{where}, and so is any checkpoint: the run stopped (or is still running) before its "
                          f"first checkpoint. Run it again ({again}; it starts from step 0): {MODEL_DIR}/ is "
                          "written at every checkpoint")
    try:
        step = int(read_json(found / "state.json", MAX_CONFIG_BYTES)["step"])
        steps = int(read_json(run / TRAIN_CONFIG_NAME, MAX_CONFIG_BYTES)["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        step = steps = None
    export = (f'python -c "from mlx_aim.training.pretrain import export_trunk, load_pretraining_checkpoint as c; '
              f"export_trunk('{run / MODEL_DIR}', c('{found}')[0])\"")
    as_is = "; or name that checkpoint folder itself as the model (its trunk is read)"
    if step is not None and step < steps:
        return ValueError(f"{where}. Its newest checkpoint is {found} (step {step} of {steps}): continue the run "
                          f"({again}; {MODEL_DIR}/ is written at its next checkpoint), or export that "
                          f"checkpoint's trunk now: {export}{as_is}")
    return ValueError(f"{where}. Export it from the newest checkpoint, {found}: {export}{as_is}")




def _demo_run(folder: Path) -> Optional[Path]:

    return folder / DEMO_RUN_DIR if _is_pretraining_run(folder / DEMO_RUN_DIR) else None


def resolve_folder(folder: str | os.PathLike) -> Path:
    """The model folder a local folder stands for: a pre-training run folder `RUN` stands for its exported
    trunk `RUN/model/`, a demo run folder (`mlx_aim_demo/seed0`, no config.json of its own) for that of its
    pre-training run; any other folder for itself. A run folder without `model/` (a run stopped before its
    first checkpoint, or whose export was removed) raises a ValueError that says how to get it."""

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


def _released_name(repo_id: str) -> Optional[str]:
    """The released AIMv2 name a hub repo id stands for (apple/aimv2-huge-patch14-448), else None."""
    owner, _, name = repo_id.partition("/")
    return name if owner == "apple" and name in AIMV2_PRESET_NAMES else None


@dataclass
class _Located:
    """Where a source's weights are, before any of them is opened."""

    files: list[Path]
    layout: Optional[str]  # weights.LAYOUTS; None: from the files' keys (`detect_layout`)
    config: Optional[Config]  # final (ours, a preset's, AIM's hub config.json); None: from the tensors' shapes
    description: str
    stated: dict = field(default_factory=dict)  # AIMv2 fields a transformers or Apple config.json states
    stated_text: dict = field(default_factory=dict)  # AIMv2-LiT text fields a transformers config.json states
    name: Optional[str] = None  # the released AIMv2 name a hub repo id stands for
    folder: Optional[Path] = None  # where what ships beside the weights is (preprocessor_config.json)
    drop_prefix: Optional[str] = None  # keys not read (a pre-training checkpoint's pixel head)


def _folder_weights(folder: Path, has_config: bool) -> tuple[list[Path], str]:
    """A folder's weight files, in the documented order (module docstring), and a note naming those not read."""
    def present(name: str) -> Optional[list[Path]]:
        return [confined(folder, name)] if (folder / name).exists() else None

    candidates = [
        ("model.safetensors", weight_files(folder) if _has_own_weights(folder) else None),
        ("pytorch_model.bin", present("pytorch_model.bin")),
        (AIMV2_FILE, present(AIMV2_FILE)),
    ]
    found = [(name, files) for name, files in candidates if files]
    if found:
        others = [name for name, _ in found[1:]]
        return found[0][1], f"; also there, not read: {', '.join(others)}" if others else ""
    if has_config:
        raise FileNotFoundError(f"{folder}: config.json but no weights (model.safetensors, pytorch_model.bin or "
                                f"{AIMV2_FILE})")
    files = sorted(confined(folder, p.name) for p in folder.iterdir()
                   if p.suffix in TORCH_SUFFIXES + (".safetensors",))
    if not files:
        raise FileNotFoundError(f"{folder}: no config.json and no checkpoint files (.pth, .bin, .safetensors)")
    return files, ""


def _locate_folder(folder: Path) -> _Located:
    kind, params = _config_kind(folder)
    if kind == "mlx" and is_pretraining_checkpoint(folder):
        return _Located(weight_files(folder), "mlx", config_from_dict(params), f"pre-training checkpoint {folder}",
                        folder=folder, drop_prefix=PIXEL_HEAD_PREFIX)
    if kind == "mlx":
        return _Located(weight_files(folder), "mlx", config_from_dict(params), f"MLX model folder {folder}",
                        folder=folder)
    files, not_read = _folder_weights(folder, has_config=kind is not None)
    described = ", ".join(str(f) for f in files) + not_read
    if kind == "aim":  # Apple's AIM hub layout (huggingface_hub PyTorch mixin)
        return _Located(files, "torch", AIMConfig.from_dict(params), described, folder=folder)
    stated = hub_aimv2_fields(params, str(folder / "config.json")) if kind == "aimv2" else {}
    return _Located(files, None, None, described, stated=stated, stated_text=hub_lit_text_fields(params),
                    folder=folder)


def _locate(sources, probe_layers) -> _Located:
    """The dispatch over the kinds of source: presets and hub ids are downloaded, run folders stand for their
    model/, a folder's config.json is read; no weight file is opened."""
    sources = _as_list(sources)
    preset = _preset_name(sources)
    if preset in AIMV2_PRESET_NAMES:
        folder = _download_aimv2_files(preset)
        # The LiT's architecture from its file (whole, or its image encoder: `open_source`'s `lit`).
        config = None if preset == LIT_NAME else get_config(preset, probe_layers=probe_layers)
        return _Located([confined(folder, AIMV2_FILE)], "mlx", config,
                        f"{folder / AIMV2_FILE} ({aimv2_repo(preset)} at Apple's revision)", name=preset, folder=folder)
    if preset is not None:
        return _locate(_download_apple_files(preset, probe_layers or "best"), probe_layers or "best")
    if len(sources) == 1 and not Path(sources[0]).exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", sources[0]):
            located = _locate(_download_repo(sources[0]), probe_layers)
            located.name = _released_name(sources[0])
            return located
        raise FileNotFoundError(
            f"{sources[0]}: no such file or folder, and not a preset ({', '.join(PRESET_NAMES)}) or a hub repo id"
        )
    missing = [s for s in sources if not Path(s).exists()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no such file or folder")
    if not (len(sources) == 1 and Path(sources[0]).is_dir()):
        files = [Path(s) for s in sources]
        parents = {f.parent for f in files}
        return _Located(files, None, None, ", ".join(str(f) for f in files),
                        folder=parents.pop() if len(parents) == 1 else None)
    return _locate_folder(resolve_folder(sources[0]))


def _config(located: _Located, tensors: dict[str, Tensor], probe_layers) -> Config:
    if located.config is not None:
        return located.config.with_probe_layers(probe_layers)
    if located.stated or _is_aimv2(tensors):
        return _infer_aimv2_config(tensors, located.stated, located.name, located.files).with_probe_layers(
            probe_layers)
    return _infer_config(tensors, probe_layers, located.files)


def _count_blocks(tensors, prefix: str) -> int:
    return 1 + max((int(m.group(1)) for k in tensors if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))), default=-1)


def _infer_lit_config(located: _Located, raw: dict[str, Tensor], layout: str) -> AIMv2LiTConfig:
    """A whole LiT's architecture: its image encoder's as `_infer_aimv2_config` reads it, the text tower's and the
    projection's from the shapes, with what a transformers config.json states (head count, eps, end-of-text id)
    over them. The text head count, which no shape shows, is otherwise the released LiT's (6, at width 768)."""
    image_tensors, _ = _in_our_layout(raw, layout)
    image = _infer_aimv2_config(image_tensors, located.stated, located.name, located.files)
    tensors, _ = _in_our_layout(raw, layout, plan_lit_keys)
    where = ", ".join(map(str, located.files))
    try:
        vocab_size, text_width = tensors["text_encoder.preprocessor.text_embedding.weight"].shape
        fields = dict(
            vocab_size=vocab_size, text_width=text_width,
            context_length=tensors["text_encoder.preprocessor.positional_embedding"].shape[0],
            text_depth=_count_blocks(tensors, "text_encoder.trunk.blocks."),
            text_hidden_dim=tensors["text_encoder.trunk.blocks.0.mlp.fc1.weight"].shape[0],
            projection_dim=tensors["text_projector.weight"].shape[0])
    except KeyError as e:
        raise ValueError(f"{where}: an AIMv2-LiT checkpoint without {e.args[0]!r} (in Apple's keys)") from None
    fields.update(located.stated_text)
    default = AIMv2LiTConfig.__dataclass_fields__["text_num_heads"].default
    if "text_num_heads" not in fields:
        if text_width != AIMv2LiTConfig.__dataclass_fields__["text_width"].default:
            raise ValueError(f"{where}: text width {text_width} is not the released LiT's, so its head count is "
                             "unknown; write a config.json next to the weights")
        fields["text_num_heads"] = default
    return AIMv2LiTConfig(image=image, name=located.name, **fields)


def _open(located: _Located, probe_layers, lit: bool = False) -> Source:
    closers = []
    try:
        raw, mlx_format = _read_files(located.files, closers)
        layout = located.layout or detect_layout(list(raw), located.files[0].name, mlx_format)
        if isinstance(located.config, AIMv2LiTConfig) or (lit and located.config is None and is_lit(list(raw))):
            tensors, left_out = _in_our_layout(raw, layout, plan_lit_keys)
            config = located.config or _infer_lit_config(located, raw, layout)
            config = config.with_probe_layers(probe_layers)
        else:
            tensors, left_out = _in_our_layout(raw, layout)
            config = _config(located, tensors, probe_layers)
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
    return Source(config, tensors, description, closers, [f for f in extra if f.is_file()])


def open_source(sources: str | os.PathLike | Sequence, probe_layers=None, lit: bool = False) -> Source:
    """Resolves a preset, hub id, folder or checkpoint files into a config and lazily read tensors.
    `probe_layers` ("best", "last" or indices; `with_probe_layers`) overrides the source's. A whole AIMv2-LiT
    checkpoint (`weights.is_lit`) is read as the LiT model with `lit`, else as its image encoder only."""
    return _open(_locate(sources, probe_layers), probe_layers, lit)


def source_config(sources: str | os.PathLike | Sequence, probe_layers=None) -> Config:
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


def _download_aimv2_files(preset: str) -> Path:
    """A released AIMv2 encoder's MLX file and preprocessor settings (the LiT's tokenizer files too), at Apple's
    pinned revision."""
    from huggingface_hub import snapshot_download

    tokenizer = list(TOKENIZER_FILES) if preset == LIT_NAME else []
    path = Path(snapshot_download(aimv2_repo(preset), revision=AIMV2_REVISIONS[preset],
                                  allow_patterns=[AIMV2_FILE, PREPROCESSOR_CONFIG, *tokenizer]))
    if not (path / AIMV2_FILE).exists():
        raise FileNotFoundError(f"{aimv2_repo(preset)} at revision {AIMV2_REVISIONS[preset]}: no {AIMV2_FILE}")
    return path


def _download_repo(repo_id: str) -> str:
    """A hub repo's configs and one set of weights, in the folder order (module docstring): only the weights that
    would be read are downloaded (an AIMv2 repo holds the same weights twice)."""
    from huggingface_hub import snapshot_download

    for weights in (["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"],
                    ["pytorch_model.bin"], [AIMV2_FILE], ["*.safetensors"]):
        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.md", *TOKENIZER_FILES, *weights])
        if any(Path(path).glob("*.safetensors")) or (Path(path) / "pytorch_model.bin").exists():
            return path
    return path


def local_folder(sources: str | os.PathLike | Sequence) -> Optional[Path]:
    """The local folder that holds a source's files, where what ships beside the weights is read from (a
    preprocessor_config.json: `data.preprocessing_for(config, local_folder(source))`); nothing is downloaded.
    A preset's or hub repo's download in huggingface_hub's cache (None where it is not there, or for AIM's presets,
    whose files ship nothing beside them); a local folder (a run folder: its model/); loose files' folder."""
    preset = _preset_name(sources)
    sources = _as_list(sources)
    if preset is not None or (len(sources) == 1 and not Path(sources[0]).exists()):
        if preset is not None and preset not in AIMV2_PRESET_NAMES:
            return None
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        repo, revision = (aimv2_repo(preset), AIMV2_REVISIONS[preset]) if preset else (sources[0], None)
        try:
            return Path(snapshot_download(repo, revision=revision, local_files_only=True))
        except (LocalEntryNotFoundError, ValueError):  # not in the cache; ValueError: not a repo id
            return None
    if len(sources) == 1 and Path(sources[0]).is_dir():
        return resolve_folder(sources[0])
    parents = {Path(s).parent for s in sources}
    return parents.pop() if len(parents) == 1 else None



def tokenizer_folder(sources: str | os.PathLike | Sequence) -> Path:
    """The folder of the tokenizer files that ship with a source (an AIMv2-LiT's CLIP tokenizer; `local_folder`
    says where): the released LiT's or a hub repo's are downloaded on their own (not the weights) when the cache
    lacks them. FileNotFoundError naming the folder where no tokenizer file is there."""
    folder = local_folder(sources)
    if folder is not None and any((folder / name).is_file() for name in TOKENIZER_FILES):
        return folder
    preset, sources = _preset_name(sources), _as_list(sources)
    if preset is not None or (len(sources) == 1 and not Path(sources[0]).exists()
                              and re.fullmatch(r"[\w.-]+/[\w.-]+", str(sources[0]))):
        from huggingface_hub import snapshot_download

        repo, revision = (aimv2_repo(preset), AIMV2_REVISIONS.get(preset)) if preset else (sources[0], None)
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=list(TOKENIZER_FILES)))
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    where = folder if folder is not None else ", ".join(map(str, sources))
    raise FileNotFoundError(f"{where}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); an AIMv2-LiT source "
                            "ships its CLIP tokenizer beside its weights (a conversion carries it over)")

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
    tensor at a time."""
    dtype = parse_dtype(dtype)
    quantization = parse_quantize(quantize, q_group_size)
    out = Path(out)
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


def upload(folder: str | os.PathLike, repo_id: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload AIM converted with mlx-aim")


# ---------------------------------------------------------------------------------------------------
# Loading.

def _cached_conversion(preset: str, probe_layers, dtype, quantization) -> Path:
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
        convert(preset, folder, dtype=dtype, quantize=quantization, probe_layers=probe)
    return folder


def load(
    name_or_path,
    dtype=None,
    quantize=None,
    probe_layers=None,
    head: Optional[str | os.PathLike] = None,
    q_group_size: int = 64,
    text_tower: bool = True,
) -> AIM | AIMEncoder | AIMv2 | ProbedAIMv2 | AIMv2LiT:
    """Loads a model in eval mode from a preset, hub repo id, folder or checkpoint files: an AIM or AIMv2 trunk
    with a trained probe (`head.*` weights in the source, or `head`) as `AIM` / `ProbedAIMv2` (`model(images)`:
    logits); without one as `AIMEncoder` / `AIMv2` (an AIMv2 encoder's `model(images)`: its normalised tokens, as
    Apple's); a whole AIMv2-LiT checkpoint (transformers' `Aimv2Model` layout, Apple's keys in PyTorch or MLX
    layouts, or our folder of one) as `AIMv2LiT`.

    dtype: "float32", "bfloat16" or "float16" (default: as stored). quantize: 4 or 8 bits for the trunk's
    linear layers. probe_layers: "best", "last" or indices (default: what the source says; Apple's hub
    configs mean the last 6 blocks). head: a probe head file (safetensors with Apple's `head.*` keys) to
    load over the source's. A source without `head.*` weights (a pre-training export, every released AIMv2) gets
    no probe: no untrained head ever answers. text_tower=False: a LiT's text tower and text
    projection are neither read nor built (`AIMv2LiT.drop_text_tower`), for image-only use; other models ignore it.
    """
    dtype = parse_dtype(dtype)
    quantization = parse_quantize(quantize, q_group_size)
    preset = _preset_name(name_or_path)
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
