"""Which kind of source is this? One resolver per kind, tried in one order by `locate`.

A resolver takes what the caller named (`Named`: one string, or several checkpoint files) and answers None (not
its kind) or where the weights are (`Located`: the files, their layout, the config when the source states one,
a description), without opening any weight file. Some resolve to another source and `locate` that: a preset to
the files it downloads, a hub repo id to its downloaded folder, a run folder to its trunk folder. In order:

1. `released_aimv2`: an AIMv2 released name (aimv2-large-patch14-224, ...): Apple's `mlx_model.safetensors` in
   `apple/<name>` at Apple's pinned revision (`hub`).
2. `aim_preset`: an AIM preset (aim-600M, ...): Apple's backbone and head `.pth` files from `apple/AIM`.
3. `hub_repo`: a hub repo id (apple/AIM-600M, apple/aimv2-huge-patch14-448, an MLX conversion): its folder,
   downloaded through huggingface_hub.
4. `checkpoint_files`: checkpoint files named one by one (Apple's backbone and head `.pth`, `.bin`,
   `.safetensors`).
5. `run_folder`: a pre-training run folder (what `scripts/pretrain.py --out RUN` writes): its exported trunk
   `RUN/model/`; likewise a demo run folder (`mlx_aim_demo/seed0`): the trunk of the pre-training run inside it.
6. `pretraining_checkpoint`: one of a run's checkpoint folders (`RUN/checkpoints/step_X/`): its trunk, the pixel
   head (which only pre-training uses) left out.
7. `mlx_folder`: our MLX model folder (config.json with "model_type" "aim", "aimv2" with "width", or
   "aimv2_lit"; model.safetensors or shards).
8. `aim_hub_folder`: AIM's hub layout (config.json with img_size/embed_dim/...; model.safetensors or
   pytorch_model.bin).
9. `aimv2_hub_folder`: AIMv2's hub layouts (transformers' or Apple's remote-code config.json).
10. `checkpoint_folder`: a folder of checkpoint files without config.json (Apple's `.pth` files).

A name that none of them takes is a FileNotFoundError naming it. A preset or repo id that is also a local path
is the local path.

Folders in a hub layout hold up to three weight files, read in this order, the first found only:
`model.safetensors` (or its shards) in transformers' layout (the hub repos now) or with Apple's keys (Apple's
revisions, beside Apple's remote-code config.json), then `pytorch_model.bin`, then `mlx_model.safetensors` (Apple's
keys in MLX layouts). The description names the file read and the ones left.

`local_folder` and `tokenizer_folder` answer where a source's files are on this machine without loading it;
`ModelSource` is what `load` records on a model it loads (`model.source`), so that nobody works it out again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..fileio import MAX_CONFIG_BYTES, confined, read_json, read_json_object
from ..models.config import AIMV2_PRESET_NAMES, LIT_NAME, PRESET_NAMES, AIMConfig, Config, config_from_dict, get_config
from ..models.tokenizer import TOKENIZER_FILES
from . import hub
from .run_folders import (
    DEMO_RUN_DIR, MODEL_DIR, TRAIN_CONFIG_NAME, is_pretraining_checkpoint, latest_checkpoint, list_checkpoints,
)
from .weights import hub_aimv2_fields, hub_lit_text_fields, weight_files

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
PIXEL_HEAD_PREFIX = "pixel_head."  # `AIMForPretraining.pixel_head`, in a pre-training checkpoint beside the trunk


@dataclass
class Located:
    """Where a source's weights are, before any of them is opened."""

    files: list[Path]
    layout: Optional[str]  # weights.LAYOUTS; None: from the files' keys (`detect_layout`)
    config: Optional[Config]  # final (ours, a preset's, AIM's hub config.json); None: from the tensors' shapes
    description: str
    stated: dict = field(default_factory=dict)  # AIMv2 fields a transformers or Apple config.json states
    stated_text: dict = field(default_factory=dict)  # AIMv2-LiT text fields a transformers config.json states
    name: Optional[str] = None  # the released AIMv2 name the source stands for
    folder: Optional[Path] = None  # where what ships beside the weights is (preprocessor_config.json)
    drop_prefix: Optional[str] = None  # keys not read (a pre-training checkpoint's pixel head)


