"""AIMv2: parity with transformers' `Aimv2VisionModel` (an implementation written elsewhere) stage by stage, at full
size and on tiny configs, on both backend paths; the config and its 16 presets; the `extract_features` contract;
dtypes and quantization; the image-size rules of fixed-size and native-resolution models."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers.models.aimv2.modeling_aimv2 import build_2d_sinusoidal_position_embedding

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from aimv2_reference import load_reference_weights, make_reference, reference_stages, state_dict_numpy
from conftest import TWIN_TOLERANCE, dequantized_twin, rel_err
from mlx_aim.backend import cpu_workarounds
from mlx_aim.models.config import AIMV2_PRESET_NAMES, PRESET_NAMES, AIMConfig, AIMv2Config, config_from_dict, get_config
from mlx_aim.models.layers import sincos_pos_embed
from mlx_aim.models.model import (
    AIMv2, ProbedAIMv2, UntrainedHeadError, build_model, build_probe, is_quantized, parse_quantize, quantize_predicate,
    with_probe,
)

TOL = 1e-5


def tiny_v2(**overrides) -> AIMv2Config:
    """A tiny AIMv2: 16-pixel images in 4x4-pixel patches (16 tokens), width 64, depth 4, SwiGLU 128, 10 classes."""
    fields = dict(image_size=16, patch_size=4, width=64, depth=4, num_heads=4, hidden_dim=128, num_classes=10,
                  probe_layers=[1, 2])
    return AIMv2Config(**{**fields, **overrides})


def tiny_native(**overrides) -> AIMv2Config:
    return tiny_v2(image_size=None, **overrides)


def make_pair(config: AIMv2Config, seed: int = 0):
    """transformers' reference with random weights, and our model holding the same weights (Apple's keys)."""
    ref = make_reference(config, seed)
    return ref, load_reference_weights(build_model(config), state_dict_numpy(ref))


def our_stages(model: AIMv2, images: np.ndarray) -> dict[str, mx.array]:
    normed, features = model.extract_features(mx.array(images))
    out = {"embedding": model.preprocessor(mx.array(images)), "trunk": normed}
    out.update({f"block_{i}": f for i, f in enumerate(features)})
    return out


def stage_errors(ours: dict, ref: dict) -> dict[str, float]:
    """Each stage's max |ours - ref| / max |ref|; fails on a stage over TOL or a stage missing on either side."""
    assert set(ours) == set(ref)
    errors = {k: rel_err(ours[k], ref[k]) for k in ref}
    bad = {k: e for k, e in errors.items() if e > TOL}
    assert not bad, f"stages over {TOL}: {bad}"
    return errors


