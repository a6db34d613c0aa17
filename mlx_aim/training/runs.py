"""The scaffold both training loops stand on: pre-training (`train.pretrain`) and probing (`probe.train_probe`).

    run = RunFolder(out, checkpoint_dir="checkpoints", weights_file="model.safetensors", numbered=True)
    found = run.prepare(resume=True)        # clears what a kill left; refuses a run it must not overwrite
    if found is not None:
        run.check_settings(found, saved=..., current=...)   # what decides the numbers must not change
        state = run.restore(found, model, optimizer)           # weights, optimizer state; state.json
    ...
    check_finite(loss, step, run.latest(), lr)               # TrainingDiverged on NaN or inf
    run.save(step, model, optimizer, {"loader": loader.state_dict()})

- `RunFolder`: a run's output folder, its checkpoints (written atomically) and the rules for starting,
  resuming and refusing.
- `RunLog`, `read_log`: the run's log.jsonl, rewound to the checkpoint when a run resumes.
- `check_finite`, `TrainingDiverged`: the one error both loops raise when the loss stops being finite.
- `compare_settings`: which settings differ between a checkpoint and this run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from ..models.config import strict_from_dict
from ..fileio import atomic_directory, read_json, remove_stale_temporaries, write_json, write_text
from ..checkpoints.run_folders import STATE_FILE, numbered_checkpoints, step_dir
from ..checkpoints.weights import check_weights, read_safetensors

OPTIMIZER_FILE = "optimizer.safetensors"
LOG_NAME = "log.jsonl"
_SHOWN_DIFFERENCES = 8


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite at `step` (its value is `value`). `checkpoint` is the run's last good
    checkpoint (None if there is none)."""

    def __init__(self, message: str, step: int, value: float, checkpoint: Optional[Path]):
        super().__init__(message)
        self.step = step
        self.value = value
        self.checkpoint = checkpoint


def silent(_line: str) -> None:
    """The loops' default `echo`: the library prints nothing unless asked (the command lines pass print)."""


def check_finite(loss: float, step: int, checkpoint: Optional[Path], lr: float) -> None:
    """Raises `TrainingDiverged` when `loss`, the loss of optimizer step `step`, is NaN or infinite."""
    if math.isfinite(loss):
        return
    where = f"; the last good checkpoint is {checkpoint}" if checkpoint else "; no checkpoint was written yet"
    raise TrainingDiverged(f"training diverged: the loss is {loss} at step {step}{where}. Train again with a "
                           f"lower learning rate (now {lr}) or a longer warm-up, or check the data.",
                           step, loss, checkpoint)


def check_same_start(start_step: int, group: Optional[mx.distributed.Group], out: Union[str, os.PathLike]) -> None:
    """Refuses (RuntimeError) when the processes of a data-parallel run would continue from different steps (one
    host found a checkpoint in `out` that another did not)."""
    if group is None or group.size() == 1:
        return
    steps = [int(s) for s in mx.distributed.all_gather(mx.array([start_step]), group=group).tolist()]
    if len(set(steps)) > 1:
        raise RuntimeError(f"processes start from different steps {steps}: every host needs the same "
                           f"checkpoints in {out} to resume (a shared folder, or copies)")


def last_step(stop_at: Optional[int], total_steps: int) -> int:
    """The step this call ends at: `stop_at` (a step of the run, to train in slices) or the run's last."""
    if stop_at is None:
        return total_steps
    if not 1 <= stop_at <= total_steps:
        raise ValueError(f"stop_at={stop_at}: expected a step in [1, {total_steps}]")
    return stop_at


# ----------------------------------------------------------------------------------------------------
# Settings


