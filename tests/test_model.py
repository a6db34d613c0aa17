"""Parity of the MLX model with a PyTorch reference of AIM, stage by stage, and input validation. Tests that take
the `backend_path` fixture run twice: with mlx_aim.backend's CPU workarounds and on the portable path."""

import numpy as np
import pytest
import torch

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from conftest import rel_err
from mlx_aim.models.config import AIMConfig, get_config, parse_probe_layers
from mlx_aim.models.layers import prefix_causal_mask, sincos_pos_embed
from mlx_aim.models.model import AIM, AIMEncoder, build_model, build_probe, is_quantized, parse_quantize, with_probe
from mlx_aim.checkpoints.weights import load_state_dict
from torch_reference import AIMReference, sincos_2d, state_dict_numpy

TOL = 1e-5


def make_pair(config: AIMConfig, seed: int = 0):
    """The reference with random weights, and our classifier holding them: the trunk composed with the probe head,
    both loaded from the reference (a trunk alone has no logits to compare)."""
    torch.manual_seed(seed)
    ref = AIMReference.from_config(config).randomize_norms(seed).eval()
    model = with_probe(build_model(config), build_probe(config))
    load_state_dict(model, {k: mx.array(v) for k, v in state_dict_numpy(ref).items()}, "reference")
    return ref, model


def mlx_stages(model: AIM, images_nhwc, attention, prefix_len=None, max_block_id=None):
    c = model.config
    last = c.max_block_id if max_block_id is None else max_block_id
    normed, feats = model.extract_features(images_nhwc, last, attention, prefix_len)
    out = {"preprocessor": model.preprocessor(images_nhwc), "trunk": normed}
    out.update({f"block_{i}": f for i, f in enumerate(feats)})
    probe_in = mx.stack([feats[i] for i in c.probe_layers]).mean(axis=0)
    out["probe_input"] = probe_in
    out["logits"], out["pooled"] = model.head(probe_in)
    return out


def assert_stages_match(ref_out, mlx_out):
    assert set(ref_out) == set(mlx_out)
    errors = {k: rel_err(mlx_out[k], ref_out[k].numpy()) for k in ref_out}
    bad = {k: e for k, e in errors.items() if e > TOL}
    assert not bad, f"stages over {TOL}: {bad}"
    return errors


def test_sincos_matches_reference_and_layout():
    for gh, gw, d in [(4, 4, 16), (3, 5, 32), (16, 16, 1536)]:
        ours = np.array(sincos_pos_embed(gh, gw, d))
        np.testing.assert_allclose(ours, sincos_2d(gh, gw, d).numpy(), atol=1e-6)
    # Token 5 of a 3x4 grid is row 1, column 1; first half encodes the column, second the row.
    emb = np.array(sincos_pos_embed(3, 4, 8))
    assert emb[5, 0] == pytest.approx(np.sin(1.0)) and emb[5, 2] == pytest.approx(np.cos(1.0))
    assert emb[2, 0] == pytest.approx(np.sin(2.0)) and emb[2, 4] == pytest.approx(0.0)
    assert emb[8, 4] == pytest.approx(np.sin(2.0)) and emb[8, 0] == pytest.approx(0.0)


@pytest.mark.parametrize("attention", ["bidirectional", "causal", "prefix"])
def test_parity_stage_by_stage(tiny_config, attention, backend_path):
    ref, model = make_pair(tiny_config)
    images = np.random.randn(3, 16, 16, 3).astype(np.float32)
    prefix = np.array([1, 7, 15]) if attention == "prefix" else None
    ref_out = ref.stages(torch.from_numpy(images.transpose(0, 3, 1, 2)), attention, prefix)
    mlx_out = mlx_stages(model, mx.array(images), attention, None if prefix is None else mx.array(prefix))
    assert_stages_match(ref_out, mlx_out)
    if attention == "bidirectional":
        np.testing.assert_allclose(np.array(model(mx.array(images))), ref_out["logits"].numpy(), atol=1e-5)
        np.testing.assert_allclose(np.array(model.embed(mx.array(images))), ref_out["pooled"].numpy(), atol=1e-5)


def test_parity_non_square_and_max_block_id(tiny_config, backend_path):
    ref, model = make_pair(tiny_config, seed=1)
    images = np.random.randn(2, 12, 24, 3).astype(np.float32)
    ref_out = ref.stages(torch.from_numpy(images.transpose(0, 3, 1, 2)), max_block_id=2)
    mlx_out = mlx_stages(model, mx.array(images), "bidirectional", max_block_id=2)
    assert "block_3" not in mlx_out  # the trunk stopped at the highest probe layer
    assert_stages_match(ref_out, mlx_out)


def test_trunk_stops_at_max_block_id(tiny_config):
    model = build_model(tiny_config)
    images = mx.random.normal((1, 16, 16, 3))
    _, feats = model.extract_features(images, max_block_id=1)
    assert len(feats) == 2
    _, all_feats = model.extract_features(images)
    assert len(all_feats) == tiny_config.depth
    np.testing.assert_allclose(np.array(feats[1]), np.array(all_feats[1]), atol=1e-6)


