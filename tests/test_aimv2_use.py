"""AIMv2 trunks through the commands, end to end on tiny random-weight MLX folders, fixed-size and native (images of
mixed sizes): extract features, train a probe, evaluate it, classify and run the demo with the probe's folder;
the head-less trunk's message, --max-patches, and the one max_patches default."""

import json

import mlx.core as mx
import numpy as np
import pytest

import mlx_aim
from conftest import last_json, run_script
from mlx_aim.cli import classify, demo, extract_features, probe
from mlx_aim.models.config import MAX_PATCHES, AIMv2Config, get_config
from mlx_aim.data import PREPROCESSOR_CONFIG, Preprocessing, load_image, preprocessing_for
from mlx_aim.apps.demo import sample_images
from mlx_aim.tasks.features import load_features
from mlx_aim.tasks.inference import open_model
from mlx_aim.tasks.shards import RaggedTokens
from mlx_aim.models.model import build_model
from mlx_aim.training.probe import new_head, with_trained_head
from probe_helpers import COLOURS, make_colour_folder, make_model_folder, native_config

FAST_PROBE = ["--epochs", "15", "--batch-size", "16", "--lr", "3e-3", "--no-progress"]


def fixed_config() -> AIMv2Config:
    """`native_config`'s trunk at one fixed size: 16-pixel images (a learned 4x4-grid position embedding)."""
    return native_config().replace(image_size=16, pos_embed="learned", name="tiny-v2-16")


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """Four colour classes; images 16 to 39 pixels a side, so a native trunk sees many patch grids."""
    return make_colour_folder(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module", params=["fixed", "native"])
def trunk_dir(request, tmp_path_factory):
    """A tiny AIMv2 trunk as released: an MLX folder without head.* weights, probe layers left at the default."""
    config = fixed_config() if request.param == "fixed" else native_config()
    config = config.replace(probe_layers=None)
    return make_model_folder(tmp_path_factory.mktemp(request.param) / "trunk", config=config, with_head=False)


@pytest.fixture(scope="module")
def probe_dir(trunk_dir, colours, tmp_path_factory):
    """A probe trained on `trunk_dir` by the command line (the script shim), with its summary."""
    out = tmp_path_factory.mktemp("probe") / "out"
    done = run_script("scripts/probe.py", "train", "--model", trunk_dir, "--data", colours, "--out", out,
                      *FAST_PROBE, "--json")
    return out, last_json(done.stdout)


def expected_tokens(model, folder, paths):
    """The probe layers' tokens of each image alone, preprocessed as the checkpoint folder says."""
    prep = preprocessing_for(model.config, folder)
    return [np.asarray(model.probe_features(mx.array(prep(p)[None])))[0] for p in paths]


def test_extract_features_on_a_trunk(trunk_dir, colours, tmp_path, capsys):
    images = colours / "val"
    assert extract_features.main(["--model", str(trunk_dir), "--out", str(tmp_path / "f"), "--features", "tokens",
                                  "--batch-size", "3", "--no-progress", "--json", str(images)]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["num_images"] == 16 and summary["num_skipped"] == 0
    tokens, paths = load_features(tmp_path / "f", "tokens")
    model = mlx_aim.load(trunk_dir)
    assert type(model) is mlx_aim.AIMv2  # an encoder: no probe head
    expected = expected_tokens(model, trunk_dir, [images / p for p in paths])
    if model.config.native:  # mixed sizes: one (rows x cols, width) block per image
        assert isinstance(tokens, RaggedTokens) and len(set(tokens.grids)) > 3
        rows = [tokens[i] for i in range(len(tokens))]
    else:
        assert tokens.shape == (16, 16, 64)
        rows = list(tokens)
    for row, want in zip(rows, expected, strict=True):
        np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-6)
    # The pooled embedding needs a trained probe: refused, naming the way out.
    assert extract_features.main(["--model", str(trunk_dir), "--out", str(tmp_path / "e"), "--no-progress",
                                  str(images)]) == 2
    assert "--features tokens" in capsys.readouterr().err


def test_probe_trains_evaluates_and_classifies(trunk_dir, probe_dir, colours, capsys):
    out, summary = probe_dir
    assert summary["train"]["top1"] >= 0.9 and summary["val"]["top1"] >= 0.75
    info = json.loads((out / "probe.json").read_text())
    # No released probe layers for AIMv2: the default is the last 6 blocks (all 3 of this tiny trunk).
    assert info["probe_layers"] == [0, 1, 2] and info["trunk"]["config"]["model_type"] == "aimv2"
    model = mlx_aim.load(out / "model")
    assert isinstance(model, mlx_aim.ProbedAIMv2) and model.config.num_classes == 4
    assert (out / "model" / PREPROCESSOR_CONFIG).is_file()
    assert preprocessing_for(model.config, out / "model") == preprocessing_for(model.config, trunk_dir)
    # The head file on the trunk computes what the saved folder computes.
    trunk = mlx_aim.load(trunk_dir)
    with_head = with_trained_head(trunk, out / "head.safetensors")
    assert with_head.head.bn.eps == model.head.bn.eps == new_head(trunk, 4, 0).bn.eps
    prep = preprocessing_for(model.config, trunk_dir)
    for path in sorted((colours / "val" / "blue").iterdir())[:2]:
        x = mx.array(prep(path)[None])
        np.testing.assert_allclose(np.asarray(model(x)), np.asarray(with_head(x)), rtol=1e-5, atol=1e-6)

    assert probe.main(["eval", "--head", str(out), "--data", str(colours), "--no-progress", "--json"]) == 0
    val = last_json(capsys.readouterr().out)["val"]
    assert val["top1"] == summary["val"]["top1"] and val["per_class"] == summary["val"]["per_class"]

    assert classify.main(["--model", str(out / "model"), "--top-k", "2", "--no-progress", "--json",
                          str(colours / "val" / "red")]) == 0
    predictions = last_json(capsys.readouterr().out)["predictions"]
    assert len(predictions) == 4 and all(p["top_k"][0]["label"] == "red" for p in predictions)


def test_demo_classifies_the_samples_with_the_probe_folder(probe_dir):
    out, _ = probe_dir
    done = run_script("scripts/demo.py", "--model", out / "model", "--top-k", 3, "--json", timeout=120)
    result = last_json(done.stdout)
    assert len(result["predictions"]) == len(sample_images())
    for prediction in result["predictions"]:
        assert {t["label"] for t in prediction["top_k"]} <= set(COLOURS) and len(prediction["top_k"]) == 3


def test_a_trunk_without_probe_says_how_to_train_one(trunk_dir, tmp_path, capsys, monkeypatch):
    samples = [str(p) for p in sample_images()]
    assert classify.main(["--model", str(trunk_dir), "--no-progress", *samples]) == 2
    err = capsys.readouterr().err
    assert "Apple released no AIMv2 heads" in err and f"probe train --model {trunk_dir}" in err
    assert "--model OUT/model" in err
    assert demo.main(["--model", str(trunk_dir), "--no-progress"]) == 2
    assert "Apple released no AIMv2 heads" in capsys.readouterr().err
    # A released name is refused before anything is downloaded or loaded: no AIMv2 checkpoint holds a head.
    monkeypatch.setattr(demo, "classify_and_report", lambda *a, **k: pytest.fail("tried to load the model"))
    for name in ("aimv2-large-patch14-224", "apple/aimv2-1b-patch14-336"):
        assert demo.main(["--model", name]) == 2
        err = capsys.readouterr().err
        assert "Apple released no AIMv2 heads" in err and f"probe train --model {name}" in err


# ----------------------------------------------------------------------------------------------------
# max_patches: one default, one option


def test_max_patches_default_is_defined_once():
    import mlx_aim.data.preprocessing as preprocessing

    assert preprocessing.MAX_PATCHES is MAX_PATCHES
    assert AIMv2Config().max_patches == Preprocessing.aimv2_native().max_patches == MAX_PATCHES
    assert preprocessing_for(get_config("aimv2-large-patch14-native")).max_patches == MAX_PATCHES


def test_max_patches_option(tmp_path, colours, capsys):
    native = make_model_folder(tmp_path / "native", config=native_config())
    fixed = make_model_folder(tmp_path / "fixed", config=fixed_config())
    model = open_model(native, max_patches=30)
    assert model.config.max_patches == 30 and preprocessing_for(model.config, native).max_patches == 30
    assert open_model(native).config.max_patches == MAX_PATCHES
    with pytest.raises(ValueError, match="native-resolution models"):
        open_model(fixed, max_patches=30)

    # Images of more than 30 patches (4-pixel patches: past 20x24 pixels or so) are skipped and listed.
    red = sorted((colours / "train" / "red").iterdir())
    grids = [preprocessing_for(native_config()).grid(*np.asarray(load_image(p)).shape[:2]) for p in red]
    small = sum(rows * cols <= 30 for rows, cols in grids)
    assert 0 < small < len(red)
    assert classify.main(["--model", str(native), "--max-patches", "30", "--no-progress", "--json",
                          str(colours / "train" / "red")]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["num_images"] == small and summary["num_skipped"] == len(red) - small
    assert all("max_patches=30" in s["reason"] for s in summary["skipped"])
    assert extract_features.main(["--model", str(native), "--out", str(tmp_path / "f"), "--features", "tokens",
                                  "--max-patches", "30", "--no-progress", "--json",
                                  str(colours / "train" / "red")]) == 0
    assert last_json(capsys.readouterr().out)["num_images"] == small

    assert classify.main(["--model", str(fixed), "--max-patches", "30", "--no-progress", str(red[0])]) == 2
    assert "native-resolution models" in capsys.readouterr().err


def test_demo_refuses_max_patches_without_a_model(capsys):
    with pytest.raises(SystemExit) as refused:
        demo.main(["--max-patches", "9"])
    assert refused.value.code == 2 and "--max-patches" in capsys.readouterr().err


def test_new_head_matches_the_trunk_head_on_both_families():
    from probe_helpers import probe_config

    for config in (probe_config(), native_config(), fixed_config()):
        model = build_model(config, seed=0)  # a trunk: the eps is that of the head a probed model loads into
        assert new_head(model, 3, seed=0).bn.eps == build_model(config, probe=True).head.bn.eps