def _flat(settings: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def compare_settings(saved: Mapping, current: Mapping) -> list[str]:
    """"name: checkpoint X, now Y" for each setting that differs, in name order; nested mappings are compared
    entry by entry ("trunk.dtype"). Both sides go through JSON first (state.json holds tuples as lists)."""
    saved, current = (_flat(json.loads(json.dumps(s, default=str))) for s in (saved, current))
    return [f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


class RecipeConfig:
    """What the training configs share (`pretrain.TrainConfig`, `probe.ProbeConfig`, `finetune.FinetuneConfig`,
    each a dataclass): their fields as a dict, built back strictly (unknown keys refused), and the recipe: the fields
    that decide the numbers, all but `RUNTIME_FIELDS`, which change only what is written and how fast."""

    RUNTIME_FIELDS: tuple = ()
    WHAT = "config"  # how errors name it

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def recipe(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME_FIELDS}

    @classmethod
    def from_dict(cls, params: dict):
        return strict_from_dict(cls, params, cls.WHAT)


# ----------------------------------------------------------------------------------------------------
# The run folder and its checkpoints


class RunFolder:
    """A training run's output folder: its checkpoints, and the rules for starting, resuming and saving.

    A checkpoint is a folder holding the trained weights (`weights_file`, safetensors), the optimizer state
    flattened with `tree_flatten` (optimizer.safetensors) and state.json (the step, the data position, the
    settings: what continuing exactly needs; the loops draw their random numbers from seeds and the step, so
    no generator state is kept). It is written under a temporary name and renamed when complete, so a
    folder with a checkpoint's name is complete. With `numbered` the checkpoints are
    `checkpoint_dir/step_00001000/`, the newest `keep_last` kept (pre-training); otherwise there is one,
    `checkpoint_dir/`, replaced at each save (the probe). `can_force`: the caller can discard checkpoints
    (`prepare(force=True)`), which its error messages then offer.
    """

    def __init__(self, path: Union[str, os.PathLike], *, checkpoint_dir: str, weights_file: str, numbered: bool,
                 keep_last: int = 1, can_force: bool = False):
        self.path = Path(path)
        self.checkpoint_root = self.path / checkpoint_dir
        self.weights_file, self.numbered, self.keep_last = weights_file, numbered, keep_last
        self.can_force = can_force

    def checkpoint_path(self, step: int) -> Path:
        return step_dir(self.checkpoint_root, step) if self.numbered else self.checkpoint_root

    def checkpoints(self) -> list[Path]:
        """The complete checkpoints, oldest first."""
        if not self.numbered:
            return [self.checkpoint_root] if self.checkpoint_root.is_dir() else []
        return numbered_checkpoints(self.checkpoint_root)

    def latest(self) -> Optional[Path]:
        found = self.checkpoints()
        return found[-1] if found else None

    def _restart(self) -> str:
        if self.can_force:
            return "start again with force=True (--force) or in another folder"
        return "start a new run in another folder"

    def prepare(self, *, resume: bool, force: bool = False, writer: bool = True) -> Optional[Path]:
        """Readies the folder for a run; returns the checkpoint to continue from (None: start afresh).

        The `writer` (rank 0 of several processes) creates the folder and clears what killed writes left:
        temporaries go, a folder set aside for its replacement goes back. Existing checkpoints are continued
        with `resume`, deleted with `force`, and otherwise refused (FileExistsError).
        """
        if writer:
            self.path.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.path)
            if self.numbered:
                remove_stale_temporaries(self.checkpoint_root)
        found = self.latest()
        if found is not None and force:
            shutil.rmtree(self.checkpoint_root)
            found = None
        if found is not None and not resume:
            raise FileExistsError(f"{self.path} already holds a checkpoint ({found.name}): pass resume=True "
                                  f"(--resume) to continue it, or {self._restart()}")
        return found

    def check_settings(self, checkpoint: Path, saved: Mapping, current: Mapping) -> None:
        """Refuses to resume (ValueError naming the fields) when the settings that decide the run's numbers
        differ from those the checkpoint was written with; the callers leave runtime fields out of both."""
        differences = compare_settings(saved, current)
        if not differences:
            return
        shown = "; ".join(differences[:_SHOWN_DIFFERENCES])
        if len(differences) > _SHOWN_DIFFERENCES:
            shown += f"; and {len(differences) - _SHOWN_DIFFERENCES} more"
        raise ValueError(f"cannot resume from {checkpoint}: settings differ ({shown}); resume with the run's "
                         f"settings, or {self._restart()}")

    def save(self, step: int, module: nn.Module, optimizer: optim.Optimizer, state: dict, *, prefix: str = "",
             json_files: Optional[Mapping[str, Any]] = None) -> Path:
        """Writes the checkpoint of `step`: `module`'s parameters (names prefixed with `prefix`), the optimizer
        state, `json_files` (name -> object) and state.json (`state` with the step). One left at the same
        step by an earlier attempt is replaced; numbered checkpoints past the newest `keep_last` are deleted."""
        final = self.checkpoint_path(step)
        final.parent.mkdir(parents=True, exist_ok=True)
        with atomic_directory(final, replace=True) as tmp:
            weights = {prefix + k: v for k, v in tree_flatten(module.parameters())}
            mx.save_safetensors(str(tmp / self.weights_file), weights, metadata={"format": "mlx"})
            mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(optimizer.state)))
            for name, obj in (json_files or {}).items():
                write_json(tmp / name, obj)
            write_json(tmp / STATE_FILE, dict(state, step=step), default=str)
        if self.numbered:
            for old in self.checkpoints()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def read_state(checkpoint: Path) -> dict:
        return read_json(checkpoint / STATE_FILE)

    def restore(self, checkpoint: Path, module: nn.Module, optimizer: optim.Optimizer, *, prefix: str = "") -> dict:
        """Loads a checkpoint into `module` (names and shapes must match, once `prefix` is taken off) and
        `optimizer` (initialised for `module`, then given the saved state); returns its state.json."""
        path = checkpoint / self.weights_file
        weights = {k.removeprefix(prefix): v for k, v in read_safetensors(path).items()}
        check_weights(module, weights, str(path))
        module.load_weights(list(weights.items()), strict=True)
        optimizer.init(module.trainable_parameters())
        expected = dict(tree_flatten(optimizer.state))
        saved = read_safetensors(checkpoint / OPTIMIZER_FILE)
        if set(saved) != set(expected):
            raise ValueError(f"{checkpoint / OPTIMIZER_FILE}: optimizer state does not match the model "
                             f"(missing {sorted(set(expected) - set(saved))[:5]}, "
                             f"unexpected {sorted(set(saved) - set(expected))[:5]})")
        optimizer.state = tree_unflatten(list(saved.items()))
        optimizer.init(module.trainable_parameters())  # marks it initialised; keeps the restored entries
        mx.eval(module.parameters(), optimizer.state)
        return self.read_state(checkpoint)


