"""The AIM paper's two findings (arXiv 2401.08541, section 5), checked on a laptop: a grid of small pre-training runs.

    mlx-aim scaling               # the built-in shapes: capacities x data sizes x seeds, probes, verdicts, figure
    mlx-aim scaling --data DIR    # your own labelled image folder (class sub-folders, optional train/ and val/)

(or `python scripts/scaling.py`; the command line is `mlx_aim.cli.scaling`, which prints what `run_scaling` returns.)

1. Feature quality scales with model capacity and with the amount of pre-training data: the probe's top-1 rises
   along every line of the grid (capacity at each data size, data at each capacity).
2. The pre-training objective predicts downstream quality: over every checkpoint of every run, the held-out
   validation loss and the probe's top-1 have a Spearman rank correlation at or below `RHO_TARGET`.

And a control that says whether the two are about pre-training at all: the same probe on a random trunk of each
capacity (the paper's initialisation, as pre-training with each seed starts from it; the demo's baseline). A rise
with capacity that random trunks of the same sizes show as well is the architecture's and the probe's.

The grid (`run_scaling`) reuses the demo's pieces and recipe: the built-in synthetic shapes
(`mlx_aim.data.synthetic`), one pre-training recipe (`mlx_aim.training.pretrain.pretrain`) for every cell with the same step
budget, and the same attentive probe (`mlx_aim.training.probe.train_probe`) on every checkpoint. Only the trunk's width
and depth (`capacities`) and the number of distinct pre-training images (`data_fractions` of the training pool,
nested subsets drawn in one fixed order) change; every cell runs every seed in `seeds`. On a pool too small for the
fractions (their smallest set under one batch) the data sizes adapt to it (`grid_data_sizes`); `data_sizes` chooses
them outright. Either way they span at least `MIN_DATA_SPREAD` times, the smallest one batch or more.

Decisions made here (the measured figures are in docs/findings.md):
- Capacities are (width, depth) pairs of the demo's layout (8x8-pixel patches on 32 px images, 4 heads, a
  2-block pixel head as wide as the trunk). At 450 steps no pre-trained trunk beat its random initialisation, so
  the default budget is 1500 steps, where pre-training beats it in 8 of 9 cells, on three capacities (an 11x
  spread) cheap enough for the grid, two seeds, to fit 20 minutes on a 2-core CPU. More data reaches the probe
  only on a longer schedule: `LONG` (2000 steps, larger trunks, 24 minutes there), where 400 images beat 40 at
  every capacity.
- Each run keeps `checkpoints` evenly spaced checkpoints; every checkpoint's trunk is probed, on the whole training
  pool's labels, the top-1 measured on the held-out images. Its validation loss is measured on one draw of held-out
  images and prefix lengths for every run (`VAL_SEED`): each run's own log draws them from its seed, so its
  numbers do not compare across seeds.
- Data sizes adapted to a small pool run from one batch (the smallest set that trains on whole batches, and the
  widest spread) to the fractions' largest, the sizes between at the fractions' places on a log scale: a folder of
  1797 images (scikit-learn's digits: a pool of 1438) gets 32, 215 and 1438, where the fractions give 14, 144 and
  1438. The pool needs 8 batches at least (256 images at batch 32), so that the spread is 8x or more.
- A line "rises" when the mean over seeds strictly increases at every step along it; the spread over seeds
  (standard deviation and min-max) is reported beside every mean, and no noise margin is granted.
- Pre-training beats a random trunk in a cell when the cell's seeds all score above every seed of the random trunk
  of its capacity (the two min-max ranges do not overlap); the control holds when it does in every cell.
- Runs resume and are reused: each run folder's name carries a digest of the settings and data that decide its
  numbers; a finished pre-training run is not repeated, and each checkpoint's probe result and validation loss
  are cached beside it (keyed by the checkpoint's weights, the data and the recipe); so is each random trunk's probe
  result (keyed by the trunk's initial weights, the data and the recipe).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
from mlx.utils import tree_flatten
from PIL import Image

from .. import platforms
from ..backend import compute_threads
from ..models.config import AIMConfig, get_config
from ..data import ImageFolder, load_splits
from ..fileio import read_json, write_json
from ..models.model import build_model
from ..training.probe import ProbeConfig, train_probe, trunk_description
from ..training.runs import silent
from ..data.synthetic import write_image_folder
from ..checkpoints.run_folders import WEIGHTS_FILE, list_checkpoints
from ..training.pretrain import (
    TrainConfig, Validator, checkpoint_trunk, finished_pretraining, load_pretraining_checkpoint, pretrain,
)
from ..tasks.visualize import Series, compose_figure, draw_chart, save_png

RHO_TARGET = -0.8  # finding 2 holds when Spearman's rho (validation loss vs probe top-1) is at most this
DATA_ORDER_SEED = 0  # the fixed order in which training images enter the nested pre-training subsets
VAL_SEED = 0  # the one validation draw (images and prefix lengths) every checkpoint's validation loss uses
POINT_FORMAT = 1  # bump when a cached checkpoint result's contents change
MIN_DATA_SPREAD = 8  # the largest pre-training set at least this many times the smallest, adapted or chosen
RANDOM_TRUNKS_DIR = "random-trunks"  # in a grid's folder: each random trunk's cached probe result
RANDOM_TRUNK_COLOUR = (127, 127, 127)  # panel (a)'s dashed line of random trunks
# Pre-training these small trunks on 32 px images is as much augmentation (one loader thread's Pillow work) as
# matmul: one core for the loader, the others for MLX's BLAS and the native kernels. On the 2-core Xeon this ran
# w32-d2, w64-d2 and w96-d3 at 18, 24 and 45 ms a step, against 23, 36 and 50 ms with the same loader thread and
# both cores for compute, and 28, 29 and 48 ms with two loader threads and one compute thread. Neither changes
# which images and augmentations a run sees; BLAS sums can round differently with another thread count.
PRETRAIN_WORKERS = 1
PRETRAIN_COMPUTE_THREADS = max(1, platforms.probe_compute_threads() - PRETRAIN_WORKERS)


@dataclass(frozen=True)
class ScalingConfig:
    """Everything that decides the grid's numbers: data, capacities, the one pre-training recipe, the one probe."""

    # Data: the built-in synthetic shapes (ignored with a folder of the user's: its own classes and images).
    image_size: int = 32
    num_classes: int = 10
    num_train: int = 4000  # the training pool: the largest pre-training set, and the probe's training images
    num_val: int = 2000  # held-out images: the probe's top-1 on all, the validation loss on `val_images` of them
    data_fractions: tuple[float, ...] = (0.01, 0.1, 1.0)  # pre-training set sizes, as fractions of the pool
    # Capacities: (width, depth) of the trunk; the rest of the layout is shared.
    capacities: tuple[tuple[int, int], ...] = ((32, 2), (64, 2), (96, 3))
    patch_size: int = 8
    num_heads: int = 4
    head_depth: int = 2
    # Pre-training: the same recipe and step budget in every cell (the rest is `TrainConfig`'s).
    steps: int = 1500
    checkpoints: int = 3  # evenly spaced, the last at `steps`
    batch_size: int = 32
    lr: float = 2e-3
    warmup_frac: float = 0.05
    crop_scale: tuple[float, float] = (0.4, 1.0)
    hflip: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_prob: float = 0.8
    val_images: int = 1000
    seeds: tuple[int, ...] = (0, 1)
    # The attentive probe, the same on every checkpoint (the rest is `ProbeConfig`'s).
    probe_epochs: int = 30
    probe_batch_size: int = 128
    probe_lr: float = 1e-2

    def __post_init__(self):
        if len(self.capacities) < 2 or len(self.data_fractions) < 2:
            raise ValueError("scaling config: expected at least two capacities and two data sizes")
        if sorted(set(self.data_fractions)) != list(self.data_fractions) or not 0 < self.data_fractions[0] \
                or self.data_fractions[-1] > 1:
            raise ValueError(f"scaling config data_fractions={self.data_fractions}: expected increasing fractions "
                             "in (0, 1]")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"scaling config seeds={self.seeds}: expected distinct integers >= 0")
        if self.checkpoints < 1 or self.steps % self.checkpoints:
            raise ValueError(f"scaling config: steps={self.steps} must be a multiple of checkpoints={self.checkpoints}")

    def model_config(self, width: int, depth: int, num_classes: int) -> AIMConfig:
        return get_config(
            "aim-tiny", probe_layers="last", image_size=self.image_size, patch_size=self.patch_size, width=width,
            depth=depth, num_heads=self.num_heads, head_width=width, head_depth=self.head_depth,
            num_classes=num_classes,
        ).replace(name=f"aim-w{width}-d{depth}")

    def train_config(self, seed: int) -> TrainConfig:
        interval = self.steps // self.checkpoints
        return TrainConfig(
            steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup_frac=self.warmup_frac,
            crop_scale=self.crop_scale, hflip=self.hflip, color_jitter=self.color_jitter, jitter_prob=self.jitter_prob,
            seed=seed, val_images=self.val_images, log_interval=10, val_interval=interval, ckpt_interval=interval,
            keep_last=self.checkpoints, num_workers=PRETRAIN_WORKERS,
        )

    def probe_config(self, seed: int) -> ProbeConfig:
        return ProbeConfig(epochs=self.probe_epochs, batch_size=self.probe_batch_size, lr=self.probe_lr, seed=seed,
                           eval_batch_size=256, cache="memory")

    def replace(self, **changes) -> "ScalingConfig":
        return dataclasses.replace(self, **changes)


