"""How a training run lays out its folder: one description that training writes (`mlx_aim.training`) and loading
reads (a run folder, or one of its checkpoints, named as a model), so that loading a model does not depend on the
training code.

    RUN/
      config.json, train_config.json   what marks a pre-training run (train_config.json: its recipe)
      checkpoints/step_00001000/       pre-training: one numbered folder per saved step, the newest kept
        model.safetensors              the trunk and its pixel head
        optimizer.safetensors, state.json, config.json
      checkpoint/                      probe training: its latest checkpoint only, replaced at each save
      probe.json                       probe training: the classes, probe layers, trunk, settings and metrics
      model/                           the exported model folder (pre-training: the trunk; probe: trunk and head,
                                       with probe.json, whose classes name the model's)
    DEMO/pretrain/                     a demo run folder holds its pre-training run here
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Union

STATE_FILE = "state.json"  # in every checkpoint: the step, the data position, the settings
WEIGHTS_FILE = "model.safetensors"
MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"  # pre-training's numbered checkpoints
PROBE_CHECKPOINT_DIR = "checkpoint"  # the probe's one checkpoint
TRAIN_CONFIG_NAME = "train_config.json"
PROBE_INFO = "probe.json"  # written by probe training next to a trained head, read for its class names
DEMO_RUN_DIR = "pretrain"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    """The numbered checkpoint folder of `step` under `root`."""
    return root / f"step_{step:08d}"


def numbered_checkpoints(root: Path) -> list[Path]:
    """The complete numbered checkpoints under `root`, oldest first (only complete ones carry the name: they are
    written under a temporary name and renamed)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(run: Union[str, os.PathLike]) -> list[Path]:
    """A pre-training run's complete checkpoints, oldest first."""
    return numbered_checkpoints(Path(run) / CHECKPOINTS_DIR)


def latest_checkpoint(path: Union[str, os.PathLike]) -> Optional[Path]:
    """`path` itself if it is a checkpoint folder, else the newest checkpoint of the pre-training run `path`."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    return found[-1] if found else None


def is_pretraining_checkpoint(folder: Path) -> bool:
    """A pre-training checkpoint folder (`RUN/checkpoints/step_X/`): state.json beside the trunk's and pixel head's
    weights."""
    return (folder / STATE_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()
