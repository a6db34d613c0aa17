"""classify and extract_features, from the command line and in-process, on tiny random-weight models."""

import json
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from PIL import Image

import mlx_aim
from mlx_aim.data import (
    Preprocessing, Skipped, eval_transform, gather_images, imagenet_classes, iter_image_batches, preprocessing_for,
)
from mlx_aim.tasks.classify import classify
from mlx_aim.tasks.encode import peak_memory
from mlx_aim.tasks.features import extract_features, load_features
from mlx_aim.tasks.inference import open_model
from mlx_aim.tasks.shards import RaggedTokens
from mlx_aim.models.model import build_model
from conftest import TWIN_TOLERANCE, dequantized_twin, last_json, rel_err, run_script
from probe_helpers import make_model_folder, native_config, save_image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three good images of different sizes and modes, in a folder tree."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    save_image(root / "a" / "rgb.png", rng.integers(0, 256, (20, 31, 3), dtype=np.uint8))
    save_image(root / "a" / "gray.png", rng.integers(0, 256, (40, 17), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 256, (24, 24, 4), dtype=np.uint8), "RGBA").save(root / "b.png")
    return root


def make_bad_inputs(root):
    """Each bad input the issue lists; returns {path: what it is}."""
    root.mkdir(parents=True, exist_ok=True)
    bad = {}
    (root / "not_image.jpg").write_text("this is text, not a JPEG")
    bad[root / "not_image.jpg"] = "non-image"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(root / "full.jpg", quality=90)
    data = (root / "full.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "full.jpg").unlink()
    bad[root / "truncated.jpg"] = "truncated"
    save_image(root / "tiny.png", np.zeros((1, 1, 3), np.uint8))
    bad[root / "tiny.png"] = "1x1"
    side = int(Image.MAX_IMAGE_PIXELS ** 0.5) + 100  # 1-bit, so small on disk and in memory
    Image.new("1", (side, side)).save(root / "bomb.png")
    bad[root / "bomb.png"] = "decompression bomb"
    return bad


def reference_top_k(model, paths, k):
    x = mx.array(np.stack([eval_transform(p, model.config.image_size) for p in paths]))
    probs = np.asarray(mx.softmax(model(x), axis=-1))
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return order, np.take_along_axis(probs, order, axis=-1)


def test_classify_cli_matches_the_model(model_dir, images):
    result = run_script("scripts/classify.py", "--model", model_dir, "--top-k", 3, "--batch-size", 2, "--json", images)
    summary = last_json(result.stdout)
    paths = sorted(p for p in images.rglob("*.png"))
    assert summary["num_images"] == 3 and summary["num_skipped"] == 0
    assert [p["path"] for p in summary["predictions"]] == [str(p) for p in paths]
    order, probs = reference_top_k(mlx_aim.load(model_dir), paths, 3)
    names = imagenet_classes()
    for pred, idx, prob in zip(summary["predictions"], order, probs):
        assert [t["index"] for t in pred["top_k"]] == idx.tolist()
        assert [t["label"] for t in pred["top_k"]] == [names[i] for i in idx]  # 1000 classes: ImageNet names
        np.testing.assert_allclose([t["probability"] for t in pred["top_k"]], prob, rtol=1e-5)
        # The readable line for the image, above the JSON.
        assert f"{pred['path']}: {names[idx[0]]} (" in result.stdout
    assert summary["peak_rss_bytes"] > 10 * 2**20 and summary["images_per_second"] > 0
    assert "peak memory:" in result.stdout


def test_classify_and_extract_skip_bad_inputs(model_dir, images, tmp_path):
    bad = make_bad_inputs(tmp_path / "bad")
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "missing.png"
    inputs = [images, tmp_path / "bad", empty, missing]
    result = run_script("scripts/classify.py", "--model", model_dir, "--json", *inputs)
    summary = last_json(result.stdout)
    assert summary["num_images"] == 3
    skipped = {item["path"]: item["reason"] for item in summary["skipped"]}
    assert set(skipped) == {str(p) for p in bad} | {str(empty), str(missing)}
    assert "decompression-bomb" in skipped[str(tmp_path / "bad" / "bomb.png")]
    assert "1x1" in skipped[str(tmp_path / "bad" / "tiny.png")]
    assert "no such file" in skipped[str(missing)]
    assert "holds no image files" in skipped[str(empty)]
    assert f"skipped {len(skipped)} input(s):" in result.stdout  # listed at the end, one line each
    for path in skipped:
        assert f"  {path}: " in result.stdout
    # The same inputs through extract_features: the good images are kept, the rest listed.
    result = run_script("scripts/extract_features.py", "--model", model_dir, "--out", tmp_path / "feats", "--json",
                        *inputs)
    summary = last_json(result.stdout)
    assert summary["num_images"] == 3 and {s["path"] for s in summary["skipped"]} == set(skipped)
    # Nothing usable: a non-zero exit, with every input still named.
    result = run_script("scripts/classify.py", "--model", model_dir, "--json", tmp_path / "bad", missing, check_rc=1)
    assert last_json(result.stdout)["num_images"] == 0 and str(missing) in result.stdout


def test_classify_refuses_a_model_without_trained_head(tmp_path, images):
    trunk = make_model_folder(tmp_path / "trunk", with_head=False)
    result = run_script("scripts/classify.py", "--model", trunk, images, check_rc=2)
    assert "no trained classification head" in result.stderr
    assert f"mlx-aim probe train --model {trunk} --data DIR --out OUT" in result.stderr
    result = run_script("scripts/classify.py", "--model", tmp_path / "nowhere", images, check_rc=2)
    assert "nowhere" in result.stderr


def test_classify_with_a_probe_head_file(tmp_path, images, capsys):
    """classify --head FILE on a trunk: the model `load(trunk, head=FILE)` gives, named by the probe.json beside."""
    from mlx_aim.cli import classify as classify_cli
    from mlx_aim.models.layers import AttentionProbe
    from mlx_aim.training.probe import save_head

    trunk = make_model_folder(tmp_path / "trunk", with_head=False)
    mx.random.seed(3)
    (tmp_path / "probe").mkdir()
    head = save_head(tmp_path / "probe" / "head.safetensors", AttentionProbe(64, 2, 3), [1, 2])
    (tmp_path / "probe" / "probe.json").write_text(json.dumps({"classes": ["red", "green", "blue"]}))
    assert classify_cli.main(["--model", str(trunk), "--head", str(head), "--top-k", "3", "--json", "--no-progress",
                              str(images)]) == 0
    summary = last_json(capsys.readouterr().out)
    paths = sorted(p for p in images.rglob("*.png"))
    order, probs = reference_top_k(mlx_aim.load(trunk, head=head), paths, 3)
    assert summary["head"] == str(head) and summary["num_images"] == 3
    for pred, idx, prob in zip(summary["predictions"], order, probs):
        assert [t["label"] for t in pred["top_k"]] == [["red", "green", "blue"][i] for i in idx]
        np.testing.assert_allclose([t["probability"] for t in pred["top_k"]], prob, rtol=1e-5)


def test_dtype_and_quantize_pass_through(model_dir, images):
    result = run_script("scripts/classify.py", "--model", model_dir, "--dtype", "bfloat16", "--quantize", "4", "--json",
                        images)
    summary = last_json(result.stdout)
    assert summary["dtype"] == "bfloat16" and summary["quantization"] == {"bits": 4, "group_size": 64}
    model = open_model(model_dir, quantize=8)
    assert isinstance(model.trunk.blocks[0].mlp.fc1, nn.QuantizedLinear)
    x = mx.random.normal((2, model.config.image_size, model.config.image_size, 3))
    twin = dequantized_twin(model)  # what the 8-bit trunk must compute: its dequantized weights, in float
    assert rel_err(np.array(model.extract_features(x)[0]), np.array(twin.extract_features(x)[0])) < TWIN_TOLERANCE[
        "float32"]


def test_random_init_is_seeded_and_keeps_the_architecture(model_dir):
    loaded = open_model(model_dir)
    a = open_model(model_dir, random_init=True, seed=1)
    b = open_model(model_dir, random_init=True, seed=1)
    c = open_model(model_dir, random_init=True, seed=2)
    assert a.config.to_dict() == loaded.config.to_dict() and isinstance(a, mlx_aim.AIMEncoder)  # no probe head
    w = lambda m: np.asarray(m.trunk.blocks[1].attn.qkv.weight)  # noqa: E731
    assert np.array_equal(w(a), w(b)) and not np.array_equal(w(a), w(c)) and not np.array_equal(w(a), w(loaded))
    preset = open_model("aim-tiny", random_init=True, seed=0)  # a preset: built from its config, no download
    assert preset.config.width == 192 and preset.config.image_size == 64


def test_extract_features_cli_rows_match_the_model_and_resume(model_dir, images, tmp_path):
    out = tmp_path / "feats"
    args = ["--model", model_dir, "--out", out, "--features", "both", "--shard-size", 2, "--batch-size", 2, "--json"]
    summary = last_json(run_script("scripts/extract_features.py", *args, images).stdout)
    assert summary["num_images"] == 3 and summary["num_shards"] == 2 and summary["shards_reused"] == 0
    index = json.loads((out / "index.json").read_text())
    assert [s["start"] for s in index["shards"]] == [0, 2]
    embeddings, paths = load_features(out, "embedding")
    tokens, token_paths = load_features(out, "tokens")
    assert paths == token_paths == ["a/gray.png", "a/rgb.png", "b.png"]  # rows -> files, relative to the folder
    model = mlx_aim.load(model_dir)
    x = mx.array(np.stack([eval_transform(images / p, 16) for p in paths]))
    np.testing.assert_allclose(embeddings, np.asarray(model.embed(x)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tokens, np.asarray(model.probe_features(x)), rtol=1e-5, atol=1e-6)
    assert tokens.shape == (3, 16, 64) and embeddings.dtype == np.float32

    # A re-run skips finished shards; a shard whose marker is gone (an interrupted run) is redone.
    first = out / "shard-00000.embedding.npy"
    before = first.stat().st_mtime_ns
    (out / "shard-00001.json").unlink()
    os.remove(out / "shard-00001.tokens.npy")
    summary = last_json(run_script("scripts/extract_features.py", *args, images).stdout)
    assert summary["shards_reused"] == 1 and summary["num_processed_now"] == 1 and summary["num_images"] == 3
    assert first.stat().st_mtime_ns == before
    np.testing.assert_array_equal(load_features(out, "tokens")[0], tokens)
    # Other settings into the same folder: refused, naming what differs.
    result = run_script("scripts/extract_features.py", *args[:-1], "--save-dtype", "float16", images, check_rc=2)
    assert "dtype" in result.stderr and "--overwrite" in result.stderr


def test_extract_features_safetensors_and_untrained_head(tmp_path, images):
    trunk = make_model_folder(tmp_path / "trunk", with_head=False)
    model = mlx_aim.load(trunk)
    with pytest.raises(ValueError, match="no trained classification head.*--features tokens"):
        extract_features(model, [images], tmp_path / "f0", progress=False)
    result = extract_features(model, [images], tmp_path / "f1", features="tokens", file_format="safetensors",
                              save_dtype="float16", progress=False)
    assert result.index["num_rows"] == 3 and (tmp_path / "f1" / "shard-00000.safetensors").exists()
    tokens, paths = load_features(tmp_path / "f1", "tokens")
    assert tokens.dtype == np.float16 and tokens.shape == (3, 16, 64)
    x = mx.array(np.stack([eval_transform(images / p, 16) for p in paths]))
    np.testing.assert_allclose(tokens, np.asarray(model.probe_features(x)), rtol=2e-3, atol=2e-3)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_batches_keep_order_and_skip_bad_files(images, tmp_path):
    bad = make_bad_inputs(tmp_path / "bad")
    skipped = Skipped()
    paths = gather_images([images, tmp_path / "bad"], skipped)
    assert len(paths) == 3 + len(bad) and not skipped
    got = []
    for batch, batch_paths, _ in iter_image_batches(paths, lambda p: eval_transform(p, 16), 2, skipped,
                                                    num_workers=2):
        assert batch.shape[1:] == (16, 16, 3) and len(batch) <= 2
        got += batch_paths
    assert got == [p for p in paths if p not in bad]
    assert {path for path, _ in skipped.items} == {str(p) for p in bad}


def test_peak_memory_is_in_bytes():
    memory = peak_memory()
    # This process holds Python, numpy and MLX: tens of MiB. Reading KiB as bytes would give ~100 KB.
    assert 20 * 2**20 < memory["peak_rss_bytes"] < 64 * 2**30
    assert memory["peak_mlx_bytes"] >= 0


def test_probe_layers_option_parses_and_explains(capsys):
    import argparse

    from mlx_aim.cli.options import add_inference_options

    parser = argparse.ArgumentParser()
    add_inference_options(parser)
    assert parser.parse_args(["--probe-layers", "1,2"]).probe_layers == [1, 2]
    assert parser.parse_args(["--probe-layers", "last"]).probe_layers == "last"
    with pytest.raises(SystemExit):
        parser.parse_args(["--probe-layers", "1-2"])
    assert "comma-separated block indices" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Native resolution: images keep their own size, batched by patch grid


@pytest.fixture(scope="module")
def native_model():
    return build_model(native_config(), seed=0, probe=True)  # a random probe, composed on, stands in for a trained one


@pytest.fixture(scope="module")
def mixed_images(tmp_path_factory):
    """Images of several sizes in no order of size: grids (rows x cols, 4-pixel patches) 4x4, 3x5, 5x3, 4x4 (after
    flooring 17x18), 3x5, 2x6, 4x4."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(16, 16), (12, 20), (20, 12), (17, 18), (13, 23), (8, 24), (16, 16)]):
        save_image(root / f"{i:02d}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return root


def one_by_one(model, paths, fn):
    """`fn` of each image alone (a batch of one), with the model's native preprocessing."""
    prep = preprocessing_for(model.config)
    return [np.asarray(fn(mx.array(prep(p)[None])))[0] for p in paths]


def test_classify_native_groups_grids_and_keeps_input_order(native_model, mixed_images):
    paths = sorted(mixed_images.glob("*.png"))
    result = classify(native_model, [mixed_images], top_k=3, batch_size=2, progress=False)
    assert [p["path"] for p in result.predictions] == [str(p) for p in paths]
    probs = one_by_one(native_model, paths, lambda x: mx.softmax(native_model(x), axis=-1))
    for prediction, expected in zip(result.predictions, probs):
        top = [t["index"] for t in prediction["top_k"]]
        assert top == np.argsort(-expected, kind="stable")[:3].tolist()
        np.testing.assert_allclose([t["probability"] for t in prediction["top_k"]], expected[top], rtol=1e-5)
    # An image past the model's max_patches is skipped and listed; the others go on.
    strict = preprocessing_for(native_config().replace(max_patches=15))
    result = classify(native_model, [mixed_images], batch_size=3, progress=False, preprocessing=strict)
    assert [p["path"] for p in result.predictions] == [str(paths[i]) for i in (1, 2, 4, 5)]
    assert [p for p, _ in result.skipped.items] == [str(paths[i]) for i in (0, 3, 6)]
    assert "4x4 patch grid" in result.skipped.items[0][1] and "max_patches=15" in result.skipped.items[0][1]


@pytest.mark.parametrize("file_format", ["npy", "safetensors"])
def test_extract_features_native_stores_ragged_tokens(native_model, mixed_images, tmp_path, file_format):
    paths = sorted(mixed_images.glob("*.png"))
    result = extract_features(native_model, [mixed_images], tmp_path / "f", features="both", shard_size=4,
                              batch_size=2, file_format=file_format, progress=False)
    index = result.index
    assert index["tokens_layout"] == "ragged" and index["tokens_shape"] == [None, 64] and index["image_size"] is None
    assert index["preprocessing"] == preprocessing_for(native_model.config).settings()
    assert [s["grids"] for s in index["shards"]] == [[[4, 4], [3, 5], [5, 3], [4, 4]], [[3, 5], [2, 6], [4, 4]]]
    tokens, token_paths = load_features(tmp_path / "f", "tokens")
    embeddings, paths_read = load_features(tmp_path / "f", "embedding")
    assert token_paths == paths_read == [p.name for p in paths]
    assert isinstance(tokens, RaggedTokens) and len(tokens) == 7 and tokens.tokens.shape == (16 * 3 + 15 * 3 + 12, 64)
    expected_tokens = one_by_one(native_model, paths, native_model.probe_features)
    for i, expected in enumerate(expected_tokens):
        assert tokens[i].shape == expected.shape == (np.prod(tokens.grids[i]), 64)
        np.testing.assert_allclose(tokens[i], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tokens.take([0, 3, 6]), np.stack([expected_tokens[i] for i in (0, 3, 6)]),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="different grids"):
        tokens.take([0, 1])
    assert list(tokens.by_grid()) == [(4, 4), (3, 5), (5, 3), (2, 6)] and tokens.by_grid()[(3, 5)].tolist() == [1, 4]
    expected_embeddings = one_by_one(native_model, paths, native_model.embed)
    assert embeddings.shape == (7, 64)
    np.testing.assert_allclose(embeddings, np.stack(expected_embeddings), rtol=1e-5, atol=1e-6)
    # A re-run reuses the finished shards.
    again = extract_features(native_model, [mixed_images], tmp_path / "f", features="both", shard_size=4,
                             batch_size=2, file_format=file_format, progress=False)
    assert again.shards_reused == 2


def test_extract_features_records_the_preprocessing_and_refuses_another(model_dir, images, tmp_path):
    model = mlx_aim.load(model_dir)
    first = extract_features(model, [images], tmp_path / "f", features="tokens", progress=False)
    assert first.index["preprocessing"] == Preprocessing.aim_v1(16).settings()
    assert "tokens_layout" not in first.index and first.index["tokens_shape"] == [16, 64]  # v1's layout, unchanged
    other = Preprocessing(resize=16, crop_size=(16, 16))
    with pytest.raises(ValueError, match="differs in preprocessing"):
        extract_features(model, [images], tmp_path / "f", features="tokens", progress=False, preprocessing=other)