def test_batch_elements_are_independent_in_eval_mode(tiny_config, backend_path):
    _, model = make_pair(tiny_config)
    images = mx.random.normal((4, 16, 16, 3))
    together = np.array(model(images))
    alone = np.concatenate([np.array(model(images[i : i + 1])) for i in range(4)])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_prefix_mask_semantics():
    mask = np.array(prefix_causal_mask(mx.array([3, 1]), 6))
    assert mask.shape == (2, 1, 6, 6)
    m = mask[0, 0]
    assert m[:3, :3].all()  # the prefix is bidirectional
    assert not m[:3, 3:].any()  # a prefix token never sees a token after the prefix
    assert m[4, :5].all() and not m[4, 5]  # later tokens: prefix and up to themselves
    np.testing.assert_array_equal(mask[1, 0], np.tril(np.ones((6, 6), bool)))  # prefix 1 == causal


def test_causal_attention_ignores_the_future(tiny_config, backend_path):
    model = build_model(tiny_config)
    a = np.random.randn(1, 16, 16, 3).astype(np.float32)
    b = a.copy()
    b[:, 8:] = np.random.randn(1, 8, 16, 3)  # changes only tokens 8..15 (the bottom two patch rows)
    fa = np.array(model.extract_features(mx.array(a), attention="causal")[1][-1])
    fb = np.array(model.extract_features(mx.array(b), attention="causal")[1][-1])
    np.testing.assert_allclose(fa[:, :8], fb[:, :8], atol=1e-6)
    assert np.abs(fa[:, 8:] - fb[:, 8:]).max() > 1e-3


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_half_precision_inference(tiny_config, dtype, backend_path):
    ref, model32 = make_pair(tiny_config)
    weights = {k: mx.array(v) for k, v in state_dict_numpy(ref).items()}
    model = build_model(tiny_config, dtype, probe=True)  # the reference's head is loaded into its probe
    load_state_dict(model, weights)
    assert model.trunk.blocks[0].attn.qkv.weight.dtype == dtype
    images = mx.random.normal((2, 16, 16, 3))
    logits = model(images)
    assert logits.dtype == dtype
    assert rel_err(np.array(logits.astype(mx.float32)), np.array(model32(images))) < 5e-2


@pytest.mark.parametrize(
    "shape, dtype, message",
    [
        ((2, 3, 16, 16), mx.float32, "NCHW"),
        ((2, 16, 16, 4), mx.float32, "channels"),
        ((2, 18, 16, 3), mx.float32, "multiples of the patch size"),
        ((16, 16, 3), mx.float32, "4-D"),
        ((2, 16, 16, 3), mx.uint8, "floating-point"),
    ],
)
def test_bad_images_raise(tiny_config, shape, dtype, message):
    model = build_model(tiny_config, probe=True)
    with pytest.raises(ValueError, match=message):
        model(mx.zeros(shape, dtype=dtype))


def test_config_errors_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("aim-9B")
    with pytest.raises(ValueError, match="out of range"):
        get_config("aim-600M", probe_layers=[3, 24])
    with pytest.raises(ValueError, match="not divisible"):
        AIMConfig(image_size=225, patch_size=14)
    c = get_config("aim-1B", probe_layers="last")
    assert c.probe_layers == list(range(18, 24)) and c.max_block_id == 23
    assert get_config("aim-1B").probe_layers == list(range(12, 18))
    c.save(tmp_path / "config.json")
    assert AIMConfig.from_file(tmp_path / "config.json") == c


def test_apple_hub_config_means_last_six_blocks():
    apple = {"img_size": 224, "patch_size": 14, "embed_dim": 2048, "num_blocks": 24, "num_heads": 16}
    c = AIMConfig.from_dict(apple)
    assert (c.width, c.depth, c.num_heads) == (2048, 24, 16)
    assert c.probe_layers == list(range(18, 24))


def test_load_state_dict_errors_name_the_key(tiny_config):
    ref, model = make_pair(tiny_config)
    weights = {k: mx.array(v) for k, v in state_dict_numpy(ref).items()}
    missing = dict(weights)
    del missing["trunk.blocks.1.mlp.fc1.weight"]
    with pytest.raises(ValueError, match="missing keys.*blocks.1.mlp.fc1"):
        load_state_dict(model, missing)
    extra = dict(weights, **{"trunk.blocks.9.attn.qkv.weight": mx.zeros((3, 3))})
    with pytest.raises(ValueError, match="unexpected keys.*blocks.9"):
        load_state_dict(model, extra)
    wrong = dict(weights, **{"head.k.weight": mx.zeros((64, 32))})
    with pytest.raises(ValueError, match=r"head.k.weight.*\(64, 32\).*\(64, 64\)"):
        load_state_dict(model, wrong)