# ----------------------------------------------------------------------------------------------------
# The log


class RunLog:
    """A run's log.jsonl: one JSON record a line, appended as the run goes.

    A fresh run (`resumed_at` None) starts it empty. A resumed one keeps the records up to the checkpoint's
    step: later ones belong to the interrupted attempt, whose steps are run, and logged, again. Disabled
    (the processes other than rank 0), it writes nothing.
    """

    def __init__(self, run_dir: Union[str, os.PathLike], resumed_at: Optional[int], enabled: bool = True):
        self.path, self.enabled = Path(run_dir) / LOG_NAME, enabled
        if not enabled:
            return
        if resumed_at is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if record.get("step", 0) <= resumed_at:
                    kept.append(line)
            write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_log(run_dir: Union[str, os.PathLike]) -> list[dict]:
    """The records of a run's log.jsonl."""
    path = Path(run_dir) / LOG_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class LossWindow:
    """Steps taken since a point (the last log record, say): their mean loss and images per second."""

    def __init__(self):
        self.loss, self.steps, self.images, self.seconds = 0.0, 0, 0, 0.0

    def add(self, loss: float, images: int = 0, seconds: float = 0.0) -> None:
        self.loss += loss
        self.steps += 1
        self.images += images
        self.seconds += seconds

    @property
    def mean_loss(self) -> float:
        return self.loss / self.steps

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)
