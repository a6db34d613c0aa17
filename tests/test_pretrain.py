"""The pre-training loop end to end on a tiny model and a small generated dataset: the loss falls, resuming
after a stop or a kill reproduces the uninterrupted run, a NaN stops the run, the trunk exports, and the
visualisation un-normalises predictions with the true patches' statistics."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
import mlx_aim
from conftest import ROOT, last_json, tiny_config
from mlx.utils import tree_flatten
from mlx_aim.data import load_splits
from mlx_aim.models.objective import norm_pix_target, patchify
from mlx_aim.training.runs import TrainingDiverged, read_log
from mlx_aim.data.synthetic import write_image_folder
from mlx_aim.checkpoints.run_folders import list_checkpoints
from mlx_aim.training.pretrain import TrainConfig, load_pretraining_checkpoint, pretrain
from mlx_aim.tasks.visualize import next_patch_predictions, to_uint8

STEPS = 24


def small_config():
    """The tiny config at width 32, depth 2, with a one-block pixel head: quick to pre-train many times."""
    return tiny_config(width=32, depth=2, num_heads=2, head_depth=1, probe_layers=[0, 1])


def recipe(**changes) -> TrainConfig:
    base = dict(steps=STEPS, batch_size=8, lr=2e-3, warmup_frac=0.1, log_interval=1, val_interval=12,
                ckpt_interval=5, keep_last=3, val_images=16, num_workers=2)
    return TrainConfig(**dict(base, **changes))


def train_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(out) if "loss" in r}


def checkpoint_weights(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path / "model.safetensors")).items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("shapes") / "data", num_train=64, num_val=16, image_size=16)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted run that the other tests compare against."""
    out = tmp_path_factory.mktemp("reference") / "run"
    summary = pretrain(small_config(), recipe(), data, out, progress=False, echo=lambda _: None)
    return out, summary


def test_loss_falls_clearly_on_generated_images(reference):
    out, summary = reference
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in range(STEPS - 2, STEPS + 1)])
    assert last < 0.6 * first, losses
    val = [r["val_loss"] for r in read_log(out) if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]
    assert summary["first_loss"] == losses[1] and summary["val_loss"] == val[1]
    assert summary["images_per_s"] > 0
    record = read_log(out)[0]
    assert set(record) == {"step", "loss", "lr", "grad_norm", "images_per_s", "elapsed_s"}
    # Checkpoints every 5 steps and at the end, the last 3 kept, all complete.
    assert [p.name for p in list_checkpoints(out)] == ["step_00000015", "step_00000020", "step_00000024"]
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS


def test_exported_trunk_loads_as_a_trunk(reference):
    out, _ = reference
    model = mlx_aim.load(out / "model")
    assert type(model) is mlx_aim.AIMEncoder and model.config.attention == "bidirectional"
    saved = checkpoint_weights(list_checkpoints(out)[-1])
    np.testing.assert_array_equal(np.array(model.trunk.blocks[1].mlp.fc2.weight),
                                  saved["trunk.blocks.1.mlp.fc2.weight"])
    assert model.probe_features(mx.zeros((2, 16, 16, 3))).shape == (2, 16, 32)
    with pytest.raises(mlx_aim.UntrainedHeadError, match="mlx-aim probe train --model SRC"):
        model(mx.zeros((2, 16, 16, 3)))  # no trained head, no logits: never a random probe's
    pretrained, state = load_pretraining_checkpoint(out)
    assert state["step"] == STEPS and "pixel_head.out_proj.weight" in dict(tree_flatten(pretrained.parameters()))