DEFAULT = ScalingConfig()
# A longer budget with larger trunks: 2000 steps (a third more) on the demo's w64-d4 and a w128-d4 (a 26x spread),
# checkpoints every 500 steps; 24 minutes on the 2-core Xeon, where the default takes 18.
LONG = DEFAULT.replace(capacities=((32, 2), (64, 4), (128, 4)), steps=2000, checkpoints=4)
# The same grid's shape on a tiny budget, for tests and CI: seconds a run; the numbers are not meaningful.
QUICK = ScalingConfig(
    image_size=16, num_classes=4, num_train=64, num_val=32, data_fractions=(0.25, 1.0),
    capacities=((16, 1), (32, 2)), patch_size=4, num_heads=2, head_depth=1, steps=4, checkpoints=2,
    batch_size=16, val_images=32, seeds=(0, 1), probe_epochs=2, probe_batch_size=32,
)
PRESETS = {"default": DEFAULT, "long": LONG, "quick": QUICK}  # a grid's folder is named by its preset


# ---------------------------------------------------------------------------------------------------
# The findings' arithmetic: ranks, Spearman's rho, monotonic lines, verdicts


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of `values` in increasing order, tied values sharing the mean of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start + 1
        while end < len(values) and sorted_values[end] == sorted_values[start]:
            end += 1
        ranks[order[start:end]] = (start + 1 + end) / 2  # the mean of ranks start+1 .. end
        start = end
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of paired values: Pearson's correlation of their average ranks (ties
    averaged). NaN when fewer than two pairs, or when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values, {len(y)} y values")
    if len(x) < 2:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def rising_line(labels: Sequence[str], values: Sequence[float]) -> dict:
    """Whether `values` (in the order of `labels`) strictly rise; each step that does not is an exception."""
    exceptions = [{"from": labels[i], "to": labels[i + 1], "before": values[i], "after": values[i + 1]}
                  for i in range(len(values) - 1) if not values[i + 1] > values[i]]
    return {"labels": list(labels), "values": list(values), "rises": not exceptions, "exceptions": exceptions}


