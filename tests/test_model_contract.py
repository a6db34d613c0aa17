"""The model API contract (issue 23, part 4): `model(images)` answers as Apple's code answers the same call, and a
model without a trained head never answers with an untrained head's output: it raises `UntrainedHeadError` (a
ValueError, so the command lines' one-line error covers it), naming the command that trains a probe. Heads are
composed onto trunks (`load(..., head=...)`, a probe's model folder, `with_probe`), never hidden inside them.
Tiny configs, random weights, nothing downloaded."""

import numpy as np
import pytest
from PIL import Image

import mlx.core as mx
from mlx.utils import tree_flatten
import mlx_aim
from conftest import tiny_config
from lit_helpers import tiny_lit_config
from mlx_aim import AIM, AIMEncoder, AIMv2, ProbedAIMv2, UntrainedHeadError, build_model, with_probe
from mlx_aim.checkpoints.weights import save_model
from mlx_aim.cli import classify as classify_cli
from mlx_aim.models.config import AIMv2Config
from mlx_aim.models.model import Probed, build_probe
from mlx_aim.training.pretrain import export_trunk
from mlx_aim.training.probe import save_head, with_trained_head


def tiny_v2(**overrides) -> AIMv2Config:
    """A tiny AIMv2: 16-pixel images in 4x4-pixel patches (16 tokens), width 64, depth 4, SwiGLU 128."""
    fields = dict(image_size=16, patch_size=4, width=64, depth=4, num_heads=4, hidden_dim=128, num_classes=10,
                  probe_layers=[1, 2])
    return AIMv2Config(**{**fields, **overrides})


V2_CONFIGS = {"fixed": (tiny_v2(), (16, 16)), "native": (tiny_v2(image_size=None), (12, 20))}


def random_images(batch: int = 2, height: int = 16, width: int = 16) -> mx.array:
    return mx.array(np.random.default_rng(0).standard_normal((batch, height, width, 3)).astype(np.float32))


def keys(model) -> set[str]:
    return {k for k, _ in tree_flatten(model.parameters())}


def trunk_weights(model) -> dict:
    return {k: v for k, v in tree_flatten(model.parameters()) if k.startswith(("preprocessor.", "trunk."))}


def assert_names_the_probe_command(error: pytest.ExceptionInfo, source: str = "SRC") -> None:
    message = str(error.value)
    assert isinstance(error.value, ValueError) and "no trained classification head" in message
    assert f"mlx-aim probe train --model {source} --data DIR --out OUT" in message
    assert "--head OUT/head.safetensors" in message and "head='OUT/head.safetensors'" in message


# ---------------------------------------------------------------------------------------------------
# AIM v1: Apple's contract, logits with its released head; a trunk alone raises


def test_aim_answers_with_logits_only_with_a_trained_head(tmp_path):
    config = tiny_config()
    classifier = build_model(config, seed=0, probe=True)  # stands in for Apple's backbone + head files
    with_head = save_model(tmp_path / "classifier", dict(tree_flatten(classifier.parameters())), config)
    trunk_only = save_model(tmp_path / "trunk", trunk_weights(classifier), config)
    x = random_images()

    model = mlx_aim.load(with_head)
    assert type(model) is AIM and {k for k in keys(model) if k.startswith("head.")}
    logits, pooled = model.head(model.probe_features(x))
    assert model(x).shape == (2, 10) and model.embed(x).shape == (2, 64)
    np.testing.assert_array_equal(np.array(model(x)), np.array(logits))
    np.testing.assert_array_equal(np.array(model.embed(x)), np.array(pooled))

    trunk = mlx_aim.load(trunk_only)
    assert type(trunk) is AIMEncoder and not any(k.startswith("head.") for k in keys(trunk))
    for call in (trunk, trunk.embed):
        with pytest.raises(UntrainedHeadError) as error:
            call(x)
        assert_names_the_probe_command(error)
    # What a trunk does compute: the same features as the classifier it came from.
    np.testing.assert_array_equal(np.array(trunk.extract_features(x)[0]), np.array(model.extract_features(x)[0]))
    np.testing.assert_array_equal(np.array(trunk.probe_features(x)), np.array(model.probe_features(x)))


def test_aim_pretraining_export_and_random_init_raise_naming_the_command(tmp_path):
    config = tiny_config(name="aim-600M")  # a preset's name: the message names it as the source to probe
    exported = mlx_aim.load(export_trunk(tmp_path / "model", build_model(tiny_config(), pretraining=True)))
    for trunk in (exported, build_model(tiny_config()), build_model(tiny_config(), seed=1)):
        assert isinstance(trunk, AIMEncoder) and not any(k.startswith("head.") for k in keys(trunk))
        with pytest.raises(UntrainedHeadError) as error:
            trunk(random_images())
        assert_names_the_probe_command(error)
        assert trunk.probe_features(random_images()).shape == (2, 16, 64)
    with pytest.raises(UntrainedHeadError) as error:
        build_model(config)(random_images())
    assert_names_the_probe_command(error, "aim-600M")


