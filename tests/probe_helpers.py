"""Shared by test_inference.py and test_probe.py: tiny random-weight model folders and generated image
folders."""

from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image

from conftest import tiny_config
from mlx_aim.models.config import AIMConfig, AIMv2Config, Config
from mlx_aim.models.model import build_model
from mlx_aim.checkpoints.weights import save_model

COLOURS = {"blue": (20, 40, 200), "green": (30, 180, 40), "red": (200, 30, 30), "white": (230, 230, 230)}


def probe_config(num_classes: int = 1000) -> AIMConfig:
    """The tiny config these tests classify with: width 64, so that the trunk's linear layers can be quantized
    (group size 64)."""
    return tiny_config(depth=3, num_heads=2, num_classes=num_classes, name="tiny-test")


def native_config(num_classes: int = 1000) -> AIMv2Config:
    """`probe_config`'s trunk as a native-resolution AIMv2 (4-pixel patches, any image size; SwiGLU 128)."""
    return AIMv2Config(image_size=None, patch_size=4, width=64, depth=3, num_heads=2, hidden_dim=128,
                       num_classes=num_classes, probe_layers=[1, 2], name="tiny-native")


def make_model_folder(folder: Path, num_classes: int = 1000, seed: int = 0, with_head: bool = True,
                      config: Optional[Config] = None) -> Path:
    """A random-weight tiny model (`config`, default `probe_config`) saved as an MLX model folder: with a probe's
    head.* keys (`load` reads it as a probed classifier, as it reads a probe's model folder), or with `with_head`
    False without them (a trunk export, as every released AIMv2 checkpoint is)."""
    mx.random.seed(seed)
    model = build_model(config or probe_config(num_classes), probe=with_head)
    return save_model(folder, dict(tree_flatten(model.parameters())), model.config)


def save_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_colour_folder(root: Path, num_train: int = 12, num_val: int = 4, seed: int = 0) -> Path:
    """An easily separable task: one noisy solid colour per class, in root/train/<class> and root/val/<class>."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("val", num_val)):
        for name, colour in COLOURS.items():
            for i in range(count):
                h, w = rng.integers(16, 40, size=2)
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
                save_image(root / split / name / f"{i}.png", pixels)
    return root