def scaling_finding(top1: np.ndarray, capacity_names: Sequence[str], data_sizes: Sequence[int]) -> dict:
    """Finding 1 from the mean top-1 of each cell, `top1[capacity, data size]` (capacities by parameter count,
    data sizes increasing): one line along capacity per data size, one along data per capacity; it holds when
    every line rises."""
    top1 = np.asarray(top1, dtype=np.float64)
    sizes = [f"{n} images" for n in data_sizes]
    lines = ([dict(rising_line(capacity_names, list(top1[:, j])), axis="capacity", at=sizes[j])
              for j in range(top1.shape[1])]
             + [dict(rising_line(sizes, list(top1[i, :])), axis="data", at=capacity_names[i])
                for i in range(top1.shape[0])])
    return {"holds": all(line["rises"] for line in lines), "lines": lines}


def loss_finding(val_loss: Sequence[float], top1: Sequence[float], target: float = RHO_TARGET) -> dict:
    """Finding 2 from every checkpoint's (validation loss, probe top-1): Spearman's rho, and whether it is at most
    `target` (lower loss, higher accuracy)."""
    rho = spearman(val_loss, top1)
    return {"holds": bool(np.isfinite(rho) and rho <= target), "spearman_rho": rho, "target": target,
            "num_checkpoints": len(top1)}


def pretraining_finding(cells: Sequence[dict], random_trunks: dict) -> dict:
    """The control: whether each cell's pre-trained trunks probe better than random trunks of their capacity.
    `cells` as `summarize_cells` gives them, `random_trunks` the same statistics per capacity name (`top1_mean`,
    `top1_min`, `top1_max`). A cell's gain is "clear" when its lowest seed beats the random trunk's highest (the
    ranges over seeds do not overlap); the control holds when every cell's gain is clear."""
    gains = []
    for c in cells:
        random = random_trunks[c["capacity"]]
        gains.append({"capacity": c["capacity"], "data_size": c["data_size"], "pretrained": c["top1_mean"],
                      "random": random["top1_mean"], "gain": c["top1_mean"] - random["top1_mean"],
                      "clear": bool(c["top1_min"] > random["top1_max"]),
                      "overlap": bool(c["top1_min"] <= random["top1_max"] and random["top1_min"] <= c["top1_max"])})
    capacities = list(dict.fromkeys(c["capacity"] for c in cells))
    return {"holds": all(g["clear"] for g in gains), "any_clear": any(g["clear"] for g in gains), "cells": gains,
            "random_top1": {name: random_trunks[name]["top1_mean"] for name in capacities}}