def test_classify_refuses_a_trunk_in_one_line_naming_the_command(tmp_path, capsys):
    config = tiny_config(num_classes=1000)
    folder = save_model(tmp_path / "trunk", trunk_weights(build_model(config, seed=0)), config)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "image.png")
    assert classify_cli.main(["--model", str(folder), "--no-progress", str(tmp_path / "image.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"mlx-aim probe train --model {folder} --data DIR --out OUT" in err


# ---------------------------------------------------------------------------------------------------
# AIMv2 encoders: Apple's output (the final normalised tokens); no head inside; a probe composes onto them


@pytest.mark.parametrize("name", list(V2_CONFIGS))
def test_aimv2_call_gives_the_final_normalised_tokens(name):
    config, (height, width) = V2_CONFIGS[name]
    model = build_model(config, seed=0)
    x = random_images(3, height, width)
    tokens = model(x)
    normed, features = model.extract_features(x)
    assert type(model) is AIMv2 and tokens.shape == (3, (height // 4) * (width // 4), 64)
    np.testing.assert_array_equal(np.array(tokens), np.array(normed))
    np.testing.assert_allclose(np.array(tokens), np.array(model.trunk.post_trunk_norm(features[-1])), atol=1e-6)


@pytest.mark.parametrize("name", list(V2_CONFIGS))
def test_aimv2_encoder_holds_no_head(name, tmp_path):
    config, (height, width) = V2_CONFIGS[name]
    folder = save_model(tmp_path / "trunk", trunk_weights(build_model(config, seed=0)), config)
    for model in (build_model(config), build_model(config, seed=0), mlx_aim.load(folder)):
        assert type(model) is AIMv2 and not any(k.startswith("head.") for k in keys(model))
        with pytest.raises(UntrainedHeadError) as error:
            model.embed(random_images(1, height, width))
        assert_names_the_probe_command(error)
        assert "Apple released no AIMv2 heads" in str(error.value)


@pytest.mark.parametrize("name", list(V2_CONFIGS))
def test_aimv2_with_a_head_gives_the_probe_logits(name, tmp_path):
    config, (height, width) = V2_CONFIGS[name]
    encoder = build_model(config, seed=0)
    folder = save_model(tmp_path / "trunk", trunk_weights(encoder), config)
    mx.random.seed(5)
    head = build_probe(config, 3)
    head_file = save_head(tmp_path / "head.safetensors", head, config.probe_layers)
    # A probe's exported model folder: the trunk with head.* weights.
    exported = save_model(tmp_path / "probed", {**trunk_weights(encoder),
                                                **{f"head.{k}": v for k, v in tree_flatten(head.parameters())}},
                          config.replace(num_classes=3))
    head.eval()
    x = random_images(2, height, width)
    trunk = mlx_aim.load(folder)
    logits, pooled = head(trunk.probe_features(x))
    for model in (mlx_aim.load(folder, head=head_file), mlx_aim.load(exported), with_trained_head(trunk, head_file),
                  with_probe(trunk, head)):
        assert type(model) is ProbedAIMv2 and isinstance(model, Probed) and model.config.num_classes == 3
        assert keys(model) == keys(trunk) | {f"head.{k}" for k, _ in tree_flatten(head.parameters())}
        np.testing.assert_allclose(np.array(model(x)), np.array(logits), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.array(model.embed(x)), np.array(pooled), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.array(model.probe_features(x)), np.array(trunk.probe_features(x)), atol=1e-6)
    # Composing shares the trunk and leaves the encoder as it was: still Apple's tokens.
    assert type(trunk) is AIMv2 and trunk(x).shape == (2, (height // 4) * (width // 4), 64)


# ---------------------------------------------------------------------------------------------------
# The LiT's image side: its attention-pool head is trained, and stays


def test_lit_image_side_keeps_its_trained_head():
    lit = build_model(tiny_lit_config(), seed=0)
    encoder = lit.image_encoder
    x = random_images(2, 32, 32)
    assert {"head.cls_token", "head.k.weight", "head.v.weight"} <= keys(encoder)
    normed, _ = encoder.extract_features(x)
    np.testing.assert_allclose(np.array(encoder(x)), np.array(encoder.head(normed)), atol=1e-6)
    assert encoder(x).shape == (2, 32) and lit.encode_image(x).shape == (2, 16)
    # A probe composes onto its trunk without touching the LiT, which still embeds with its own head.
    before = np.array(lit.encode_image(x))
    probed = with_probe(encoder, build_probe(encoder.config, 4))
    assert type(probed) is ProbedAIMv2 and probed(x).shape == (2, 4) and not isinstance(encoder, Probed)
    np.testing.assert_array_equal(np.array(lit.encode_image(x)), before)