@dataclass(frozen=True)
class ModelSource:
    """Where a loaded model came from: what the caller named, the local folder of what ships beside its weights
    (preprocessor_config.json, a LiT's tokenizer files; None for loose files in several folders), and the files
    read. A preset's folder is its converted copy in the cache, which carries those files over."""

    named: tuple[str, ...]
    folder: Optional[Path]
    description: str

    @property
    def name(self) -> str:
        return ", ".join(self.named)


def as_list(sources) -> list[str]:
    return [os.fspath(sources)] if isinstance(sources, (str, os.PathLike)) else [os.fspath(s) for s in sources]


def preset_name(sources) -> Optional[str]:
    """The preset a source names (a preset name that is no local path), else None."""
    sources = as_list(sources)
    if len(sources) == 1 and sources[0] in PRESET_NAMES and not Path(sources[0]).exists():
        return sources[0]
    return None


class Named:
    """What a caller named, with what the resolvers ask of it worked out once."""

    def __init__(self, sources: str | os.PathLike | Sequence, probe_layers=None):
        self.sources = as_list(sources)
        self.probe_layers = probe_layers
        self.single = self.sources[0] if len(self.sources) == 1 else None

    @cached_property
    def preset(self) -> Optional[str]:
        return preset_name(self.sources)

    @cached_property
    def missing(self) -> list[str]:
        return [s for s in self.sources if not Path(s).exists()]

    @cached_property
    def folder(self) -> Optional[Path]:
        """The one folder named, else None."""
        return Path(self.single) if self.single is not None and Path(self.single).is_dir() else None

    @cached_property
    def config_json(self) -> tuple[Optional[str], dict]:
        """The folder's config.json: its kind and what it holds (`_config_kind`); (None, {}) without one."""
        return (None, {}) if self.folder is None else _config_kind(self.folder)

    def not_found(self) -> FileNotFoundError:
        if self.single is not None:
            return FileNotFoundError(
                f"{self.single}: no such file or folder, and not a preset ({', '.join(PRESET_NAMES)}) or a hub repo id")
        return FileNotFoundError(f"{self.missing[0]}: no such file or folder")


Resolver = Callable[[Named], Optional[Located]]


# ---------------------------------------------------------------------------------------------------
# Names resolved through the hub

def released_aimv2(named: Named) -> Optional[Located]:
    preset = named.preset
    if preset not in AIMV2_PRESET_NAMES:
        return None
    folder = hub.download_aimv2_files(preset)
    # The LiT's architecture from its file (whole, or its image encoder: `loading.open_source`'s `lit`).
    config = None if preset == LIT_NAME else get_config(preset, probe_layers=named.probe_layers)
    return Located([confined(folder, hub.AIMV2_FILE)], "mlx", config,
                   f"{folder / hub.AIMV2_FILE} ({hub.aimv2_repo(preset)} at Apple's revision)", name=preset,
                   folder=folder)


def aim_preset(named: Named) -> Optional[Located]:
    if named.preset is None:
        return None
    probe_layers = named.probe_layers or "best"
    return locate(hub.download_apple_files(named.preset, probe_layers), probe_layers)


def hub_repo(named: Named) -> Optional[Located]:
    if named.single is None or named.missing != named.sources or not hub.is_repo_id(named.single):
        return None
    located = locate(hub.download_repo(named.single), named.probe_layers)
    located.name = hub.released_name(named.single)
    return located


# ---------------------------------------------------------------------------------------------------
# Local files and folders