def verdict_lines(findings: dict) -> list[str]:
    """The verdicts in words, with their numbers: each line of finding 1 and its exceptions, then rho; then, where
    `findings` has it, the control against random trunks with each cell's gain. When every line along capacity
    rises but no cell clearly beats its random trunk, finding 1 says the rise is not pre-training's."""
    scaling, loss = findings["scaling"], findings["loss_predicts_accuracy"]
    control = findings.get("pretraining")
    lines = [f"Finding 1 (feature quality scales with capacity and data): "
             f"{'holds' if scaling['holds'] else 'does not hold'} at this scale"]
    capacity_lines = [line for line in scaling["lines"] if line["axis"] == "capacity"]
    for line in scaling["lines"]:
        values = " -> ".join(f"{100 * v:.1f}%" for v in line["values"])
        what = f"  along {line['axis']} at {line['at']}: {values}"
        if line["rises"]:
            lines.append(f"{what}: rises")
        else:
            drops = "; ".join(f"{e['from']} -> {e['to']}: {100 * e['before']:.1f}% -> {100 * e['after']:.1f}%"
                              for e in line["exceptions"])
            lines.append(f"{what}: exception ({drops})")
        if line is capacity_lines[-1] and control and not control["any_clear"] \
                and all(c["rises"] for c in capacity_lines):
            randoms = " -> ".join(f"{100 * v:.1f}%" for v in control["random_top1"].values())
            lines.append(f"  along capacity: holds, but random trunks of the same sizes score as well ({randoms}): "
                         "the gain is the architecture's, not pre-training's")
    rho = loss["spearman_rho"]
    verdict = "holds" if loss["holds"] else "does not hold"
    lines.append(f"Finding 2 (lower validation loss, higher probe top-1): {verdict} at this scale: Spearman rho "
                 f"{rho:.3f} over {loss['num_checkpoints']} checkpoints (target <= {loss['target']})")
    if control:
        clear = sum(g["clear"] for g in control["cells"])
        lines.append(f"Pre-training beats a random trunk of the same size: "
                     f"{'holds' if control['holds'] else 'does not hold'} at this scale: {clear} of "
                     f"{len(control['cells'])} cells beyond the seeds' spread (pre-trained mean - random mean)")
        for g in control["cells"]:
            spread = ("within the seeds' spread" if g["overlap"] else "beyond the seeds' spread" if g["clear"]
                      else "a loss beyond the seeds' spread")
            lines.append(f"  {g['capacity']}, {g['data_size']} images: {100 * g['pretrained']:.1f}% vs "
                         f"{100 * g['random']:.1f}%: {100 * g['gain']:+.1f} points, {spread}")
    return lines


# ---------------------------------------------------------------------------------------------------
# The data


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class GridData:
    """The grid's images: the training pool in its fixed order (the nested pre-training subsets are its first
    n; the probe trains on all of it), the held-out images, and what identifies them."""

    pool: ImageFolder
    val: ImageFolder
    description: str
    identity: dict
    held_out: float = 0.0  # the share of the folder held out for validation (0: it has its own val/ images)

    def subset(self, n: int) -> list:
        return self.pool.samples[:n]

    def sizes(self, fractions: Sequence[float]) -> list[int]:
        return fraction_sizes(fractions, len(self.pool))


def fraction_sizes(fractions: Sequence[float], pool_size: int) -> list[int]:
    return [max(1, int(round(f * pool_size))) for f in fractions]


class TooFewImages(ValueError):
    """A training pool too small for the grid's data sizes, adapted or not; `needed` is the fewest images that do."""

    def __init__(self, message: str, needed: int):
        super().__init__(message)
        self.needed = needed


def check_data_sizes(sizes: Sequence[int], *, batch_size: Optional[int] = None,
                     pool_size: Optional[int] = None) -> tuple[int, ...]:
    """`sizes` as the grid's pre-training set sizes, or a ValueError that says what is wrong with them: at least two,
    increasing, the largest at least `MIN_DATA_SPREAD` times the smallest; with `batch_size`, the smallest holding
    one batch; with `pool_size`, the largest within the training pool."""
    sizes = tuple(int(n) for n in sizes)
    what = f"data sizes {','.join(map(str, sizes))}"
    if len(sizes) < 2:
        raise ValueError(f"{what}: expected at least two")
    if sizes[0] < 1 or any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"{what}: expected increasing numbers of images, the smallest at least 1")
    if sizes[-1] < MIN_DATA_SPREAD * sizes[0]:
        raise ValueError(f"{what}: the largest is {sizes[-1] / sizes[0]:.3g}x the smallest; expected at least "
                         f"{MIN_DATA_SPREAD}x (the smallest at most {sizes[-1] // MIN_DATA_SPREAD})")
    if batch_size is not None and sizes[0] < batch_size:
        raise ValueError(f"{what}: the smallest, {sizes[0]} images, is less than one batch ({batch_size} images)")
    if pool_size is not None and sizes[-1] > pool_size:
        raise TooFewImages(f"{what}: the largest, {sizes[-1]} images, is more than the training pool holds "
                           f"({pool_size} images)", sizes[-1])
    return sizes


def smallest_folder(pool_size: int, held_out: float) -> int:
    """The fewest images a folder needs for a training pool of `pool_size` once `held_out` of them are held out
    (`data.split_image_folder` rounds per class, so a folder of several classes may need a few more)."""
    n = pool_size
    while n - int(round(n * held_out)) < pool_size:
        n += 1
    return n


def _unchosen_sizes(cfg: ScalingConfig, pool_size: int) -> Optional[tuple[list[int], str]]:
    """`grid_data_sizes` without a choice; None where the pool is too small."""
    sizes = fraction_sizes(cfg.data_fractions, pool_size)
    if sizes[0] >= cfg.batch_size and all(b > a for a, b in zip(sizes, sizes[1:])):
        return sizes, "fractions"
    smallest, largest, fractions = cfg.batch_size, sizes[-1], cfg.data_fractions
    if largest < MIN_DATA_SPREAD * smallest:
        return None
    places = [math.log(f / fractions[0]) / math.log(fractions[-1] / fractions[0]) for f in fractions]
    adapted = [int(round(smallest * (largest / smallest) ** u)) for u in places]
    return (adapted, "adapted") if all(b > a for a, b in zip(adapted, adapted[1:])) else None


