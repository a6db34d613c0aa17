"""AIMv2 checkpoints loaded and converted torch-free: our own MLX folders; the transformers layout (folders written by
transformers' `save_pretrained`), Apple's keys in `model.safetensors` and Apple's `mlx_model.safetensors`, each
matching transformers' `Aimv2VisionModel` and each other; hub names through an offline huggingface_hub cache."""

import json

import numpy as np
import pytest

import mlx.core as mx
import mlx_aim
from mlx.utils import tree_flatten
from conftest import rel_err
from mlx_aim.config import AIMv2Config
from mlx_aim.weights import save_model

TOL = 1e-5


def tiny_v2(**overrides) -> AIMv2Config:
    """A tiny AIMv2: 16-pixel images in 4x4-pixel patches (16 tokens), width 64, depth 3, SwiGLU 128."""
    fields = dict(image_size=16, patch_size=4, width=64, depth=3, num_heads=4, hidden_dim=128, num_classes=10,
                  probe_layers=[1, 2])
    return AIMv2Config(**{**fields, **overrides})


def random_images(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, height, width, 3)).astype(np.float32)


def trunk_output(model, images: np.ndarray) -> np.ndarray:
    return np.array(model.extract_features(mx.array(images))[0])


# ---------------------------------------------------------------------------------------------------
# Our own MLX folders


@pytest.mark.parametrize("config", [tiny_v2(), tiny_v2(image_size=None)], ids=["fixed", "native"])
def test_mlx_folder_round_trip(config, tmp_path):
    """A folder `save_model` writes ("model_type": "aimv2" + model.safetensors) loads back as the same model,
    with or without a trained probe head; `convert` rewrites it in bfloat16 and 4 bits."""
    model = mlx_aim.build_model(config, seed=1)
    trunk = {k: v for k, v in tree_flatten(model.parameters()) if not k.startswith("head.")}
    folder = save_model(tmp_path / "trunk", trunk, config)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "aimv2"
    assert "AIMv2" in (folder / "README.md").read_text()
    loaded = mlx_aim.load(folder)
    assert isinstance(loaded, mlx_aim.AIMv2) and loaded.config == config and not loaded.has_trained_head
    images = random_images(2, 16, 16 if config.image_size else 24)
    np.testing.assert_array_equal(trunk_output(loaded, images), trunk_output(model, images))
    with_head = save_model(tmp_path / "probed", dict(tree_flatten(model.parameters())), config)
    probed = mlx_aim.load(with_head)
    assert probed.has_trained_head
    np.testing.assert_array_equal(np.array(probed(mx.array(images))), np.array(model(mx.array(images))))
    half = mlx_aim.load(mlx_aim.convert(folder, tmp_path / "bf16", dtype="bfloat16"))
    assert half.dtype == mx.bfloat16 and half.config == config
    q4 = mlx_aim.load(mlx_aim.convert(folder, tmp_path / "q4", quantize=4))
    assert q4.config.quantization == {"bits": 4, "group_size": 64}
    assert type(q4.trunk.blocks[0].mlp.fc3).__name__ == "QuantizedLinear"
    assert rel_err(trunk_output(q4, images), trunk_output(model, images)) < 0.2