def checkpoint_files(named: Named) -> Optional[Located]:
    if named.missing or named.folder is not None:
        return None
    files = [Path(s) for s in named.sources]
    parents = {f.parent for f in files}
    return Located(files, None, None, ", ".join(str(f) for f in files),
                   folder=parents.pop() if len(parents) == 1 else None)


def run_folder(named: Named) -> Optional[Located]:
    trunk = run_trunk(named.folder) if named.folder is not None else None
    return None if trunk is None else locate([trunk], named.probe_layers)


def pretraining_checkpoint(named: Named) -> Optional[Located]:
    kind, params = named.config_json
    if kind != "mlx" or not is_pretraining_checkpoint(named.folder):
        return None
    return Located(weight_files(named.folder), "mlx", config_from_dict(params),
                   f"pre-training checkpoint {named.folder}", folder=named.folder, drop_prefix=PIXEL_HEAD_PREFIX)


def mlx_folder(named: Named) -> Optional[Located]:
    kind, params = named.config_json
    if kind != "mlx":
        return None
    return Located(weight_files(named.folder), "mlx", config_from_dict(params), f"MLX model folder {named.folder}",
                   folder=named.folder)


def aim_hub_folder(named: Named) -> Optional[Located]:
    """Apple's AIM hub layout (huggingface_hub's PyTorch mixin)."""
    kind, params = named.config_json
    if kind != "aim":
        return None
    files, described = _folder_weights(named.folder, has_config=True)
    return Located(files, "torch", AIMConfig.from_dict(params), described, folder=named.folder)


def aimv2_hub_folder(named: Named) -> Optional[Located]:
    kind, params = named.config_json
    if kind != "aimv2":
        return None
    files, described = _folder_weights(named.folder, has_config=True)
    return Located(files, None, None, described, stated=hub_aimv2_fields(params, str(named.folder / "config.json")),
                   stated_text=hub_lit_text_fields(params), folder=named.folder)


def checkpoint_folder(named: Named) -> Optional[Located]:
    if named.folder is None or named.config_json[0] is not None:
        return None
    files, described = _folder_weights(named.folder, has_config=False)
    return Located(files, None, None, described, folder=named.folder)


RESOLVERS: tuple[Resolver, ...] = (
    released_aimv2, aim_preset, hub_repo, checkpoint_files, run_folder, pretraining_checkpoint, mlx_folder,
    aim_hub_folder, aimv2_hub_folder, checkpoint_folder,
)


def locate(sources: str | os.PathLike | Sequence, probe_layers=None) -> Located:
    """Where the weights of what the caller named are, by the first resolver that takes it (module docstring):
    presets and hub ids are downloaded, run folders stand for their model/, a folder's config.json is read; no
    weight file is opened. `probe_layers` picks an AIM preset's head file and goes into a preset's config."""
    named = Named(sources, probe_layers)
    for resolve in RESOLVERS:
        located = resolve(named)
        if located is not None:
            return located
    raise named.not_found()


# ---------------------------------------------------------------------------------------------------
# A folder's config.json and weight files

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


def _folder_weights(folder: Path, has_config: bool) -> tuple[list[Path], str]:
    """A folder's weight files, in the documented order (module docstring), and their description, which names
    those not read."""
    def present(name: str) -> Optional[list[Path]]:
        return [confined(folder, name)] if (folder / name).exists() else None

    candidates = [
        ("model.safetensors", weight_files(folder) if _has_own_weights(folder) else None),
        ("pytorch_model.bin", present("pytorch_model.bin")),
        (hub.AIMV2_FILE, present(hub.AIMV2_FILE)),
    ]
    found = [(name, files) for name, files in candidates if files]
    if found:
        others = [name for name, _ in found[1:]]
        files = found[0][1]
        return files, ", ".join(str(f) for f in files) + (f"; also there, not read: {', '.join(others)}"
                                                          if others else "")
    if has_config:
        raise FileNotFoundError(f"{folder}: config.json but no weights (model.safetensors, pytorch_model.bin or "
                                f"{hub.AIMV2_FILE})")
    files = sorted(confined(folder, p.name) for p in folder.iterdir()
                   if p.suffix in TORCH_SUFFIXES + (".safetensors",))
    if not files:
        raise FileNotFoundError(f"{folder}: no config.json and no checkpoint files (.pth, .bin, .safetensors)")
    return files, ", ".join(str(f) for f in files)