def grid_data_sizes(cfg: ScalingConfig, pool_size: int, chosen: Optional[Sequence[int]] = None, *,
                    held_out: float = 0.0) -> tuple[list[int], str]:
    """The grid's pre-training set sizes on a training pool of `pool_size` images, and where they come from:
    "chosen" (`chosen`, checked by `check_data_sizes`), "fractions" (`cfg.data_fractions` of the pool, where their
    smallest holds a batch) or "adapted" (a pool too small for the fractions: from one batch to the fractions'
    largest size, at least `MIN_DATA_SPREAD` times as many, the sizes between at the fractions' places on a log
    scale). A pool too small for either raises `TooFewImages`, which names the smallest pool that works and, where
    `held_out` of the folder is held out, the smallest folder."""
    if chosen is not None:
        return list(check_data_sizes(chosen, batch_size=cfg.batch_size, pool_size=pool_size)), "chosen"
    found = _unchosen_sizes(cfg, pool_size)
    if found is not None:
        return found
    needed = next(n for n in itertools.count(pool_size + 1) if _unchosen_sizes(cfg, n) is not None)
    folder = (f"a folder of at least {smallest_folder(needed, held_out)} images ({held_out:.0%} of them are held out)"
              if held_out else f"at least {needed} training images")
    raise TooFewImages(f"a training pool of {pool_size} images is too small for the grid: its smallest pre-training "
                       f"set must hold one batch ({cfg.batch_size} images) and, adapted to a small pool, its largest "
                       f"{MIN_DATA_SPREAD} times as many, so it takes a pool of at least {needed} images: use {folder}",
                       needed)


def grid_folder_name(cfg: ScalingConfig, identity: dict, pool_size: int, sizes: Sequence[int]) -> str:
    """The grid's folder: its preset's name and a digest of the settings and data that decide its numbers. Data sizes
    other than the fractions' (adapted or chosen) are among them; grids of the fractions' sizes keep their names."""
    key = {"config": dataclasses.asdict(cfg), "data": identity}
    if list(sizes) != fraction_sizes(cfg.data_fractions, pool_size):
        key["data_sizes"] = list(sizes)
    return preset_name(cfg) + "-" + _digest(key)


def preset_name(cfg: ScalingConfig) -> str:
    return next((name for name, preset in PRESETS.items() if preset == cfg), "custom")


def grid_data(cfg: ScalingConfig, out: Path, data: Optional[Union[str, os.PathLike]] = None,
              val_ratio: float = 0.2) -> GridData:
    """The built-in shapes (drawn once under `out/data`) or the user's labelled folder `data` (`load_splits`:
    class sub-folders, or train/ and val/ of them; without val/ a `val_ratio` seeded split)."""
    if data is None:
        name = f"shapes-{cfg.image_size}px-{cfg.num_classes}cls-{cfg.num_train}-{cfg.num_val}"
        root = out / "data" / name
        write_image_folder(root, cfg.num_train, cfg.num_val, cfg.image_size, DATA_ORDER_SEED, cfg.num_classes)
        description = (f"built-in shapes: {cfg.num_classes} classes, {cfg.num_train} training and {cfg.num_val} "
                       f"held-out {cfg.image_size}x{cfg.image_size} images")
    else:
        root = Path(data)
        description = str(root)
    held_out = 0.0 if (root / "train").is_dir() and (root / "val").is_dir() else val_ratio  # `load_splits`' rule
    train, val = load_splits(root, val_ratio=val_ratio, seed=DATA_ORDER_SEED)
    if val is None or not len(val):
        raise ValueError(f"{root}: no held-out images (a val/ folder, or enough images to hold some out)")
    order = np.random.default_rng(DATA_ORDER_SEED).permutation(len(train))
    pool = train.subset([int(i) for i in order])
    # Which images, in which order, named relative to the folder: a grid's folder can move with its data.
    identity = {"root": root.name if data is None else str(root.resolve()), "classes": list(train.classes),
                "num_train": len(train), "num_val": len(val),
                "pool": _digest([str(Path(p).relative_to(root)) for p, _ in pool.samples]),
                "val": _digest([str(Path(p).relative_to(root)) for p, _ in val.samples])}
    return GridData(pool, val, description, identity, held_out)


# ---------------------------------------------------------------------------------------------------
# The grid


def parameter_count(model_config: AIMConfig) -> int:
    """The trunk's parameters (patch embedding and blocks; not the pixel head nor the probe)."""
    model = build_model(model_config)
    return sum(v.size for k, v in tree_flatten(model.parameters()) if k.startswith(("preprocessor.", "trunk.")))


def capacity_name(width: int, depth: int) -> str:
    return f"w{width}-d{depth}"


def cached(path: Path, key: dict, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """(`compute()`, False), written to `path` with `key`; or (what `path` holds, True) when written with this key."""
    key = json.loads(json.dumps(key))  # as read back: lists, not tuples
    if path.is_file():
        found = read_json(path)
        if found.get("key") == key:
            return found["point"], True
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"key": key, "point": value})
    return value, False