def random_images(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, height, width, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Parity with transformers, stage by stage


@pytest.mark.parametrize("config, size", [(tiny_v2(), (16, 16)), (tiny_native(), (12, 20)), (tiny_native(), (20, 8))],
                         ids=["fixed", "native-wide", "native-tall"])
def test_parity_tiny(config, size, backend_path):
    ref, model = make_pair(config, seed=1)
    images = random_images(2, *size)
    theirs = reference_stages(ref, images)
    errors = stage_errors(our_stages(model, images), theirs)
    assert len(errors) == config.depth + 2
    # The encoder's answer is Apple's: the final normalised tokens, transformers' last_hidden_state.
    assert rel_err(model(mx.array(images)), theirs["trunk"]) <= TOL


@pytest.fixture(scope="module")
def large_224():
    """aimv2-large-patch14-224 at full size: transformers' stages for one 224x224 image, and our model."""
    config = get_config("aimv2-large-patch14-224")
    ref, model = make_pair(config)
    images = random_images(1, 224, 224)
    return model, images, reference_stages(ref, images)


@pytest.fixture(scope="module")
def large_native():
    """aimv2-large-patch14-native at full size, on one non-square image: 224 high, 336 wide (16x24 patches)."""
    config = get_config("aimv2-large-patch14-native")
    ref, model = make_pair(config)
    images = random_images(1, 224, 336)
    return model, images, reference_stages(ref, images)


def test_parity_full_size_large_224(large_224, backend_path):
    model, images, ref = large_224
    errors = stage_errors(our_stages(model, images), ref)
    assert len(errors) == 26 and ref["trunk"].shape == (1, 256, 1024)


def test_parity_full_size_native_non_square(large_native, backend_path):
    model, images, ref = large_native
    errors = stage_errors(our_stages(model, images), ref)
    assert len(errors) == 26 and ref["trunk"].shape == (1, 16 * 24, 1024)


def test_native_position_embedding_is_apples_layout():
    """Apple's native embedding (AIM v1's `SinCosPosEmbed`, reused by AIMv2): [sin(col w), cos(col w), sin(row w),
    cos(row w)]. transformers builds [rows | columns] and swaps the halves to reach it: the same values."""
    for grid_h, grid_w, dim in [(3, 5, 16), (16, 24, 1024)]:
        theirs = build_2d_sinusoidal_position_embedding(grid_h, grid_w, dim, dtype=torch.float64).numpy()
        theirs = np.concatenate([theirs[:, dim // 2:], theirs[:, : dim // 2]], axis=1)
        np.testing.assert_allclose(np.array(sincos_pos_embed(grid_h, grid_w, dim)), theirs, atol=1e-6)
    emb = np.array(sincos_pos_embed(3, 5, 16))  # token 7: row 1, column 2
    assert emb[7, 0] == pytest.approx(np.sin(2.0)) and emb[7, 4] == pytest.approx(np.cos(2.0))
    assert emb[7, 8] == pytest.approx(np.sin(1.0)) and emb[7, 12] == pytest.approx(np.cos(1.0))


# ---------------------------------------------------------------------------------------------------
# The model's contract


def test_parameters_are_apples_keys():
    model = build_model(tiny_v2())
    keys = {k for k, _ in tree_flatten(model.parameters())}
    block = {"attn.qkv.weight", "attn.proj.weight", "norm_1.weight", "norm_2.weight", "mlp.fc1.weight",
             "mlp.fc2.weight", "mlp.fc3.weight"}
    trunk = {f"trunk.blocks.{i}.{k}" for i in range(4) for k in block} | {"trunk.post_trunk_norm.weight"}
    pre = {"preprocessor.patchifier.proj.weight", "preprocessor.patchifier.proj.bias",
           "preprocessor.patchifier.norm.weight"}
    head = {"head.bn.running_mean", "head.bn.running_var", "head.k.weight", "head.v.weight", "head.cls_token",
            "head.linear.weight"}
    assert keys == trunk | pre | {"preprocessor.pos_embed"}  # an encoder, as Apple released it: no head
    assert model.preprocessor.pos_embed.shape == (1, 16, 64)
    native = {k for k, _ in tree_flatten(build_model(tiny_native()).parameters())}
    assert native == trunk | pre  # no stored position embedding: it is computed per grid
    probed = {k for k, _ in tree_flatten(build_model(tiny_v2(), probe=True).parameters())}
    assert probed == keys | head  # a probe's head under Apple's head.* names


def test_extract_features_contract():
    model = build_model(tiny_v2(), seed=0)
    images = mx.array(random_images(3, 16, 16))
    normed, features = model.extract_features(images)
    assert len(features) == 4 and all(f.shape == (3, 16, 64) for f in features)
    np.testing.assert_allclose(np.array(normed), np.array(model.trunk.post_trunk_norm(features[-1])), atol=1e-6)
    # Stopping early: the final norm applies to the last block run, and the blocks run agree with a full run.
    normed_1, features_1 = model.extract_features(images, max_block_id=1)
    assert len(features_1) == 2
    np.testing.assert_allclose(np.array(features_1[1]), np.array(features[1]), atol=1e-6)
    np.testing.assert_allclose(np.array(normed_1), np.array(model.trunk.post_trunk_norm(features[1])), atol=1e-6)
    assert len(model.extract_features(images, max_block_id=-2)[1]) == 3
    with pytest.raises(ValueError, match="max_block_id=4"):
        model.extract_features(images, max_block_id=4)
    # The probe reads the mean of its layers (1 and 2) and needs the trunk only up to block 2.
    expected = (np.array(features[1]) + np.array(features[2])) / 2
    np.testing.assert_allclose(np.array(model.probe_features(images)), expected, atol=1e-6)
    # The call is Apple's: the final normalised tokens; a pooled embedding needs a trained probe.
    np.testing.assert_array_equal(np.array(model(images)), np.array(normed))
    with pytest.raises(UntrainedHeadError, match="mlx-aim probe train"):
        model.embed(images)


def test_batch_elements_are_independent(backend_path):
    model = build_model(tiny_native(), seed=0)
    images = mx.array(random_images(3, 12, 20))
    together = np.array(model.extract_features(images)[0])
    alone = np.concatenate([np.array(model.extract_features(images[i : i + 1])[0]) for i in range(3)])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_fixed_size_model_refuses_other_sizes():
    model = build_model(tiny_v2(name="tiny-v2"))
    for shape in [(1, 20, 20, 3), (1, 16, 20, 3), (1, 4, 4, 3)]:  # larger, non-square, a single patch
        with pytest.raises(ValueError, match=rf"tiny-v2 takes 16x16 images .*got {shape[1]}x{shape[2]}"):
            model(mx.zeros(shape))
    large = build_model(get_config("aimv2-large-patch14-224"))
    with pytest.raises(ValueError, match="224x224 .* 16x16 grid.*got 336x336"):
        large.extract_features(mx.zeros((1, 336, 336, 3)))  # refused before any weight is used


def test_native_model_takes_any_grid_up_to_max_patches():
    model = build_model(tiny_native(max_patches=12), seed=0)
    for h, w in [(4, 4), (12, 16), (48, 4), (8, 24)]:  # up to 3x4 = 12 patches
        normed, _ = model.extract_features(mx.zeros((1, h, w, 3)))
        assert normed.shape == (1, (h // 4) * (w // 4), 64)
    with pytest.raises(ValueError, match=r"16x16 is 4x4 = 16 patches, over max_patches=12"):
        model(mx.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        model(mx.zeros((1, 14, 16, 3)))
    raised = build_model(model.config.replace(max_patches=16))
    assert raised(mx.zeros((1, 16, 16, 3))).shape == (1, 16, 64)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_half_precision(dtype, backend_path):
    config = tiny_native()
    _, model32 = make_pair(config)
    model = build_model(config, dtype)
    model.load_weights([(k, v.astype(dtype)) for k, v in tree_flatten(model32.parameters())])
    assert model.trunk.blocks[0].mlp.fc3.weight.dtype == dtype and model.dtype == dtype
    images = mx.array(random_images(2, 12, 20))
    normed, features = model.extract_features(images)
    assert normed.dtype == dtype and features[-1].dtype == dtype
    assert rel_err(np.array(normed.astype(mx.float32)), np.array(model32.extract_features(images)[0])) < 5e-2


def test_quantized_build():
    config = tiny_v2()
    model = build_model(config, dtype="bfloat16", quantization=4, probe=True)
    assert model.config.quantization == {"bits": 4, "group_size": 64}
    block = model.trunk.blocks[0]
    for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2, block.mlp.fc3):
        assert isinstance(layer, nn.QuantizedLinear)
    assert not isinstance(model.head.linear, nn.QuantizedLinear) and model.head.linear.weight.dtype == mx.bfloat16
    assert model.preprocessor.pos_embed.dtype == mx.bfloat16
    assert isinstance(build_model(model.config).trunk.blocks[3].mlp.fc3, nn.QuantizedLinear)  # the config says so
    q = parse_quantize(4)
    assert is_quantized("trunk.blocks.3.mlp.fc3.weight", (128, 64), q)
    assert not is_quantized("preprocessor.pos_embed", (1, 16, 64), q)
    # The policy applied to trained weights: 8 bits keeps the float model's outputs closely; at 4 and 8 bits the
    # quantized model computes what the float model running its dequantized weights computes, through the CPU
    # workarounds and through MLX's own quantized kernel (what Metal runs).
    _, model32 = make_pair(config)
    images = mx.array(random_images(2, 16, 16))
    reference = np.array(model32.extract_features(images)[0])
    for bits in (8, 4):
        quantized = build_model(config)
        quantized.load_weights(list(tree_flatten(model32.parameters())))
        nn.quantize(quantized, 64, bits, class_predicate=quantize_predicate(parse_quantize(bits)))
        twin = dequantized_twin(quantized)
        for workarounds in (True, False):
            with cpu_workarounds(workarounds):
                out = np.array(quantized.extract_features(images)[0])
                expected = np.array(twin.extract_features(images)[0])
            assert rel_err(out, expected) < TWIN_TOLERANCE["float32"], (bits, workarounds)
        if bits == 8:
            assert rel_err(out, reference) < 2e-2


def test_encoder_has_no_head_and_a_probe_composes_onto_it():
    model = build_model(tiny_v2())
    assert isinstance(model, AIMv2) and not model.training and "head" not in model
    probed = with_probe(model, build_probe(tiny_v2(), 3))
    assert isinstance(probed, ProbedAIMv2) and probed.config.num_classes == 3 and probed.trunk is model.trunk
    assert probed(mx.zeros((2, 16, 16, 3))).shape == (2, 3) and model(mx.zeros((2, 16, 16, 3))).shape == (2, 16, 64)


def test_runs_without_torch_or_transformers():
    """transformers (and torch) are test-only: building and running an AIMv2 imports neither."""
    code = ("import sys, mlx.core as mx, mlx_aim\n"
            "model = mlx_aim.build_model(mlx_aim.get_config('aimv2-large-patch14-native', depth=2, max_patches=64))\n"
            "mx.eval(model.extract_features(mx.zeros((1, 28, 42, 3)))[0])\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_seeded_build_is_reproducible_and_pretraining_is_refused():
    a = dict(tree_flatten(build_model(tiny_v2(), seed=3).parameters()))
    b = dict(tree_flatten(build_model(tiny_v2(), seed=3).parameters()))
    c = dict(tree_flatten(build_model(tiny_v2(), seed=4).parameters()))
    for key in ("trunk.blocks.0.mlp.fc3.weight", "preprocessor.pos_embed"):
        assert np.array_equal(np.array(a[key]), np.array(b[key])) and not np.array_equal(np.array(a[key]),
                                                                                          np.array(c[key]))
    probed = dict(tree_flatten(build_model(tiny_v2(), seed=3, probe=True).parameters()))
    assert all(np.array_equal(np.array(v), np.array(probed[k])) for k, v in a.items())  # one seed, one trunk
    with pytest.raises(ValueError, match="AIMv2 has no pre-training model"):
        build_model(tiny_v2(), pretraining=True)


# ---------------------------------------------------------------------------------------------------
# Config and presets

# name -> (width, depth, heads, SwiGLU hidden size, image size): as apple/ml-aim's `aim-v2/aim/v2/torch/models.py`
# builds them (aimv2_large, aimv2_huge, aimv2_1B, aimv2_3B).
RELEASED = {
    **{f"aimv2-large-patch14-{s}": (1024, 24, 8, 2816, s) for s in (224, 336, 448)},
    **{f"aimv2-huge-patch14-{s}": (1536, 24, 12, 4096, s) for s in (224, 336, 448)},
    **{f"aimv2-1B-patch14-{s}": (2048, 24, 16, 5632, s) for s in (224, 336, 448)},
    **{f"aimv2-3B-patch14-{s}": (3072, 24, 24, 8192, s) for s in (224, 336, 448)},
    "aimv2-large-patch14-224-distilled": (1024, 24, 8, 2816, 224),
    "aimv2-large-patch14-336-distilled": (1024, 24, 8, 2816, 336),
    "aimv2-large-patch14-native": (1024, 24, 8, 2816, None),
    "aimv2-large-patch14-224-lit": (1024, 24, 8, 2816, 224),
}


def test_every_released_name_resolves_and_builds():
    assert set(AIMV2_PRESET_NAMES) == set(RELEASED) and len(RELEASED) == 16
    assert set(AIMV2_PRESET_NAMES) < set(PRESET_NAMES) and PRESET_NAMES[0] == "aim-600M"  # one registry, AIM first
    for name, (width, depth, heads, hidden, size) in RELEASED.items():
        config = get_config(name)
        assert isinstance(config, AIMv2Config) and config.name == name
        assert (config.width, config.depth, config.num_heads, config.hidden_dim, config.image_size) == (
            width, depth, heads, hidden, size)
        assert (config.patch_size, config.norm_eps, config.pos_embed) == (14, 1e-5, "sincos" if size is None else
                                                                           "learned")
        model = build_model(config)  # lazy: nothing is evaluated, so even 3B costs nothing here
        shapes = dict((k, v.shape) for k, v in tree_flatten(model.parameters()))
        assert shapes["trunk.blocks.23.mlp.fc3.weight"] == (hidden, width)
        assert shapes["trunk.blocks.0.attn.qkv.weight"] == (3 * width, width)
        assert shapes.get("preprocessor.pos_embed") == (None if size is None else (1, (size // 14) ** 2, width))
        trunk_params = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("trunk."))
        assert trunk_params == depth * (4 * width * width + 3 * width * hidden + 2 * width) + width


def test_config_round_trip_and_dispatch(tmp_path):
    for config in (get_config("aimv2-large-patch14-336"), get_config("aimv2-large-patch14-native", "last"),
                   tiny_native(max_patches=99, quantization={"bits": 4, "group_size": 64})):
        saved = config.to_dict()
        assert saved["model_type"] == "aimv2" and "image_size" in saved
        assert AIMv2Config.from_dict(saved) == config and config_from_dict(saved) == config
        config.save(tmp_path / "config.json")
        assert AIMv2Config.from_file(tmp_path / "config.json") == config
    assert isinstance(config_from_dict(get_config("aim-1B").to_dict()), AIMConfig)
    assert isinstance(config_from_dict({"embed_dim": 2048, "num_blocks": 24, "num_heads": 16}), AIMConfig)
    with pytest.raises(ValueError, match="model_type='aimv2'"):
        AIMConfig.from_dict(get_config("aimv2-1B-patch14-224").to_dict())
    with pytest.raises(ValueError, match="model_type='aim'"):
        AIMv2Config.from_dict(get_config("aim-1B").to_dict())
    with pytest.raises(ValueError, match="aimv2_vision_model"):
        config_from_dict({"model_type": "aimv2_vision_model"})


def test_config_validation_and_probe_layers():
    with pytest.raises(ValueError, match="native resolution.*sincos"):
        AIMv2Config(image_size=None, pos_embed="learned")
    with pytest.raises(ValueError, match="sin-cos embedding is native"):
        AIMv2Config(image_size=224, pos_embed="sincos")
    with pytest.raises(ValueError, match="pos_embed='rope'"):
        AIMv2Config(pos_embed="rope")
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        AIMv2Config(image_size=230)
    with pytest.raises(ValueError, match="max_patches=0"):
        AIMv2Config(max_patches=0)
    with pytest.raises(ValueError, match="out of range"):
        get_config("aimv2-huge-patch14-448", probe_layers=[24])
    config = get_config("aimv2-1B-patch14-336")
    assert config.probe_layers == list(range(18, 24)) and config.max_block_id == 23  # no best layers named: last 6
    assert config.with_probe_layers("best") == config.with_probe_layers("last")
    assert config.with_probe_layers([3, 9]).max_block_id == 9
    assert get_config("aimv2-large-patch14-native").grid_size is None and tiny_v2().num_patches == 16