# ---------------------------------------------------------------------------------------------------
# Run folders: a pre-training run, or a demo run, stands for its exported trunk

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


def run_trunk(folder: Path) -> Optional[Path]:
    """The trunk folder a run folder stands for: a pre-training run folder `RUN`'s exported `RUN/model/`, a demo
    run folder's (`mlx_aim_demo/seed0`, no config.json of its own) that of its pre-training run; None for any
    other folder. A run folder without `model/` (a run stopped before its first checkpoint, or whose export was
    removed) raises a ValueError that says how to get it."""
    run = folder if _is_pretraining_run(folder) else None
    if run is None and not (folder / "config.json").exists() and _is_pretraining_run(folder / DEMO_RUN_DIR):
        run = folder / DEMO_RUN_DIR
    if run is None:
        return None
    if not (run / MODEL_DIR).is_dir():
        raise _missing_trunk_error(run, demo=run != folder)
    return run / MODEL_DIR


def resolve_folder(folder: str | os.PathLike) -> Path:
    """The model folder a local folder stands for: a run folder's trunk (`run_trunk`), any other folder itself."""
    folder = Path(folder)
    return run_trunk(folder) or folder


# ---------------------------------------------------------------------------------------------------
# Where a source's files are on this machine, without loading it

def local_folder(sources: str | os.PathLike | Sequence) -> Optional[Path]:
    """The local folder that holds a source's files, where what ships beside the weights is read from (a
    preprocessor_config.json: `data.preprocessing_for(config, local_folder(source))`); nothing is downloaded.
    A preset's or hub repo's download in huggingface_hub's cache (None where it is not there, or for AIM's presets,
    whose files ship nothing beside them); a local folder (a run folder: its model/); loose files' folder.
    A model `load` returned knows its own (`model.source.folder`)."""
    named = Named(sources)
    if named.preset is not None:
        return hub.cached_snapshot(named.preset) if named.preset in AIMV2_PRESET_NAMES else None
    if named.single is not None and named.missing:
        return hub.cached_snapshot(None, named.single)
    if named.folder is not None:
        return resolve_folder(named.folder)
    parents = {Path(s).parent for s in named.sources}
    return parents.pop() if len(parents) == 1 else None


def _has_tokenizer(folder: Optional[Path]) -> bool:
    return folder is not None and any((folder / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_folder(sources: str | os.PathLike | Sequence | ModelSource) -> Path:
    """The folder of the tokenizer files that ship with a source (an AIMv2-LiT's CLIP tokenizer): the loaded
    model's folder (a `ModelSource`) or the source's `local_folder` where they are there; else the released LiT's
    or a hub repo's are downloaded on their own (not the weights). FileNotFoundError naming the folder where no
    tokenizer file is there."""
    if isinstance(sources, ModelSource):
        folder, sources = sources.folder, list(sources.named)
        if not _has_tokenizer(folder):  # e.g. a preset converted before its tokenizer was carried over
            folder = local_folder(sources)
    else:
        folder = local_folder(sources)
    if _has_tokenizer(folder):
        return folder
    named = Named(sources)
    if named.preset is not None or (named.single is not None and named.missing and hub.is_repo_id(named.single)):
        folder = hub.download_tokenizer_files(named.preset, named.single)
        if _has_tokenizer(folder):
            return folder
    where = folder if folder is not None else ", ".join(named.sources)
    raise FileNotFoundError(f"{where}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); an AIMv2-LiT source "
                            "ships its CLIP tokenizer beside its weights (a conversion carries it over)")