def validation_loss(checkpoint: Path, val: ImageFolder, cfg: ScalingConfig) -> float:
    """The checkpoint's next-patch loss on held-out images: the validation of `train.Validator` with the seed
    `VAL_SEED` in every run (the same images, each with the same prefix length), so the numbers compare across
    seeds, where each run's own log draws its validation from its seed."""
    model, _ = load_pretraining_checkpoint(checkpoint)
    return Validator(model, val.samples, cfg.train_config(VAL_SEED))()


def checkpoint_point(checkpoint: Path, data: GridData, cfg: ScalingConfig, seed: int, cache_dir: Path, progress: bool,
                     echo: Callable) -> dict:
    """One checkpoint's held-out validation loss and the probe's held-out top-1, each cached in `cache_dir`
    (reused when computed from the same checkpoint weights, data and recipe)."""
    step = int(read_json(checkpoint / "state.json")["step"])
    common = {"format": POINT_FORMAT, "weights_sha256": _file_sha256(checkpoint / WEIGHTS_FILE), "data": data.identity}
    probe_config = cfg.probe_config(seed)

    def probe() -> dict:
        trunk_model = checkpoint_trunk(checkpoint)
        result = train_probe(trunk_model, (data.pool, data.val), None, probe_config,
                             trunk=trunk_description(trunk_model, str(checkpoint)), progress=progress, echo=echo)
        val = result.metrics["val"]
        return {"top1": val["top1"], "top5": val["top5"], "num_val": val["num_images"],
                "probe_s": round(result.seconds, 1)}

    def validate() -> dict:
        return {"val_loss": validation_loss(checkpoint, data.val, cfg)}

    probed, probe_reused = cached(cache_dir / f"{checkpoint.name}.json", dict(common, probe=probe_config.recipe()),
                                  probe)
    validated, val_reused = cached(cache_dir / f"{checkpoint.name}.val.json",
                                   dict(common, validation={"seed": VAL_SEED, "val_images": cfg.val_images}), validate)
    return {"step": step, "val_loss": validated["val_loss"], "top1": probed["top1"], "top5": probed["top5"],
            "num_val": probed["num_val"], "probe_s": probed["probe_s"], "reused": probe_reused and val_reused}


