"""The Hugging Face hub: where Apple's checkpoints are, what is downloaded of them, and where conversions are kept.

- AIM's presets (aim-600M, ...): Apple's backbone and head `.pth` files in `apple/AIM` (`download_apple_files`);
  their own repos (`HUB_REPOS`, apple/AIM-600M, ...) are hub repos like any other.
- AIMv2's released names (aimv2-large-patch14-224, ...): `mlx_model.safetensors` in `apple/<name>` at the revision
  Apple's own loader pins (`AIMV2_REVISIONS`; `download_aimv2_files`).
- Any other repo id: its configs and one set of weights, in the order a folder's weights are read
  (`download_repo`; `sources` reads the folder).

Everything goes through huggingface_hub, imported when first needed (offline mode and cache settings honoured,
as it reads them from the environment). Converted presets are kept under `cache_dir()`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from ..data.preprocessing import PREPROCESSOR_CONFIG
from ..models.config import AIMV2_PRESET_NAMES, LIT_NAME
from ..models.tokenizer import TOKENIZER_FILES

APPLE_REPO = "apple/AIM"
# Preset -> file stem in apple/AIM: {stem}_backbone.pth, {stem}_head_best_layers.pth, ..._head_last_layers.pth
APPLE_FILE_STEMS = {
    "aim-600M": "aim_600m_2bimgs_attnprobe",
    "aim-1B": "aim_1b_5bimgs_attnprobe",
    "aim-3B": "aim_3b_5bimgs_attnprobe",
    "aim-7B": "aim_7b_5bimgs_attnprobe",
}
HUB_REPOS = {"aim-600M": "apple/AIM-600M", "aim-1B": "apple/AIM-1B", "aim-3B": "apple/AIM-3B", "aim-7B": "apple/AIM-7B"}

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
# A hub folder's weights, in the order a folder's are read (`sources`): the first set found is downloaded alone.
_WEIGHT_PATTERNS = (["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"],
                    ["pytorch_model.bin"], [AIMV2_FILE], ["*.safetensors"])


def aimv2_repo(name: str) -> str:
    """The hub repo of a released AIMv2 name: apple/<name>."""
    return f"apple/{name}"


def is_repo_id(name: str) -> bool:
    """Whether `name` is shaped like a hub repo id (owner/name)."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def released_name(repo_id: str) -> Optional[str]:
    """The released AIMv2 name a hub repo id stands for (apple/aimv2-huge-patch14-448), else None."""
    owner, _, name = repo_id.partition("/")
    return name if owner == "apple" and name in AIMV2_PRESET_NAMES else None


def cache_dir() -> Path:
    """Where converted presets are kept: $MLX_AIM_CACHE, else <huggingface cache home>/mlx_aim."""
    if os.environ.get("MLX_AIM_CACHE"):
        return Path(os.environ["MLX_AIM_CACHE"]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "mlx_aim"


def download_apple_files(preset: str, probe_layers: str) -> list[str]:
    """An AIM preset's backbone and probe head files from apple/AIM."""
    from huggingface_hub import hf_hub_download

    if probe_layers not in ("best", "last"):
        raise ValueError(f"probe_layers={probe_layers!r}: Apple publishes 'best' and 'last' heads only")
    stem = APPLE_FILE_STEMS[preset]
    return [
        hf_hub_download(APPLE_REPO, f"{stem}_backbone.pth"),
        hf_hub_download(APPLE_REPO, f"{stem}_head_{probe_layers}_layers.pth"),
    ]


def download_aimv2_files(preset: str) -> Path:
    """A released AIMv2 encoder's MLX file and preprocessor settings (the LiT's tokenizer files too), at Apple's
    pinned revision."""
    from huggingface_hub import snapshot_download

    tokenizer = list(TOKENIZER_FILES) if preset == LIT_NAME else []
    path = Path(snapshot_download(aimv2_repo(preset), revision=AIMV2_REVISIONS[preset],
                                  allow_patterns=[AIMV2_FILE, PREPROCESSOR_CONFIG, *tokenizer]))
    if not (path / AIMV2_FILE).exists():
        raise FileNotFoundError(f"{aimv2_repo(preset)} at revision {AIMV2_REVISIONS[preset]}: no {AIMV2_FILE}")
    return path


def download_repo(repo_id: str) -> str:
    """A hub repo's configs and one set of weights, in the folder order (`sources`): only the weights that would be
    read are downloaded (an AIMv2 repo holds the same weights twice)."""
    from huggingface_hub import snapshot_download

    for weights in _WEIGHT_PATTERNS:
        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.md", *TOKENIZER_FILES, *weights])
        if any(Path(path).glob("*.safetensors")) or (Path(path) / "pytorch_model.bin").exists():
            return path
    return path


def _repo_of(preset: Optional[str], repo_id: str) -> tuple[str, Optional[str]]:
    """The repo and revision of a released AIMv2 name (`preset`), else of `repo_id` at its newest revision."""
    return (aimv2_repo(preset), AIMV2_REVISIONS.get(preset)) if preset else (repo_id, None)


def cached_snapshot(preset: Optional[str], repo_id: str = "") -> Optional[Path]:
    """The folder of a released AIMv2 name's (`preset`) or a repo's snapshot in huggingface_hub's cache, else None
    (not there, or not a repo id); nothing is downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, revision = _repo_of(preset, repo_id)
    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError):  # not in the cache; ValueError: not a repo id
        return None


def download_tokenizer_files(preset: Optional[str], repo_id: str = "") -> Path:
    """The tokenizer files of a released name (`preset`) or a repo, on their own (not the weights)."""
    from huggingface_hub import snapshot_download

    repo, revision = _repo_of(preset, repo_id)
    return Path(snapshot_download(repo, revision=revision, allow_patterns=list(TOKENIZER_FILES)))


def upload(folder: str | os.PathLike, repo_id: str) -> None:
    """A converted folder to a hub repo (created if needed)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload AIM converted with mlx-aim")
