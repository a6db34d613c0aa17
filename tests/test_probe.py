"""Attentive probe training and evaluation on a frozen tiny trunk: accuracy on a separable generated task,
exact resume, the saved head's layout, metrics, bad inputs, and the command line end to end."""

import json
import math
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_aim
from mlx_aim.data import PREPROCESSOR_CONFIG, ImageFolder, Preprocessing, eval_transform, preprocessing_for
from mlx_aim.tasks.shards import RaggedTokens
from mlx_aim.models.model import build_model
from mlx_aim.training.probe import (
    FeatureSet, ProbeConfig, compute_features, epoch_batches, evaluate, load_head, new_head, probe_forward,
    train_probe,
)
from mlx_aim.training.runs import TrainingDiverged, read_log
from conftest import last_json, run_script
from probe_helpers import COLOURS, make_colour_folder, make_model_folder, native_config, probe_config, save_image

APPLE_HEAD_KEYS = {"head.k.weight", "head.v.weight", "head.cls_token", "head.linear.weight",
                   "head.bn.running_mean", "head.bn.running_var"}
FAST = dict(batch_size=16, lr=3e-3, eval_batch_size=32, log_interval=5)


def _samples(root):
    return ImageFolder(root / "train").samples


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_folder(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module")
def trunk():
    return build_model(probe_config(), seed=0)


def test_probe_reaches_full_train_accuracy_on_a_separable_task(trunk, colours):
    result = train_probe(trunk, colours, config=ProbeConfig(epochs=20, cache="memory", **FAST), progress=False)
    assert result.steps == 20 * (4 * 12 // 16)
    assert result.metrics["train"]["top1"] >= 0.98 and result.metrics["val"]["top1"] >= 0.9
    assert np.mean(result.losses[-5:]) < 0.2 * result.losses[0]
    per_class = result.metrics["val"]["per_class"]
    assert list(per_class) == sorted(COLOURS) and all(v["count"] == 4 for v in per_class.values())
    # BatchNorm: trained on batch statistics, its running statistics now track the features' moments.
    features = compute_features(trunk, _samples(colours), dtype="float32", progress=False).features
    scale = features.std(axis=(0, 1))
    np.testing.assert_allclose(np.asarray(result.head.bn.running_mean), features.mean(axis=(0, 1)),
                               atol=0.2 * scale.max())
    np.testing.assert_allclose(np.asarray(result.head.bn.running_var), features.var(axis=(0, 1)), rtol=0.3)
    assert not result.head.training


@pytest.mark.parametrize("augment", [False, True])
def test_resumed_run_continues_exactly(trunk, colours, tmp_path, augment):
    config = ProbeConfig(epochs=3, augment=augment, ckpt_interval=4, **FAST)
    full = train_probe(trunk, colours, tmp_path / "full", config, progress=False)
    first = train_probe(trunk, colours, tmp_path / "parts", config, stop_at=5, progress=False)
    assert first.steps == 5 and not (tmp_path / "parts" / "head.safetensors").exists()  # not finished yet
    state = json.loads((tmp_path / "parts" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5 and len(state["losses"]) == 5
    rest = train_probe(trunk, colours, tmp_path / "parts", config, resume=True, progress=False)
    assert full.losses == first.losses + rest.losses  # bitwise: same data order, optimizer state, BN stats
    for key in ("k.weight", "cls_token", "linear.weight", "bn.running_var"):
        a = dict(tree_flatten(full.head.parameters()))[key]
        b = dict(tree_flatten(rest.head.parameters()))[key]
        assert np.array_equal(np.asarray(a), np.asarray(b)), key
    assert full.metrics["val"] == rest.metrics["val"]
    info = json.loads((tmp_path / "parts" / "probe.json").read_text())
    assert info["steps"] == info["total_steps"] == full.steps
    assert read_log(tmp_path / "parts") == read_log(tmp_path / "full")  # steps 5 and 9: a slice ends on a record


def test_resume_refuses_other_settings_and_overwrites_only_with_force(trunk, colours, tmp_path):
    config = ProbeConfig(epochs=1, **FAST)
    train_probe(trunk, colours, tmp_path, config, progress=False)
    with pytest.raises(FileExistsError, match="resume"):
        train_probe(trunk, colours, tmp_path, config, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train_probe(trunk, colours, tmp_path, ProbeConfig(epochs=1, **dict(FAST, lr=1e-2)), resume=True,
                    progress=False)
    other_trunk = build_model(probe_config(), seed=5)
    with pytest.raises(ValueError, match="cannot resume"):
        train_probe(other_trunk, colours, tmp_path, config, resume=True,
                    trunk={"source": "elsewhere"}, progress=False)
    # Runtime settings (intervals, workers) may change; a finished run resumes to its outputs.
    done = train_probe(trunk, colours, tmp_path, ProbeConfig(epochs=1, **dict(FAST, log_interval=3)), resume=True,
                       progress=False)
    assert done.losses == [] and done.steps == done.total_steps
    train_probe(trunk, colours, tmp_path, config, force=True, progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(trunk, colours, tmp_path, monkeypatch):
    import mlx_aim.training.probe as probe_module

    calls = {"n": 0}
    real = probe_module.TrainTransform

    class PoisonAfter(real):
        def __call__(self, image, rng):
            calls["n"] += 1
            out = super().__call__(image, rng)
            return out * np.nan if calls["n"] > 4 * 16 else out  # from the 5th batch on

    monkeypatch.setattr(probe_module, "TrainTransform", PoisonAfter)
    config = ProbeConfig(epochs=3, augment=True, ckpt_interval=2, num_workers=0, **FAST)
    with pytest.raises(TrainingDiverged, match="step 5") as caught:
        train_probe(trunk, colours, tmp_path, config, progress=False)
    assert caught.value.step == 5 and math.isnan(caught.value.value)
    assert caught.value.checkpoint == tmp_path / "checkpoint" and str(tmp_path / "checkpoint") in str(caught.value)
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 4
    assert not (tmp_path / "head.safetensors").exists()


@pytest.mark.parametrize("training", [False, True])
def test_probe_forward_equals_the_attention_probe(trunk, training):
    head = new_head(trunk, 5, seed=1)
    head.bn.running_mean = mx.random.normal((64,))
    head.bn.running_var = mx.random.uniform(0.5, 2.0, (64,))
    head.train(training)
    x = mx.random.normal((6, 16, 64)) * 3 + 1
    for fast, layer in zip(probe_forward(head, x), head(x)):
        np.testing.assert_allclose(np.asarray(fast), np.asarray(layer), rtol=1e-5, atol=1e-5)
    grads = [nn.value_and_grad(head, lambda h, x: (f(h, x)[0] ** 2).sum())(head, x)[1]
             for f in (probe_forward, lambda h, x: h(x))]
    for (key, a), (_, b) in zip(tree_flatten(grads[0]), tree_flatten(grads[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=key)


def test_evaluate_metrics_match_numpy(trunk):
    rng = np.random.default_rng(0)
    classes = [f"c{i}" for i in range(7)]
    data = FeatureSet(rng.normal(size=(50, 16, 64)).astype(np.float32), rng.integers(0, 6, 50), [""] * 50)
    head = new_head(trunk, len(classes), seed=3)
    head.eval()
    metrics = evaluate(head, data, classes, batch_size=8)
    logits = np.asarray(head(mx.array(data.features))[0])
    top = np.argsort(-logits, axis=1)
    y = data.labels
    assert metrics["top1"] == pytest.approx(np.mean(top[:, 0] == y))
    assert metrics["top5"] == pytest.approx(np.mean((top[:, :5] == y[:, None]).any(axis=1)))
    shifted = logits - logits.max(axis=1, keepdims=True)
    nll = np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(50), y]
    assert metrics["loss"] == pytest.approx(nll.mean(), rel=1e-5)
    for i, name in enumerate(classes):
        members = y == i
        got = metrics["per_class"][name]
        assert got["count"] == members.sum()
        if members.any():
            assert got["accuracy"] == pytest.approx(np.mean(top[members, 0] == i))
        else:
            assert got["accuracy"] is None  # class 6 has no images: left out of the mean
    present = [np.mean(top[y == i, 0] == i) for i in range(6) if (y == i).any()]
    assert metrics["mean_per_class_accuracy"] == pytest.approx(np.mean(present))


def test_bad_training_files_are_skipped_and_listed(trunk, colours, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(colours, data)
    (data / "train" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    save_image(data / "val" / "blue" / "dot.png", np.zeros((1, 1, 3), np.uint8))
    result = train_probe(trunk, data, tmp_path / "out", ProbeConfig(epochs=1, **FAST), progress=False)
    assert {p for p, _ in result.skipped.items} == {str(data / "train" / "red" / "broken.png"),
                                                     str(data / "val" / "blue" / "dot.png")}
    assert result.metrics["train"]["num_images"] == 48 and result.metrics["val"]["num_images"] == 16
    info = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert len(info["skipped"]) == 2


def test_feature_cache_on_disk_is_reused_and_float16_overflow_is_refused(trunk, colours, tmp_path):
    samples = _samples(colours)[:6]
    first = compute_features(trunk, samples, cache_file=tmp_path / "c.npy", progress=False)
    stamp = (tmp_path / "c.npy").stat().st_mtime_ns
    again = compute_features(trunk, samples, cache_file=tmp_path / "c.npy", progress=False)
    assert (tmp_path / "c.npy").stat().st_mtime_ns == stamp and np.array_equal(first.features, again.features)
    x = mx.array(np.stack([eval_transform(p, 16) for p, _ in samples]))
    np.testing.assert_allclose(first.features, np.asarray(trunk.probe_features(x)), rtol=2e-3, atol=2e-3)
    other = compute_features(trunk, samples[:5], cache_file=tmp_path / "c.npy", progress=False)  # other samples
    assert len(other) == 5 and (tmp_path / "c.npy").stat().st_mtime_ns != stamp
    loud = build_model(probe_config(), seed=0)
    loud.trunk.blocks[0].mlp.fc2.weight = loud.trunk.blocks[0].mlp.fc2.weight * 1e6
    with pytest.raises(ValueError, match="float16"):
        compute_features(loud, samples, progress=False)


def test_probe_cli_train_eval_classify(tmp_path, colours):
    trunk_dir = make_model_folder(tmp_path / "trunk", with_head=False)  # a pre-training export
    out = tmp_path / "probe"
    result = run_script("scripts/probe.py", "train", "--model", trunk_dir, "--data", colours, "--out", out,
                        "--epochs", 15, "--batch-size", 16, "--lr", "3e-3", "--json")
    summary = last_json(result.stdout)
    assert summary["train"]["top1"] >= 0.95 and summary["classes"] == sorted(COLOURS)
    assert "val: top-1" in result.stdout and "peak memory:" in result.stdout and summary["peak_rss_bytes"] > 0

    # The head file holds exactly Apple's head keys; it and the model folder load back.
    head = mx.load(str(out / "head.safetensors"))
    assert set(head) == APPLE_HEAD_KEYS and head["head.linear.weight"].shape == (4, 64)
    info = json.loads((out / "probe.json").read_text())
    assert info["probe_layers"] == [1, 2] and info["trunk"]["source"] == str(trunk_dir)
    model = mlx_aim.load(out / "model")
    assert type(model) is mlx_aim.AIM and model.config.num_classes == 4  # the trunk with its trained head
    trunk = mlx_aim.load(trunk_dir)
    x = mx.array(np.stack([eval_transform(p, 16) for p in sorted((colours / "val" / "red").iterdir())]))
    with_head = mlx_aim.with_probe(trunk, load_head(out / "head.safetensors", trunk))
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(with_head(x)), rtol=1e-5, atol=1e-6)

    evaluated = run_script("scripts/probe.py", "eval", "--head", out, "--data", colours, "--json")
    val = last_json(evaluated.stdout)["val"]  # float32 features here, float16-cached ones in training
    assert val["top1"] == summary["val"]["top1"] and val["per_class"] == summary["val"]["per_class"]
    assert val["loss"] == pytest.approx(summary["val"]["loss"], rel=1e-3)

    # classify reads the probe's classes from the model folder.
    classified = run_script("scripts/classify.py", "--model", out / "model", "--top-k", 2, "--json",
                            colours / "val" / "red")
    predictions = last_json(classified.stdout)["predictions"]
    assert len(predictions) == 4 and all(p["top_k"][0]["label"] == "red" for p in predictions)


def test_probe_cli_random_init_baseline_and_errors(tmp_path, colours):
    trunk_dir = make_model_folder(tmp_path / "trunk", with_head=False)
    out = tmp_path / "random"
    result = run_script("scripts/probe.py", "train", "--model", trunk_dir, "--data", colours, "--out", out,
                        "--random-init", "--seed", 4, "--epochs", 2, "--batch-size", 16, "--json")
    assert last_json(result.stdout)["random_init"] is True
    info = json.loads((out / "probe.json").read_text())
    assert info["trunk"]["random_init"] and info["trunk"]["seed"] == 4
    # The random trunk is saved with the head, so the baseline can be evaluated and reproduced.
    saved = mlx_aim.load(out / "model")
    fresh = build_model(saved.config, seed=4)
    assert np.array_equal(np.asarray(saved.trunk.blocks[0].attn.qkv.weight),
                          np.asarray(fresh.trunk.blocks[0].attn.qkv.weight))
    again = run_script("scripts/probe.py", "train", "--model", trunk_dir, "--data", colours, "--out", out,
                       "--random-init", "--seed", 4, "--epochs", 2, "--batch-size", 16, check_rc=2)
    assert "--resume" in again.stderr
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    failed = run_script("scripts/probe.py", "train", "--model", trunk_dir, "--data", empty, "--out", tmp_path / "x",
                        check_rc=2)
    assert str(empty / "a") in failed.stderr


# ----------------------------------------------------------------------------------------------------
# A native-resolution trunk: every image keeps its own patch grid


@pytest.fixture(scope="module")
def native_trunk():
    return build_model(native_config(), seed=0)


def test_native_features_are_ragged_in_sample_order(native_trunk, colours, tmp_path):
    samples = _samples(colours)  # 16 to 39 pixels a side: many grids
    features = compute_features(native_trunk, samples, batch_size=8, dtype="float32", progress=False,
                                cache_file=tmp_path / "c.npy")
    ragged = features.features
    assert isinstance(ragged, RaggedTokens) and len(ragged) == len(samples) and len(ragged.by_grid()) > 10
    assert features.paths == [str(p) for p, _ in samples] and features.labels.tolist() == [l for _, l in samples]
    prep = preprocessing_for(native_trunk.config)
    for i in (0, 17, len(samples) - 1):
        image = prep(samples[i][0])
        assert ragged.grids[i] == (image.shape[0] // 4, image.shape[1] // 4)
        expected = np.asarray(native_trunk.probe_features(mx.array(image[None])))[0]
        np.testing.assert_allclose(ragged[i], expected, rtol=1e-5, atol=1e-6)
    # Read back from the cache: the same rows and grids; other preprocessing is another cache entry.
    again = compute_features(native_trunk, samples, batch_size=8, dtype="float32", progress=False,
                             cache_file=tmp_path / "c.npy")
    assert again.features.grids == ragged.grids and np.array_equal(again.features.tokens, ragged.tokens)
    info = json.loads((tmp_path / "c.json").read_text())
    assert info["preprocessing"] == prep.settings() and len(info["grids"]) == len(samples)
    # Images of one size give the plain (n, N, D) array a fixed-size trunk gives.
    uniform = tmp_path / "uniform"
    for i in range(3):
        save_image(uniform / f"{i}.png", np.full((20, 13, 3), 60 * i, np.uint8))
    plain = compute_features(native_trunk, [(uniform / f"{i}.png", 0) for i in range(3)], progress=False)
    assert isinstance(plain.features, np.ndarray) and plain.features.shape == (3, 15, 64)


def test_native_batches_hold_one_grid_and_evaluation_matches_one_by_one(native_trunk, colours):
    samples = _samples(colours)
    features = compute_features(native_trunk, samples, batch_size=8, dtype="float32", progress=False)
    grids = features.features.grids
    batches = epoch_batches(features, 4, seed=3, epoch=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(samples)))  # every row once an epoch
    assert all(len({grids[i] for i in b}) == 1 and 1 <= len(b) <= 4 for b in batches)
    expected_count = sum(-(-len(rows) // 4) for rows in features.features.by_grid().values())
    assert len(batches) == expected_count == len(epoch_batches(features, 4, seed=3, epoch=1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, epoch_batches(features, 4, seed=3, epoch=0)))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, epoch_batches(features, 4, seed=3, epoch=1)))
    # Evaluation over ragged features = each image alone (eval-mode BatchNorm is per token).
    head = new_head(native_trunk, 4, seed=1)
    head.eval()
    metrics = evaluate(head, features, sorted(COLOURS), batch_size=5)
    logits = np.concatenate([np.asarray(probe_forward(head, mx.array(features.features[i][None]))[0])
                             for i in range(len(samples))])
    labels = features.labels
    assert metrics["top1"] == pytest.approx(np.mean(logits.argmax(axis=1) == labels))
    shifted = logits - logits.max(axis=1, keepdims=True)
    loss = np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(labels)), labels])
    assert metrics["loss"] == pytest.approx(loss, rel=1e-4)


def test_native_probe_trains_end_to_end(native_trunk, colours, tmp_path):
    config = ProbeConfig(epochs=15, **FAST)
    result = train_probe(native_trunk, colours, tmp_path / "out", config, progress=False)
    train = compute_features(native_trunk, _samples(colours), batch_size=32, progress=False)
    assert result.steps == 15 * len(epoch_batches(train, 16, config.seed, 0))
    assert result.metrics["train"]["top1"] >= 0.9 and result.metrics["val"]["top1"] >= 0.75
    info = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert Preprocessing.from_dict(info["preprocessing"]) == preprocessing_for(native_trunk.config)
    # The model folder carries the preprocessing, so classifying with it preprocesses alike.
    folder = tmp_path / "out" / "model"
    assert json.loads((folder / PREPROCESSOR_CONFIG).read_text())["do_resize"] is False
    from_folder = preprocessing_for(native_trunk.config, folder)
    assert from_folder == preprocessing_for(native_trunk.config)
    assert from_folder.source == str(folder / PREPROCESSOR_CONFIG)
    with pytest.raises(ValueError, match="fixed image size"):
        train_probe(native_trunk, colours, config=ProbeConfig(epochs=1, augment=True, **FAST), progress=False)