def trunk_sha256(model) -> str:
    """A digest of a model's preprocessor and trunk weights (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for name, value in sorted(tree_flatten(model.parameters())):
        if name.startswith(("preprocessor.", "trunk.")):
            array = np.array(value)
            digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def random_trunk_point(cfg: ScalingConfig, data: GridData, width: int, depth: int, seed: int, cache_dir: Path, *,
                       progress: bool, echo: Callable) -> dict:
    """The grid's probe, with `seed`, on the trunk pre-training with `seed` starts from (`build_model(config,
    seed=seed)`: the paper's initialisation, the demo's random baseline), never trained; cached in `cache_dir`
    (reused when the initial weights, data and recipe are the same)."""
    name = capacity_name(width, depth)
    model = build_model(cfg.model_config(width, depth, len(data.pool.classes)), seed=seed)
    probe_config = cfg.probe_config(seed)
    key = {"format": POINT_FORMAT, "init_seed": seed, "weights_sha256": trunk_sha256(model), "data": data.identity,
           "probe": probe_config.recipe()}

    def probe() -> dict:
        echo(f"  probe on a random {name} trunk, seed {seed}")
        result = train_probe(model, (data.pool, data.val), None, probe_config,
                             trunk=trunk_description(model, f"pre-training initialisation (seed {seed})",
                                                     random_init=True, seed=seed),
                             progress=progress, echo=echo)
        val = result.metrics["val"]
        return {"top1": val["top1"], "top5": val["top5"], "num_val": val["num_images"],
                "probe_s": round(result.seconds, 1)}

    point, reused = cached(cache_dir / f"{name}-seed{seed}.json", key, probe)
    return dict(point, seed=seed, reused=reused)


def top1_statistics(top1: Sequence[float]) -> dict:
    """Top-1 over seeds: each seed's, mean, standard deviation, min and max."""
    top1 = np.array(top1, np.float64)
    return {"top1_seeds": top1.tolist(), "top1_mean": float(top1.mean()), "top1_std": float(top1.std()),
            "top1_min": float(top1.min()), "top1_max": float(top1.max())}


def run_cell(cfg: ScalingConfig, data: GridData, width: int, depth: int, size: int, seed: int, runs_dir: Path, *,
             progress: bool, echo: Callable) -> dict:
    """One run of the grid: pre-trains (or resumes, or reuses) a trunk on the first `size` pool images, then
    probes each of its checkpoints."""
    model_config = cfg.model_config(width, depth, len(data.pool.classes))
    train_config = cfg.train_config(seed)
    run_dir = runs_dir / f"{capacity_name(width, depth)}-n{size}-seed{seed}"
    pre_dir = run_dir / "pretrain"
    tick = time.perf_counter()
    summary = finished_pretraining(pre_dir, model_config, train_config)
    reused = summary is not None
    if reused:
        echo(f"  reusing the finished pre-training run in {pre_dir}")
    else:
        with compute_threads(PRETRAIN_COMPUTE_THREADS):
            pretrain(model_config, train_config, (data.subset(size), data.val.samples), pre_dir, resume=True,
                     progress=progress, echo=echo)
    pretrain_s = time.perf_counter() - tick
    tick = time.perf_counter()
    checkpoints = list_checkpoints(pre_dir)
    if len(checkpoints) != cfg.checkpoints:
        raise RuntimeError(f"{pre_dir}: {len(checkpoints)} checkpoints, expected {cfg.checkpoints}")
    points = [checkpoint_point(ckpt, data, cfg, seed, run_dir / "points", progress, echo) for ckpt in checkpoints]
    for point in points:
        point["fraction"] = point["step"] / cfg.steps
    return {"capacity": capacity_name(width, depth), "width": width, "depth": depth, "data_size": size, "seed": seed,
            "run_dir": str(run_dir), "pretraining_reused": reused, "pretrain_s": round(pretrain_s, 1),
            "probe_s": round(time.perf_counter() - tick, 1), "checkpoints": points}


def summarize_cells(runs: list[dict], capacities: list[dict], data_sizes: list[int]) -> list[dict]:
    """One entry per (capacity, data size): the final checkpoints' top-1 and validation loss over seeds (mean,
    standard deviation, min, max)."""
    cells = []
    for capacity in capacities:
        for size in data_sizes:
            finals = [r["checkpoints"][-1] for r in runs
                      if r["capacity"] == capacity["name"] and r["data_size"] == size]
            loss = np.array([p["val_loss"] for p in finals], np.float64)
            cells.append({"capacity": capacity["name"], "parameters": capacity["parameters"], "data_size": size,
                          "seeds": len(finals), **top1_statistics([p["top1"] for p in finals]),
                          "val_loss_mean": float(loss.mean()), "val_loss_std": float(loss.std())})
    return cells


def scaling_figure(result: dict) -> Image.Image:
    """The three panels: (a) top-1 vs parameters, a line per data size and a dashed one of random trunks; (b) top-1
    vs data size, a line per capacity; (c) validation loss vs top-1 over every checkpoint, with Spearman's rho."""
    cells, capacities, sizes = result["cells"], result["capacities"], result["data_sizes"]

    def cell(name, size):
        return next(c for c in cells if c["capacity"] == name and c["data_size"] == size)

    def series(c_list, x_of, label):
        return Series(label, [(x_of(c), 100 * c["top1_mean"]) for c in c_list],
                      [(100 * c["top1_min"], 100 * c["top1_max"]) for c in c_list])

    by_size = [series([cell(cap["name"], n) for cap in capacities], lambda c: c["parameters"], f"{n} images")
               for n in sizes]
    by_size.append(Series("random trunk (no pre-training)",
                          [(cap["parameters"], 100 * cap["random_trunk"]["top1_mean"]) for cap in capacities],
                          [(100 * cap["random_trunk"]["top1_min"], 100 * cap["random_trunk"]["top1_max"])
                           for cap in capacities], colour=RANDOM_TRUNK_COLOUR, dashed=True))
    by_capacity = [series([cell(cap["name"], n) for n in sizes], lambda c: c["data_size"],
                          f"{cap['name']} ({_compact(cap['parameters'])} parameters)") for cap in capacities]
    seeds = len(result["seeds"])
    spread = "mean over seeds, bars min-max" if seeds > 1 else "one seed"
    panel_a = draw_chart(by_size, title="(a) probe top-1 vs parameters", x_label=f"trunk parameters ({spread})",
                         y_label="top-1 %", log_x=True,
                         x_ticks=[(cap["parameters"], _compact(cap["parameters"])) for cap in capacities])
    panel_b = draw_chart(by_capacity, title="(b) probe top-1 vs pre-training data",
                         x_label=f"distinct pre-training images ({spread})", y_label="top-1 %", log_x=True,
                         x_ticks=[(n, str(n)) for n in sizes])
    points = [Series(cap["name"], [(p["val_loss"], 100 * p["top1"]) for r in result["runs"]
                                   if r["capacity"] == cap["name"] for p in r["checkpoints"]])
              for cap in capacities]
    loss = result["findings"]["loss_predicts_accuracy"]
    panel_c = draw_chart(points, title="(c) validation loss vs probe top-1", x_label="held-out validation loss",
                         y_label="top-1 %", connect=False,
                         note=f"Spearman rho = {loss['spearman_rho']:.3f} ({loss['num_checkpoints']} checkpoints)")
    caption = (f"{result['data']}; {result['steps']} steps of {result['batch_size']} images per run, "
               f"seeds {', '.join(map(str, result['seeds']))}")
    return compose_figure([panel_a, panel_b, panel_c], caption)


def _compact(n: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def run_scaling(
    out: Union[str, os.PathLike] = "mlx_aim_scaling",
    *,
    data: Optional[Union[str, os.PathLike]] = None,
    quick: bool = False,
    long: bool = False,
    config: Optional[ScalingConfig] = None,
    data_sizes: Optional[Sequence[int]] = None,
    force: bool = False,
    progress: bool = True,
    echo: Optional[Callable[[str], None]] = None,
) -> dict:
    """Runs the grid under `out`; returns its figures (what `--json` prints) and writes `scaling.json` and
    `scaling.png` in its folder.

    `data`: a labelled image folder of the user's instead of the built-in shapes. `quick` uses `QUICK` (a tiny
    budget for tests) instead of `DEFAULT`, `long` uses `LONG`, `config` any other `ScalingConfig`. `data_sizes`: the
    pre-training set sizes, increasing, at least `MIN_DATA_SPREAD` times apart, the smallest one batch or more
    (default: the config's fractions of the training pool, or sizes adapted to a pool too small for them:
    `grid_data_sizes`). `force` discards this grid's earlier runs (the image folder is kept). `echo` receives a line
    per stage; by default they go nowhere.
    """
    echo = echo or silent
    start_time = time.perf_counter()
    if quick and long:
        raise ValueError("run_scaling: quick and long are two different grids; choose one")
    cfg = config if config is not None else QUICK if quick else LONG if long else DEFAULT
    if data_sizes is not None:  # what needs no images, checked before any is drawn or read
        data_sizes = check_data_sizes(data_sizes, batch_size=cfg.batch_size)
    out = Path(out)
    grid = grid_data(cfg, out, data)
    try:
        sizes, sizes_from = grid_data_sizes(cfg, len(grid.pool), data_sizes, held_out=grid.held_out)
    except TooFewImages as error:
        raise TooFewImages(f"{grid.description}: {error}", error.needed) from None
    settings = dataclasses.asdict(cfg)
    preset = preset_name(cfg)
    runs_dir = out / grid_folder_name(cfg, grid.identity, len(grid.pool), sizes)
    if force and runs_dir.exists():
        shutil.rmtree(runs_dir)
    capacities = sorted(({"name": capacity_name(w, d), "width": w, "depth": d,
                          "parameters": parameter_count(cfg.model_config(w, d, len(grid.pool.classes)))}
                         for w, d in cfg.capacities), key=lambda c: c["parameters"])
    total = len(capacities) * len(sizes) * len(cfg.seeds)
    how = {"fractions": "", "chosen": " (chosen)",
           "adapted": f" (adapted to the pool of {len(grid.pool)}, too small for the data fractions "
                      f"{', '.join(f'{f:g}' for f in cfg.data_fractions)})"}[sizes_from]
    echo(f"{grid.description}; pre-training sets of {', '.join(map(str, sizes))} images{how}; capacities "
         f"{', '.join(c['name'] + ' (' + _compact(c['parameters']) + ')' for c in capacities)}; seeds "
         f"{', '.join(map(str, cfg.seeds))}: {total} runs of {cfg.steps} steps of {cfg.batch_size} images, "
         f"{cfg.checkpoints} checkpoints each -> {runs_dir}")
    runs = []
    for seed in cfg.seeds:
        for size in sizes:
            for capacity in capacities:
                echo(f"[{len(runs) + 1}/{total}] {capacity['name']}, {size} images, seed {seed}")
                runs.append(run_cell(cfg, grid, capacity["width"], capacity["depth"], size, seed, runs_dir,
                                     progress=progress, echo=echo))
    echo(f"random trunks: the same probe on each capacity's initialisation, seeds {', '.join(map(str, cfg.seeds))}")
    tick = time.perf_counter()
    for capacity in capacities:
        random_points = [random_trunk_point(cfg, grid, capacity["width"], capacity["depth"], seed,
                                            runs_dir / RANDOM_TRUNKS_DIR, progress=progress, echo=echo)
                         for seed in cfg.seeds]
        capacity["random_trunk"] = dict(top1_statistics([p["top1"] for p in random_points]), seeds=random_points)
    random_s = time.perf_counter() - tick
    cells = summarize_cells(runs, capacities, sizes)
    top1 = np.array([[next(c["top1_mean"] for c in cells if c["capacity"] == cap["name"] and c["data_size"] == n)
                      for n in sizes] for cap in capacities])
    points = [p for r in runs for p in r["checkpoints"]]
    findings = {
        "scaling": scaling_finding(top1, [c["name"] for c in capacities], sizes),
        "loss_predicts_accuracy": loss_finding([p["val_loss"] for p in points], [p["top1"] for p in points]),
        "pretraining": pretraining_finding(cells, {c["name"]: c["random_trunk"] for c in capacities}),
    }
    result = {
        "quick": quick,
        "preset": preset,
        "data": grid.description,
        "num_classes": len(grid.pool.classes),
        "probe_train": len(grid.pool),
        "num_val": len(grid.val),
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "checkpoint_steps": [cfg.steps // cfg.checkpoints * (k + 1) for k in range(cfg.checkpoints)],
        "seeds": list(cfg.seeds),
        "capacities": capacities,
        "data_sizes": sizes,
        "data_sizes_from": sizes_from,
        "runs": runs,
        "random_trunks_s": round(random_s, 1),
        "cells": cells,
        "findings": findings,
        "verdicts": verdict_lines(findings),
        "config": settings,
        "run_dir": str(runs_dir),
    }
    result["figure"] = str(save_png(scaling_figure(result), runs_dir / "scaling.png"))
    result["seconds"] = round(time.perf_counter() - start_time, 1)
    write_json(runs_dir / "scaling.json", result)
    return result
