"""What a pre-trained AIM predicts: each image next to its next-patch predictions, as a PNG grid.

The pixel head predicts normalised patches (zero mean, unit variance per patch), so a prediction is shown
un-normalised with the true patch's mean and standard deviation: the picture shows the structure the model
predicts, with the true patch's brightness and contrast. Patches inside the prefix (the first `prefix_len`,
by default only patch 0, which nothing predicts) are shown as they are.

    model, _ = load_pretraining_checkpoint("runs/tiny")      # needs the pixel head: a run or checkpoint folder
    save_prediction_grid(model, ["a.jpg", "b.png"], "grid.png")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import mlx.core as mx
import numpy as np
from PIL import Image, ImageDraw

from .data import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from .fileio import atomic_file
from .objective import patchify, unpatchify

_EPS = 1e-6  # the target normalisation's eps (norm_pix_target)
_GAP = 4  # pixels between cells
_HEADER = 16  # pixels of the column titles


def next_patch_predictions(model, images: mx.array, prefix_len: int = 1) -> mx.array:
    """(B, H, W, C) normalised images -> the same shape, every patch from index `prefix_len` on replaced by
    the model's prediction of it (from the patches before it), un-normalised with its true mean and std."""
    c = model.config
    B, H, W, C = images.shape
    grid = (H // c.patch_size, W // c.patch_size)
    num_patches = grid[0] * grid[1]
    if not 1 <= prefix_len < num_patches:
        raise ValueError(f"prefix_len={prefix_len}: expected a value in [1, {num_patches - 1}]")
    attention = "prefix" if c.attention == "bidirectional" else "causal"
    prefix = mx.full((B,), prefix_len, dtype=mx.int32)
    pred = model(images, prefix if attention == "prefix" else None, attention=attention).astype(mx.float32)
    patches = patchify(images.astype(mx.float32), c.patch_size)
    mean = patches.mean(axis=-1, keepdims=True)
    std = mx.sqrt(mx.var(patches, axis=-1, keepdims=True, ddof=1) + _EPS)
    # Output i predicts patch i + 1.
    predicted = mx.concatenate([patches[:, :1], pred[:, :-1] * std[:, 1:] + mean[:, 1:]], axis=1)
    keep = (mx.arange(num_patches) < prefix_len)[None, :, None]
    return unpatchify(mx.where(keep, patches, predicted), c.patch_size, grid, C)


def to_uint8(images: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Normalised float images -> uint8 pixels (undoing `(x - mean) / std`, clipping to [0, 255])."""
    pixels = np.asarray(images, dtype=np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return (np.clip(pixels, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def prediction_grid(model, images: np.ndarray, prefix_len: int = 1, cell: int = 128) -> np.ndarray:
    """uint8 RGB grid: one row per image, the input on the left and its next-patch predictions on the right,
    each scaled (nearest neighbour) to at least `cell` pixels high, under the column titles."""
    images = np.asarray(images, dtype=np.float32)
    predicted = np.concatenate([np.array(next_patch_predictions(model, mx.array(images[i : i + 16]), prefix_len))
                                for i in range(0, len(images), 16)])
    B, H, W, _ = images.shape
    scale = max(1, -(-cell // H))
    h, w = H * scale, W * scale
    canvas = np.full((_HEADER + B * (h + _GAP) + _GAP, 2 * w + 3 * _GAP, 3), 255, np.uint8)
    for row, pair in enumerate(zip(to_uint8(images), to_uint8(predicted))):
        top = _HEADER + _GAP + row * (h + _GAP)
        for col, picture in enumerate(pair):
            left = _GAP + col * (w + _GAP)
            canvas[top : top + h, left : left + w] = picture.repeat(scale, axis=0).repeat(scale, axis=1)
    out = Image.fromarray(canvas)
    draw = ImageDraw.Draw(out)
    draw.text((_GAP, 2), "input", fill=(0, 0, 0))
    title = "next-patch predictions" if prefix_len == 1 else f"predictions after a {prefix_len}-patch prefix"
    draw.text((2 * _GAP + w, 2), title, fill=(0, 0, 0))
    return np.asarray(out)


def save_prediction_grid(
    model,
    images: Sequence[Union[str, os.PathLike]],
    out: Union[str, os.PathLike],
    prefix_len: int = 1,
    cell: int = 128,
) -> Path:
    """Loads `images` with the evaluation transform at the model's resolution and writes the grid as a PNG
    (under a temporary name, then renamed)."""
    if not images:
        raise ValueError("save_prediction_grid: no images given")
    batch = np.stack([eval_transform(path, model.config.image_size) for path in images])
    grid = prediction_grid(model, batch, prefix_len, cell)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return out