def test_stop_then_resume_after_a_lost_checkpoint_reproduces_the_run(reference, data, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "run"
    pretrain(small_config(), recipe(), data, out, stop_at=12, progress=False, echo=lambda _: None)
    assert [p.name for p in list_checkpoints(out)] == ["step_00000005", "step_00000010", "step_00000012"]
    # As if killed after step 12's checkpoint began: it never completed, and its temporary folder remains.
    os.rename(out / "checkpoints" / "step_00000012", out / "checkpoints" / ".step_00000012.tmp-dead")
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain(small_config(), recipe(), data, out, progress=False, echo=lambda _: None)
    with pytest.raises(ValueError, match="lr"):
        pretrain(small_config(), recipe(lr=1e-3), data, out, resume=True, progress=False, echo=lambda _: None)
    messages = []
    summary = pretrain(small_config(), recipe(log_interval=1, num_workers=1), data, out, resume=True,
                       progress=False, echo=messages.append)
    assert summary["start_step"] == 10 and "step_00000010" in messages[0]
    assert not list((out / "checkpoints").glob(".step_*"))
    ref, ours = train_losses(ref_out), train_losses(out)
    assert sorted(ours) == list(range(1, STEPS + 1))  # the replayed steps replaced the interrupted ones
    np.testing.assert_allclose([ours[s] for s in sorted(ours)], [ref[s] for s in sorted(ref)], rtol=1e-5)
    final, ref_final = checkpoint_weights(list_checkpoints(out)[-1]), checkpoint_weights(list_checkpoints(ref_out)[-1])
    for key, value in ref_final.items():
        np.testing.assert_allclose(final[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    with pytest.raises(ValueError, match="nothing to resume"):
        pretrain(small_config(), recipe(), data, out, resume=True, progress=False, echo=lambda _: None)


# scripts/pretrain.py, run as itself, with one addition: a line on stdout after each log record is written, the cue
# the test kills on (a blocking read, so no wall-clock limit that a loaded machine could run past).
ANNOUNCING_CHILD = """
import runpy, sys
from mlx_aim.training import runs
write = runs.RunLog.write
def announced(self, record):
    write(self, record)
    print("logged step", record["step"], flush=True)
runs.RunLog.write = announced
sys.argv = [{script!r}, *{args!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_kill_at_any_moment_then_resume_reproduces_the_run(reference, data, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "run"
    config_file = tmp_path / "tiny.json"
    config_file.write_text(json.dumps(small_config().to_dict()))
    c = recipe()
    args = ["--config", str(config_file), "--data", str(data), "--out", str(out), "--no-progress", "--steps",
            str(c.steps), "--batch-size", str(c.batch_size), "--lr", str(c.lr), "--warmup-frac", str(c.warmup_frac),
            "--log-interval", "1", "--val-interval", str(c.val_interval), "--ckpt-interval", str(c.ckpt_interval),
            "--keep-last", str(c.keep_last), "--val-images", str(c.val_images)]
    code = ANNOUNCING_CHILD.format(script=str(ROOT / "scripts" / "pretrain.py"), args=args)
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=stderr, text=True)
    logged = 0
    try:
        # Kill somewhere after the first checkpoint (step 5): mid-step, mid-checkpoint or mid-export alike.
        for line in process.stdout:
            logged += line.startswith("logged step")
            if logged == 7:
                break
        assert logged == 7, f"the run ended after {logged} log records:\n{(tmp_path / 'stderr').read_text()}"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()  # (nothing, where it was killed or ended)
        process.wait()
        process.stdout.close()
    killed_at = max(train_losses(out))
    assert killed_at < STEPS
    pretrain(small_config(), c, data, out, resume=True, progress=False, echo=lambda _: None)
    ref, ours = train_losses(ref_out), train_losses(out)
    assert sorted(ours) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([ours[s] for s in sorted(ours)], [ref[s] for s in sorted(ref)], rtol=1e-5)
    assert mlx_aim.load(out / "model").config.width == 32


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    import mlx_aim.training.pretrain as train_module

    calls = {"n": 0}
    real = train_module.TrainTransform

    class PoisonAfter(real):
        def __call__(self, image, rng):
            calls["n"] += 1
            out = super().__call__(image, rng)
            return out * np.nan if calls["n"] > 8 * 7 else out  # from the 8th batch on

    monkeypatch.setattr(train_module, "TrainTransform", PoisonAfter)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="step 8") as caught:
        pretrain(small_config(), recipe(num_workers=0, ckpt_interval=3, val_interval=0), data, out,
                 progress=False, echo=lambda _: None)
    assert caught.value.step == 8 and caught.value.checkpoint.name == "step_00000006"
    assert np.isnan(caught.value.value)
    assert "step_00000006" in str(caught.value) and "lower learning rate" in str(caught.value)
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003", "step_00000006"]
    weights = checkpoint_weights(list_checkpoints(out)[-1])
    assert all(np.isfinite(v).all() for v in weights.values())
    assert max(train_losses(out)) == 7  # the diverged step is not logged as a loss
    assert np.isfinite(np.array(mlx_aim.load(out / "model").trunk.blocks[0].attn.qkv.weight)).all()


def test_bfloat16_compute_keeps_float32_weights_and_tracks_float32(data, tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        pretrain(small_config(), recipe(steps=3, dtype=dtype, val_interval=0, num_workers=1), data, out,
                 progress=False, echo=lambda _: None)
        runs[dtype] = train_losses(out)
        weights = mx.load(str(list_checkpoints(out)[-1] / "model.safetensors"))
        assert {v.dtype for v in weights.values()} == {mx.float32}
    for step in (1, 2, 3):
        assert runs["bfloat16"][step] == pytest.approx(runs["float32"][step], rel=0.03)


class _Oracle:
    """Stands in for a model that predicts every next patch perfectly (in normalised pixels)."""

    def __init__(self, config):
        self.config = config

    def __call__(self, images, prefix_len=None, attention="prefix"):
        target = norm_pix_target(patchify(images, self.config.patch_size))
        return mx.concatenate([target[:, 1:], mx.zeros_like(target[:, :1])], axis=1)


def test_visualisation_unnormalises_with_the_true_patch_statistics():
    images = mx.array(np.random.randn(2, 16, 16, 3).astype(np.float32))
    predicted = next_patch_predictions(_Oracle(small_config()), images)
    np.testing.assert_allclose(np.array(predicted), np.array(images), atol=1e-4)
    pixels = np.random.randint(0, 256, (1, 4, 4, 3)).astype(np.float32) / 255
    normalised = (pixels - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_array_equal(to_uint8(normalised), np.round(pixels * 255).astype(np.uint8))


def test_visualize_script_writes_a_grid(reference, data, tmp_path):
    from PIL import Image

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import visualize
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    out, _ = reference
    images = sorted((data / "val").rglob("*.png"))[:3]
    grid = tmp_path / "grid.png"
    assert visualize.main(["--model", str(out), "--out", str(grid), *map(str, images)]) == 0
    picture = Image.open(grid)
    assert picture.size[1] > 3 * 128 and picture.size[0] > 2 * 128
    assert visualize.main(["--model", str(out / "model"), "--out", str(grid), str(images[0])]) == 2  # no pixel head


def test_any_folder_of_images_is_training_data(data, tmp_path):
    flat = tmp_path / "photos"
    for i, path in enumerate(sorted((data / "train").rglob("*.png"))[:10]):
        target = flat / ("nested/deeper" if i % 2 else "") / f"img{i}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    train, val = load_splits(flat, val_ratio=0.2, seed=0, labelled=False)
    assert len(train) == 8 and len(val) == 2 and not set(train) & set(val)
    assert (train, val) == load_splits(flat, val_ratio=0.2, seed=0, labelled=False)
    train, val = load_splits(data, val_ratio=0.2, seed=0, labelled=False)  # train/ and val/ are taken as they are
    assert len(train) == 64 and len(val) == 16
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_splits(tmp_path / "missing", 0.1, 0, labelled=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_splits(tmp_path / "empty", 0.1, 0, labelled=False)


def trunk_weights(model) -> dict[str, np.ndarray]:
    """The pre-trained parameters (the probe head of a trunk-only source is freshly initialised)."""
    return {k: np.array(v) for k, v in tree_flatten(model.parameters()) if not k.startswith("head.")}


def assert_same_trunk(a, b) -> None:
    wa, wb = trunk_weights(a), trunk_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        np.testing.assert_array_equal(wa[key], wb[key], err_msg=key)


def test_run_folder_stands_for_its_exported_trunk(reference, data, tmp_path, capsys):
    """`mlx_aim.load(RUN)`, `convert(RUN)` and the scripts' --model RUN read RUN/model; so does a demo run
    folder (its pre-training run under pretrain/)."""
    from mlx_aim.cli import probe as probe_cli

    out, _ = reference
    exported = mlx_aim.load(out / "model")
    from_run = mlx_aim.load(out)
    assert type(from_run) is mlx_aim.AIMEncoder and from_run.config == exported.config
    assert_same_trunk(from_run, exported)
    converted = mlx_aim.convert(out, tmp_path / "converted")
    assert_same_trunk(mlx_aim.load(converted), exported)

    # mlx-aim probe train --model RUN (in-process), then eval against the same RUN.
    probe = tmp_path / "probe"
    recipe = ["--epochs", "1", "--batch-size", "16", "--eval-batch-size", "32", "--num-workers", "1"]
    assert probe_cli.main(["train", "--model", str(out), "--data", str(data), "--out", str(probe), *recipe,
                           "--json"]) == 0
    assert last_json(capsys.readouterr().out)["model"] == str(out)
    assert json.loads((probe / "probe.json").read_text())["trunk"]["source"] == str(out)
    assert probe_cli.main(["eval", "--head", str(probe), "--data", str(data), "--model", str(out)]) == 0

    demo_run = tmp_path / "demo" / "seed0"  # what scripts/demo.py writes: pretrain/, probes, demo.json
    demo_run.mkdir(parents=True)
    (demo_run / "pretrain").symlink_to(out, target_is_directory=True)
    (demo_run / "probe-pretrained").mkdir()
    assert_same_trunk(mlx_aim.load(demo_run), exported)


def test_checkpoint_folder_stands_for_its_trunk(reference, data, tmp_path):
    """`mlx_aim.load(RUN/checkpoints/step_X)` and the commands' --model read the checkpoint's trunk, leaving out the
    pixel head and saying so: the last checkpoint gives the exported trunk, an earlier one its own weights."""
    from mlx_aim.cli import extract_features as extract_cli
    from mlx_aim.tasks.features import load_features
    from mlx_aim.checkpoints.loading import open_source
    from mlx_aim.training.pretrain import checkpoint_trunk

    out, _ = reference
    first, last = list_checkpoints(out)[0], list_checkpoints(out)[-1]
    images = mx.random.normal((2, 16, 16, 3))
    exported = mlx_aim.load(out / "model")
    from_last = mlx_aim.load(last)
    assert type(from_last) is mlx_aim.AIMEncoder and from_last.config == exported.config
    assert_same_trunk(from_last, exported)
    np.testing.assert_array_equal(np.array(from_last.probe_features(images)), np.array(exported.probe_features(images)))

    from_first, saved = mlx_aim.load(first), checkpoint_weights(first)
    assert trunk_weights(from_first).keys() == {k for k in saved if not k.startswith("pixel_head.")}
    assert all(np.array_equal(v, saved[k]) for k, v in trunk_weights(from_first).items())
    np.testing.assert_array_equal(np.array(from_first.probe_features(images)),
                                  np.array(checkpoint_trunk(first).probe_features(images)))
    assert not np.array_equal(np.array(from_first.probe_features(images)), np.array(from_last.probe_features(images)))
    source = open_source(first)
    source.close()
    assert source.description == (f"pre-training checkpoint {first} (its trunk: the pixel head's 12 tensors, which "
                                  "only pre-training uses, left out)")
    assert not any(k.startswith("pixel_head.") for k in source.tensors)
    assert_same_trunk(mlx_aim.load(mlx_aim.convert(first, tmp_path / "converted")), from_first)

    # mlx-aim extract-features --model CHECKPOINT: the tokens --model RUN/model gives.
    for model, name in [(last, "from-checkpoint"), (out / "model", "from-export")]:
        assert extract_cli.main([str(data / "val"), "--model", str(model), "--out", str(tmp_path / name),
                                 "--features", "tokens", "--no-progress"]) == 0
    (tokens, paths), (expected, expected_paths) = (load_features(tmp_path / name, "tokens")
                                                   for name in ("from-checkpoint", "from-export"))
    assert paths == expected_paths and len(paths) == 16
    np.testing.assert_array_equal(tokens, expected)


def test_run_folder_without_its_model_says_how_to_get_it(reference, tmp_path):
    out, _ = reference
    # Killed before the first checkpoint: the two configs (and perhaps a log), nothing else.
    early = tmp_path / "early"
    early.mkdir()
    for name in ("config.json", "train_config.json"):
        shutil.copy(out / name, early / name)
    with pytest.raises(ValueError) as error:
        mlx_aim.load(early)
    message = str(error.value)
    assert str(early) in message and str(early / "model") in message and "first checkpoint" in message
    assert "--resume" in message
    demo_run = tmp_path / "demo" / "seed0"  # the same inside a demo run: re-running the demo resumes it
    shutil.copytree(early, demo_run / "pretrain")
    with pytest.raises(ValueError, match="scripts/demo.py") as error:
        mlx_aim.load(demo_run)
    assert str(demo_run / "pretrain" / "model") in str(error.value)

    # Stopped mid-run after a checkpoint whose export was lost: continue it, or export that checkpoint.
    middle = tmp_path / "middle"
    shutil.copytree(out, middle, ignore=shutil.ignore_patterns("model", "step_00000020", "step_00000024"))
    with pytest.raises(ValueError, match="step 15 of 24") as error:
        mlx_aim.load(middle)
    assert "--resume" in str(error.value) and "step_00000015" in str(error.value)
    assert "or name that checkpoint folder itself as the model" in str(error.value)
    assert mlx_aim.load(middle / "checkpoints" / "step_00000015").config.width == 32

    # A finished run without model/: the export command the message gives writes it.
    finished = tmp_path / "finished"
    shutil.copytree(out, finished, ignore=shutil.ignore_patterns("model"))
    with pytest.raises(ValueError, match="Export it from the newest checkpoint") as error:
        mlx_aim.convert(finished, tmp_path / "converted")
    assert str(finished / "checkpoints" / "step_00000024") in str(error.value)
    command = str(error.value).split('python -c "', 1)[1].rsplit('"', 1)[0]
    exec(command, {})
    assert_same_trunk(mlx_aim.load(finished), mlx_aim.load(out / "model"))
