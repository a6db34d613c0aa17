"""LoRA fine-tuning with an attentive probe (mlx_aim/training/finetune.py, mlx_aim/cli/finetune.py) on tiny
random-weight bases and generated colour folders."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_aim
from conftest import last_json
from mlx_aim.cli import finetune as finetune_cli
from mlx_aim.cli import fuse as fuse_cli
from mlx_aim.models.config import AIMv2Config
from mlx_aim.models.lora import LoRALinear, LoRAQKV
from mlx_aim.models.model import ProbedAIMv2, build_model
from mlx_aim.training.optim import Schedule, layer_id, layerwise_adamw
from mlx.utils import tree_map
from mlx_aim.training.finetune import FinetuneConfig, adapted_model, finetune, full_model
from mlx_aim.training.probe import new_head
from mlx_aim.training.runs import read_log
from probe_helpers import COLOURS, make_colour_folder, make_model_folder, native_config, probe_config, save_image


def config(**overrides) -> FinetuneConfig:
    """Eight steps on batches of 8, uncompiled unless a test says (compiling costs ~10 s on the CPU backend)."""
    fields = dict(steps=8, batch_size=8, lr=1e-2, warmup_frac=0.25, num_workers=0, log_interval=1, compile=False)
    return FinetuneConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_folder(tmp_path_factory.mktemp("colours"), num_train=6, num_val=2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("base") / "model", with_head=False)


def images(n=3, seed=1):
    return mx.random.uniform(shape=(n, 16, 16, 3), key=mx.random.key(seed))


def test_adapted_model_at_step_0_is_the_base_with_a_fresh_head(base):
    cfg = config(rank=4, lora_keys=("qkv", "proj", "fc1", "fc2"))
    expected = mlx_aim.with_probe(mlx_aim.load(base), new_head(mlx_aim.load(base), 4, cfg.seed)).eval()
    model = adapted_model(mlx_aim.load(base), 4, cfg).eval()
    assert isinstance(model.trunk.blocks[0].attn.qkv, LoRAQKV)
    assert isinstance(model.trunk.blocks[0].mlp.fc1, LoRALinear)
    x = images()
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(expected(x)))
    trainable = {k for k, _ in nn.utils.tree_flatten(model.trainable_parameters())}
    assert trainable and all(k.startswith("head.") or k.endswith((".lora_a", ".lora_b")) for k in trainable)
    assert not any("running" in k for k in trainable)  # BatchNorm statistics are state, not trained


def test_lora_run_lowers_the_loss_and_its_adapters_load_back(base, colours, tmp_path):
    out = tmp_path / "ft"
    result = finetune(str(base), str(colours), out, config(steps=12, eval_interval=6), progress=False)
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    assert [e["step"] for e in result.evaluations] == [6, 12]
    assert 0 < result.trainable < result.total
    log = read_log(out)
    assert [r["step"] for r in log if "val_top1" in r] == [6, 12]
    assert all(0 <= r["val_top1"] <= r["val_top5"] <= 1 for r in log if "val_top1" in r)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["classes"] == sorted(COLOURS) and adapter_config["rank"] == 8
    assert adapter_config["fine_tune_type"] == "lora" and adapter_config["preprocessing"]
    loaded = mlx_aim.load(base, adapters=out)
    x = images()
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(result.model(x)))
    assert loaded.config.num_classes == len(COLOURS)


def test_killed_run_resumes_exactly(base, colours, tmp_path):
    # The compiled step (the library default), with LoRA dropout: the resumed slice must draw the same masks.
    cfg = config(steps=6, compile=True, dropout=0.1)
    whole = finetune(str(base), str(colours), tmp_path / "whole", cfg, progress=False)
    out = tmp_path / "sliced"
    first = finetune(str(base), str(colours), out, cfg, stop_at=3, progress=False)
    assert first.steps == 3 and not (out / "adapter_config.json").exists()
    with pytest.raises(FileExistsError):
        finetune(str(base), str(colours), out, cfg, progress=False)
    second = finetune(str(base), str(colours), out, cfg, resume=True, progress=False)
    assert first.losses + second.losses == whole.losses
    x = images()
    np.testing.assert_array_equal(np.asarray(mlx_aim.load(base, adapters=out)(x)),
                                  np.asarray(mlx_aim.load(base, adapters=tmp_path / "whole")(x)))
    assert [r["step"] for r in read_log(out) if "loss" in r] == list(range(1, 7))
    finetune(str(base), str(colours), tmp_path / "other", cfg, stop_at=2, progress=False)
    with pytest.raises(ValueError, match="settings differ"):
        finetune(str(base), str(colours), tmp_path / "other", config(steps=6, compile=True, dropout=0.1, lr=0.5),
                 resume=True, progress=False)


def test_qlora_keeps_the_base_quantized(base, colours, tmp_path):
    result = finetune(str(base), str(colours), tmp_path / "q", config(steps=4), quantize=4, progress=False)
    qkv = result.model.trunk.blocks[0].attn.qkv
    assert isinstance(qkv.linear, nn.QuantizedLinear) and qkv.lora_a.dtype == mx.float32
    assert result.model.config.quantization is not None
    float_run = finetune(str(base), str(colours), None, config(steps=1), progress=False)
    assert (result.trainable, result.total) == (float_run.trainable, float_run.total)  # quantized weights as float
    loaded = mlx_aim.load(base, quantize=4, adapters=tmp_path / "q")
    x = images()
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(result.model(x)), atol=1e-5)


def test_aimv2_base_with_its_swiglu_adapted(colours, tmp_path):
    aimv2 = AIMv2Config(image_size=16, patch_size=4, width=64, depth=3, num_heads=2, hidden_dim=128, num_classes=10,
                        probe_layers=[1, 2], name="tiny-v2")
    base = make_model_folder(tmp_path / "base", with_head=False, config=aimv2)
    keys = ("qkv", "proj", "fc1", "fc2", "fc3")
    result = finetune(str(base), str(colours), tmp_path / "ft", config(steps=4, lora_keys=keys), progress=False)
    loaded = mlx_aim.load(base, adapters=tmp_path / "ft")
    assert isinstance(loaded, ProbedAIMv2) and isinstance(loaded.trunk.blocks[0].mlp.fc3, LoRALinear)
    x = images()
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(result.model(x)))


def test_full_run_resumes_exactly_and_writes_a_model_folder(base, colours, tmp_path):
    cfg = config(fine_tune_type="full", steps=6, lr=1e-3, compile=True)
    whole = finetune(str(base), str(colours), tmp_path / "whole", cfg, progress=False)
    assert whole.trainable == sum(v.size for _, v in nn.utils.tree_flatten(whole.model.trainable_parameters()))
    assert whole.trainable > 0.9 * whole.total  # all but the BatchNorm's running statistics
    out = tmp_path / "sliced"
    first = finetune(str(base), str(colours), out, cfg, stop_at=3, progress=False)
    second = finetune(str(base), str(colours), out, cfg, resume=True, progress=False)
    assert first.losses + second.losses == whole.losses
    assert np.mean(whole.losses[-2:]) < np.mean(whole.losses[:2])
    loaded = mlx_aim.load(out / "model")
    x = images()
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(whole.model(x)))
    info = json.loads((out / "finetune.json").read_text())
    assert info["fine_tune_type"] == "full" and info["classes"] == sorted(COLOURS)


def test_layerwise_lr_decay_scales_each_layers_first_step():
    model = build_model(probe_config(4), probe=True)  # depth 3
    depth = model.config.depth
    optimizer = layerwise_adamw(Schedule(10, 1e-2, 1e-2, 0), depth, 0.5, (0.9, 0.999), 1e-8, 0.0)
    optimizer.init(model.trainable_parameters())
    before = dict(nn.utils.tree_flatten(model.parameters()))
    optimizer.update(model, tree_map(mx.ones_like, model.trainable_parameters()))
    after = dict(nn.utils.tree_flatten(model.parameters()))
    for key, layer in (("preprocessor.patchifier.proj.weight", 0), ("trunk.blocks.0.attn.qkv.weight", 1),
                       ("trunk.blocks.2.mlp.fc1.weight", 3), ("head.k.weight", depth + 1)):
        assert layer_id(key, depth) == layer
        step = float(mx.abs(before[key] - after[key]).max())  # Adam's first step is lr per element
        assert step == pytest.approx(1e-2 * 0.5 ** (depth + 1 - layer), rel=1e-3), key


def test_drop_path_drops_whole_residual_branches_in_training_only():
    model = build_model(probe_config(4), probe=True)
    block = model.trunk.blocks[0]
    x = mx.random.normal((64, 16, 64), key=mx.random.key(3))
    block.eval()
    plain = block(x)
    block.drop_path = 0.5
    np.testing.assert_array_equal(np.asarray(block(x)), np.asarray(plain))  # eval: no drop
    block.train()
    mx.random.seed(0)
    dropped = block(x)
    a = block.attn(block.norm_1(x))
    candidates = []
    for ka in (0.0, 2.0):  # each branch kept (scaled by 1 / (1 - p)) or dropped, per sample
        h = x + ka * a
        m = block.mlp(block.norm_2(h))
        candidates += [h, h + 2.0 * m]
    errors = mx.stack([mx.abs(dropped - c).max(axis=(1, 2)) for c in candidates])  # (4, samples)
    assert float(errors.min(axis=0).max()) < 1e-4
    kinds = np.asarray(mx.argmin(errors, axis=0))
    assert len(set(kinds.tolist())) == 4  # every combination occurs over 64 samples


def test_refusals_write_nothing(base, colours, tmp_path):
    one = tmp_path / "one"
    for i in range(4):
        save_image(one / "red" / f"{i}.png", np.full((16, 16, 3), 200, np.uint8))
    with pytest.raises(ValueError, match="1 class"):
        finetune(str(base), str(one), tmp_path / "o1", config(), progress=False)
    no_val = tmp_path / "noval"
    for split, names in (("train", ("red", "blue")), ("val", ("red",))):
        for name in names:
            for i in range(3):
                save_image(no_val / split / name / f"{i}.png", np.full((16, 16, 3), 100, np.uint8))
    with pytest.raises(ValueError, match=r"no validation images of 1 class\(es\) \(\['blue'\]\)"):
        finetune(str(base), str(no_val), tmp_path / "o2", config(), progress=False)
    with pytest.raises(ValueError, match="rank"):
        finetune(str(base), str(colours), tmp_path / "o3", config(rank=65), progress=False)
    with pytest.raises(ValueError, match="expected 'lora' or 'full'"):
        config(fine_tune_type="dora")
    with pytest.raises(ValueError, match="not a quantized one"):
        finetune(str(base), str(colours), tmp_path / "o4", config(fine_tune_type="full"), quantize=4, progress=False)
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3, 4))


def test_cli_end_to_end(base, colours, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = finetune_cli.main(["--model", str(base), "--data", str(colours), "--out", str(out), "--steps", "4",
                            "--batch-size", "8", "--rank", "4", "--lora-keys", "qkv,proj,fc1,fc2", "--num-layers",
                            "2", "--eval-interval", "2", "--num-workers", "0", "--no-compile", "--json",
                            "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = last_json(captured.out)
    assert summary["steps"] == 4 and 0 < summary["trainable_fraction"] < 1
    assert [e["step"] for e in summary["evaluations"]] == [2, 4]
    assert "trainable" in captured.out and "val: top-1" in captured.out
    assert captured.err.count("val top-1") == 2  # each evaluation, on stderr beside --json
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["rank"] == 4 and adapter_config["layers"] == [1, 2]
    assert adapter_config["keys"] == ["qkv", "proj", "fc1", "fc2"]
    # `mlx-aim fuse` folds them into an ordinary model folder that classifies as base + adapters does.
    assert fuse_cli.main(["--model", str(base), "--adapters", str(out), "--out", str(tmp_path / "fused")]) == 0
    x = images()
    np.testing.assert_allclose(np.asarray(mlx_aim.load(tmp_path / "fused")(x)),
                               np.asarray(mlx_aim.load(base, adapters=out)(x)), atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--rank", "65"], "rank"),
    (["--fine-tune-type", "dora"], "expected 'lora' or 'full'"),
])
def test_cli_refusals_are_one_line(base, colours, tmp_path, capsys, args, message):
    argv = ["--model", str(base), "--data", str(colours), "--out", str(tmp_path / "o"), "--steps", "2",
            "--no-progress", *args]
    try:
        rc = finetune_cli.main(argv)
    except SystemExit as done:  # argparse's own refusal of a bad config value
        rc = done.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_cli_refuses_one_class(base, tmp_path, capsys):
    for i in range(4):
        save_image(tmp_path / "one" / "red" / f"{i}.png", np.full((16, 16, 3), 200, np.uint8))
    rc = finetune_cli.main(["--model", str(base), "--data", str(tmp_path / "one"), "--out", str(tmp_path / "o"),
                            "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: fine-tuning data has 1 class(es) (['red']): expected at least 2"]
    assert not (tmp_path / "o").exists()


def test_cli_full_mode_writes_a_model_folder(base, colours, tmp_path, capsys):
    out = tmp_path / "full"
    rc = finetune_cli.main(["--model", str(base), "--data", str(colours), "--out", str(out), "--fine-tune-type",
                            "full", "--steps", "2", "--batch-size", "8", "--layer-decay", "0.65", "--drop-path", "0.2",
                            "--grad-checkpoint", "--dtype", "bfloat16", "--num-workers", "0", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "full fine-tuning + probe" in captured.out and "model/, finetune.json" in captured.out
    assert "2 steps (bfloat16, grad checkpointing)" in captured.out
    recipe = json.loads((out / "finetune.json").read_text())["recipe"]
    assert (recipe["layer_decay"], recipe["drop_path"], recipe["grad_checkpoint"], recipe["dtype"]) == (
        0.65, 0.2, True, "bfloat16")
    assert mlx_aim.load(out / "model").config.num_classes == len(COLOURS)


def _loss_and_grads(model, x, y, checkpoint: bool, seed: int = 5):
    """The compiled loss and gradients of a training step of `model` on (x, y), with or without grad checkpointing,
    the generator seeded as the fine-tuning loop seeds each step."""
    model.trunk.grad_checkpoint = checkpoint
    model.train()

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, mx.random.state]
    step = mx.compile(lambda x, y: loss_and_grad(model, x, y), inputs=state, outputs=state)
    mx.random.seed(seed)
    loss, grads = step(x, y)
    mx.eval(loss, grads)
    return float(loss), dict(nn.utils.tree_flatten(grads))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_grad_checkpoint_gives_the_same_loss_and_gradients(base, mode, monkeypatch):
    x, y = images(4), mx.array([0, 1, 2, 3])
    build = (lambda cfg: full_model(mlx_aim.load(base), 4, cfg)) if mode == "full" else (
        lambda cfg: adapted_model(mlx_aim.load(base), 4, cfg))
    # Without random draws in the blocks: checkpointing changes nothing but memory.
    plain = config(fine_tune_type=mode, drop_path=0.0, lora_keys=("qkv", "proj", "fc1"))
    loss, grads = _loss_and_grads(build(plain), x, y, checkpoint=False)
    loss_ck, grads_ck = _loss_and_grads(build(plain), x, y, checkpoint=True)
    assert loss_ck == pytest.approx(loss, rel=1e-6)
    assert set(grads_ck) == set(grads) and any(np.abs(np.asarray(g)).max() > 0 for g in grads.values())
    for key, g in grads.items():
        np.testing.assert_allclose(np.asarray(grads_ck[key]), np.asarray(g), rtol=1e-5, atol=1e-6, err_msg=key)
    # With drop path or LoRA dropout the recomputed blocks draw the masks their forward pass drew: the checkpointed
    # gradients equal those of the same computation kept in memory (mx.checkpoint made a no-op).
    noisy = config(fine_tune_type=mode, drop_path=0.3, dropout=0.3, lora_keys=("qkv", "proj", "fc1"))
    loss_ck, grads_ck = _loss_and_grads(build(noisy), x, y, checkpoint=True)
    monkeypatch.setattr(mx, "checkpoint", lambda fn: fn)
    loss_kept, grads_kept = _loss_and_grads(build(noisy), x, y, checkpoint=True)
    assert loss_ck == pytest.approx(loss_kept, rel=1e-6)
    assert any(not np.allclose(np.asarray(grads_ck[k]), np.asarray(g), rtol=1e-3) for k, g in grads.items())  # masks
    for key, g in grads_kept.items():
        np.testing.assert_allclose(np.asarray(grads_ck[key]), np.asarray(g), rtol=1e-5, atol=1e-6, err_msg=key)


def test_bfloat16_trains_float32_masters_and_resumes_exactly(base, colours, tmp_path):
    reference = finetune(str(base), str(colours), None, config(steps=1), progress=False)
    cfg = config(steps=4, dtype="bfloat16", compile=True)
    whole = finetune(str(base), str(colours), tmp_path / "whole", cfg, progress=False)
    assert whole.model.trunk.blocks[0].norm_1.weight.dtype == mx.bfloat16  # the frozen base, cast once
    assert all(np.isfinite(whole.losses))
    assert whole.losses[0] == pytest.approx(reference.losses[0], rel=5e-2)  # the same step in half precision
    assert whole.losses[0] != reference.losses[0]
    saved = mx.load(str(tmp_path / "whole" / "adapters.safetensors"))
    assert {v.dtype for v in saved.values()} == {mx.float32}
    assert {v.dtype for v in mx.load(str(tmp_path / "whole" / "checkpoint" / "adapters.safetensors")).values()} == {
        mx.float32}
    out = tmp_path / "sliced"
    first = finetune(str(base), str(colours), out, cfg, stop_at=2, progress=False)
    second = finetune(str(base), str(colours), out, cfg, resume=True, progress=False)
    assert first.losses + second.losses == whole.losses
    with pytest.raises(ValueError, match="dtype"):
        finetune(str(base), str(colours), out, config(steps=4, compile=True), resume=True, progress=False)


def test_bfloat16_qlora_and_full(base, colours, tmp_path):
    # QLoRA in bfloat16 with grad checkpointing: how a 7B trunk is meant to fit a 16 GB Mac.
    q = finetune(str(base), str(colours), tmp_path / "q", config(steps=2, dtype="bfloat16", grad_checkpoint=True),
                 quantize=4, progress=False)
    qkv = q.model.trunk.blocks[0].attn.qkv
    assert isinstance(qkv.linear, nn.QuantizedLinear) and qkv.linear.scales.dtype == mx.bfloat16
    assert qkv.lora_a.dtype == mx.float32 and all(np.isfinite(q.losses))
    full = finetune(str(base), str(colours), tmp_path / "full", config(fine_tune_type="full", steps=2, lr=1e-3,
                                                                       dtype="bfloat16"), progress=False)
    assert all(np.isfinite(full.losses))
    assert {v.dtype for v in mx.load(str(tmp_path / "full" / "model" / "model.safetensors")).values()} == {mx.float32}


def test_native_resolution_trunk_trains_at_one_size_and_stays_native(colours, tmp_path):
    base = make_model_folder(tmp_path / "native", with_head=False, config=native_config())
    out = tmp_path / "ft"
    result = finetune(str(base), str(colours), out, config(steps=6, image_size=16), progress=False)
    assert np.mean(result.losses[-2:]) < np.mean(result.losses[:2])
    assert result.evaluations[-1]["top1"] is not None
    recorded = json.loads((out / "adapter_config.json").read_text())["preprocessing"]
    assert (recorded["resize"], recorded["crop_size"], recorded["native"]) == (16, [16, 16], False)
    loaded = mlx_aim.load(base, adapters=out)
    assert loaded.config.image_size is None  # still native: any multiple of the patch size
    for shape in ((2, 16, 16, 3), (2, 24, 20, 3)):
        x = mx.random.uniform(shape=shape, key=mx.random.key(4))
        np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(result.model(x)))
    for size, message in ((18, "multiple of its patch size 4"), (4096, "max_patches")):
        with pytest.raises(ValueError, match=message):
            finetune(str(base), str(colours), tmp_path / "bad", config(image_size=size), progress=False)
    assert not (tmp_path / "bad").exists()


def test_image_size_is_refused_for_a_fixed_size_trunk(base, colours, tmp_path):
    with pytest.raises(ValueError, match="takes 16x16 images only"):
        finetune(str(base), str(colours), tmp_path / "bad", config(image_size=32), progress=False)
    assert not (tmp_path / "bad").exists()


def test_unreadable_images_are_skipped_and_reported(base, tmp_path, capsys):
    data = make_colour_folder(tmp_path / "data", num_train=6, num_val=2)
    (data / "train" / "red" / "broken.png").write_bytes(b"not an image")
    (data / "val" / "blue" / "broken.png").write_bytes(b"")
    out = tmp_path / "ft"
    # 25 training images in batches of 5: the first epoch meets the broken one.
    with pytest.warns(UserWarning, match="BatchLoader: skipping .*broken.png"):  # the loader says so as it happens
        rc = finetune_cli.main(["--model", str(base), "--data", str(data), "--out", str(out), "--steps", "5",
                                "--batch-size", "5", "--num-workers", "0", "--no-compile", "--no-progress", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = last_json(captured.out)
    broken = {str(data / "train" / "red" / "broken.png"), str(data / "val" / "blue" / "broken.png")}
    assert summary["num_skipped"] == 2 and {item["path"] for item in summary["skipped"]} == broken
    assert "skipped 2 unreadable image(s)" in captured.out
    records = [r for r in read_log(out) if "num_skipped" in r]
    assert records and records[-1]["num_skipped"] == 2
    assert json.loads((out / "adapter_config.json").read_text())["num_skipped"] == 2
    assert summary["val"]["num_images"] == 8  # the broken validation image left out