def test_full_aim_600m_architecture_end_to_end():
    """aim-600M at full size with random weights: every stage matches the reference (float32)."""
    config = get_config("aim-600M")
    ref, model = make_pair(config)
    images = np.random.randn(2, 224, 224, 3).astype(np.float32)
    ref_out = ref.stages(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    mlx_out = mlx_stages(model, mx.array(images), "bidirectional")
    assert len([k for k in mlx_out if k.startswith("block_")]) == 20  # stops at the best layers' end, 19
    assert_stages_match(ref_out, mlx_out)


def _flat(model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_unseeded_build_keeps_mlx_default_init(tiny_config):
    mx.random.seed(3)
    a = _flat(build_model(tiny_config))
    mx.random.seed(3)
    b = _flat(build_model(tiny_config))
    seeded = _flat(build_model(tiny_config, seed=3))
    key = "trunk.blocks.0.mlp.fc1.weight"  # (256, 64): MLX's default bound is 1/sqrt(64), xavier's sqrt(6/320)
    assert np.array_equal(a[key], b[key]) and not np.array_equal(a[key], seeded[key])
    assert np.abs(a[key]).max() <= 1 / 8 and np.abs(seeded[key]).max() > 1 / 8


def test_build_dtype_and_quantization(tiny_config):
    model = build_model(tiny_config, dtype="bfloat16", quantization=4, probe=True)
    assert model.config.quantization == {"bits": 4, "group_size": 64}
    assert isinstance(model.trunk.blocks[0].attn.qkv, nn.QuantizedLinear)
    assert not isinstance(model.head.linear, nn.QuantizedLinear)  # the probe head stays in float
    assert model.head.linear.weight.dtype == mx.bfloat16
    # A config that says it is quantized builds that way, and refuses another quantization.
    stored = build_model(model.config)
    assert isinstance(stored.trunk.blocks[1].mlp.fc2, nn.QuantizedLinear)
    with pytest.raises(ValueError, match="quantized"):
        build_model(model.config, quantization=8)
    with pytest.raises(ValueError, match="float"):
        build_model(tiny_config, quantization=4, pretraining=True)
    with pytest.raises(ValueError, match="dtype"):
        build_model(tiny_config, dtype="float64")


def test_quantization_policy():
    q = parse_quantize(4)
    assert q == {"bits": 4, "group_size": 64} and parse_quantize({"bits": 8, "group_size": 32})["group_size"] == 32
    assert parse_quantize(None) is None
    with pytest.raises(ValueError, match="bits"):
        parse_quantize(3)
    with pytest.raises(ValueError, match="group size"):
        parse_quantize(4, group_size=48)
    assert is_quantized("trunk.blocks.3.mlp.fc1.weight", (256, 64), q)
    assert not is_quantized("trunk.blocks.3.mlp.fc1.weight", (256, 96), q)  # rows not a multiple of the group
    assert not is_quantized("head.linear.weight", (1000, 64), q)
    assert not is_quantized("trunk.blocks.3.norm_1.weight", (64,), q)
    assert not is_quantized("trunk.blocks.3.mlp.fc1.weight", (256, 64), None)


def test_with_probe_composes_a_trained_head(tiny_config):
    trunk = build_model(tiny_config)
    assert isinstance(trunk, AIMEncoder) and not any(k.startswith("head.") for k, _ in tree_flatten(trunk.parameters()))
    head = build_probe(tiny_config, 3)
    head.train()
    model = with_probe(trunk, head)
    assert isinstance(model, AIM) and model.trunk is trunk.trunk and model.preprocessor is trunk.preprocessor
    assert model.config.num_classes == 3 and not model.head.training and model.head is head
    assert model(mx.zeros((1, 16, 16, 3))).shape == (1, 3)
    with pytest.raises(ValueError, match="width 32 on a trunk of width 64"):
        with_probe(trunk, build_probe(tiny_config.replace(width=32, num_heads=2), 3))


def test_probe_layers_best_last_and_indices():
    c = get_config("aim-600M")
    assert c.probe_layers == list(range(14, 20))
    assert c.with_probe_layers("last").probe_layers == list(range(18, 24))
    assert c.with_probe_layers("last").with_probe_layers("best").probe_layers == list(range(14, 20))
    assert c.with_probe_layers([3, 5]).probe_layers == [3, 5] and c.with_probe_layers(None) is c
    # Presets without best layers, and shallow trunks: the last 6 blocks, or all of them.
    assert get_config("aim-tiny").probe_layers == list(range(6, 12))
    assert get_config("aim-tiny", depth=4).with_probe_layers("best").probe_layers == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="preset"):
        AIMConfig(depth=8).with_probe_layers("best")
    with pytest.raises(ValueError, match="'best', 'last'"):
        c.with_probe_layers("first")
    with pytest.raises(ValueError, match="out of range"):
        c.with_probe_layers([24])
    assert parse_probe_layers(None) is None and parse_probe_layers("best") == "best"
    assert parse_probe_layers("14,15,16") == [14, 15, 16]
    with pytest.raises(ValueError, match="comma-separated"):
        parse_probe_layers("14-19")
