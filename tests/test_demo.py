"""The demo end to end from the command line (its --quick budget) and its --model path, offline."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlx.core as mx
from conftest import last_json, run_script, tiny_config
from mlx.utils import tree_flatten
from mlx_aim.apps import demo
from mlx_aim.cli import demo as demo_cli
from mlx_aim.data import imagenet_classes
from mlx_aim.models.model import AIMEncoder, AIMForPretraining, build_model
from mlx_aim.checkpoints.weights import save_model


def table_value(stdout: str, key: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith(key)]
    assert len(lines) == 1, f"expected one table row {key!r} in:\n{stdout}"
    return lines[0][len(key):].split()[0]


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    stdout = run_script("scripts/demo.py", "--quick", "--out", out, "--seed", 3, "--json").stdout
    result = last_json(stdout)

    # The table shows the JSON's figures.
    pre, probe = result["pretraining"], result["probe"]
    assert table_value(stdout, "pre-training loss, step 1") == f"{pre['loss_start']:.4f}"
    assert table_value(stdout, "probe top-1, random-init trunk") == f"{100 * probe['random']['top1']:.1f}%"
    assert table_value(stdout, "probe top-1, pre-trained trunk") == f"{100 * probe['pretrained']['top1']:.1f}%"
    assert math.isfinite(pre["loss_start"]) and math.isfinite(pre["loss_end"])
    assert pre["steps"] == demo.QUICK.steps and result["seed"] == 3 and result["quick"] is True
    for name in ("random", "pretrained"):
        assert 0.0 <= probe[name]["top1"] <= probe[name]["top5"] <= 1.0
        assert probe[name]["num_images"] == demo.QUICK.num_val
    assert result["probe_train"] == demo.QUICK.probe_train

    # What it wrote: the figure, a checkpoint that continues exactly, a trunk folder mlx_aim.load reads.
    figure = Path(result["figure"])
    assert figure.parent.parent == out
    with Image.open(figure) as image:
        image.load()
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.width > 500 and image.height > 300
        pixels = np.asarray(image)
    assert (pixels != 255).any(axis=-1).mean() > 0.05  # drawn on, not a blank canvas
    assert (Path(result["checkpoint"]) / "optimizer.safetensors").is_file()
    import mlx_aim

    trunk = mlx_aim.load(result["model_dir"])
    assert trunk.config.width == demo.QUICK.width and trunk.config.depth == demo.QUICK.depth
    # The run folder (e.g. --model mlx_aim_demo/seed0) stands for the same trunk.
    from_run = mlx_aim.load(result["run_dir"])
    np.testing.assert_array_equal(np.array(from_run.trunk.blocks[-1].mlp.fc2.weight),
                                  np.array(trunk.trunk.blocks[-1].mlp.fc2.weight))
    # Patch size in pixels and the grid it makes, not a bare "4x4 patches".
    assert "4x4-pixel patches, a 4x4 grid of 16 patches" in stdout
    assert json.loads((Path(result["run_dir"]) / "demo.json").read_text())["probe"] == probe


def test_rerun_reuses_the_finished_pretraining(tmp_path):
    """A second run in the same folder does not pre-train again; its figures are the first run's."""
    first = demo.run_demo(tmp_path, seed=1, quick=True, progress=False, echo=lambda *a: None)
    log = Path(first["run_dir"]) / "pretrain" / "log.jsonl"
    before = log.read_text()
    second = demo.run_demo(tmp_path, seed=1, quick=True, progress=False, echo=lambda *a: None)
    assert log.read_text() == before
    assert second["pretraining"]["loss_start"] == first["pretraining"]["loss_start"]
    assert second["pretraining"]["loss_end"] == first["pretraining"]["loss_end"]
    assert second["probe"] == first["probe"]


def test_finetune_comparison_on_the_quick_demo(tmp_path, capsys):
    """`demo --finetune`: probe, LoRA and full on the pre-trained trunk per seed, a table of the JSON's figures, and
    a second call that reuses every recorded result instead of training again."""
    assert demo_cli.main(["--quick", "--out", str(tmp_path), "--finetune", "--finetune-seeds", "0,1", "--json",
                          "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    result = last_json(stdout)["finetune"]
    assert result["seeds"] == [0, 1] and list(result["methods"]) == ["probe", "lora", "full"]
    for method, m in result["methods"].items():
        assert [r["seed"] for r in m["runs"]] == [0, 1]
        top1 = [r["top1"] for r in m["runs"]]
        assert (m["top1_min"], m["top1_max"]) == (min(top1), max(top1))
        row = [line for line in stdout.splitlines() if line.startswith(demo_cli.METHOD_NAMES[method])]
        assert len(row) == 1 and f"{100 * top1[1]:.1f}%" in row[0] and f"{m['trainable_parameters']:,}" in row[0]
    methods = result["methods"]
    # What trains: the probe's head; LoRA's adapters beside the same head; every weight in full mode.
    assert methods["probe"]["trainable_parameters"] < methods["lora"]["trainable_parameters"] < (
        methods["full"]["trainable_parameters"])
    assert result["beats"]["lora_over_probe"] == (methods["lora"]["top1_min"] > methods["probe"]["top1_max"])
    assert result["beats"]["full_over_lora"] == (methods["full"]["top1_min"] > methods["lora"]["top1_max"])

    run_dir = Path(last_json(stdout)["run_dir"])
    records = sorted(p.name for p in (run_dir / "finetune").glob("*.json"))
    assert records == sorted(f"{m}-seed{s}.json" for m in ("probe", "lora", "full") for s in (0, 1))
    lines = []
    again = demo.compare_finetuning(last_json(stdout), [0, 1], quick=True, progress=False, echo=lines.append)
    assert again["methods"] == result["methods"] and all("reusing" in line for line in lines)
    with pytest.raises(ValueError, match="seeds"):
        demo.compare_finetuning(last_json(stdout), [1, 1], quick=True, progress=False)
    with pytest.raises(SystemExit):
        demo_cli.main(["--model", "aim-600M", "--finetune"])
    assert "drop --model" in capsys.readouterr().err
    for bad in ("1,1", "a", "-1"):  # refused by the parser, before minutes of demo
        with pytest.raises(SystemExit):
            demo_cli.main(["--finetune", "--finetune-seeds", bad, "--out", str(tmp_path / "never")])
        assert "expected distinct integer seeds" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_bad_arguments_are_refused(tmp_path, capsys):
    assert demo_cli.main(["--quick", "--steps", "0", "--out", str(tmp_path / "d")]) == 2
    assert "steps=0" in capsys.readouterr().err
    assert demo_cli.main(["--quick", "--seed", "-1", "--out", str(tmp_path / "d")]) == 2
    assert "seed=-1" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def tiny_imagenet_model(folder: Path) -> Path:
    config = tiny_config(width=32, depth=2, num_heads=2, num_classes=1000, probe_layers=[0, 1])
    mx.random.seed(0)
    model = build_model(config, probe=True)  # a classifier: the trunk with a probe head
    weights = dict(tree_flatten(model.parameters()))
    # Spread the classifier so that the top-5 differ from image to image.
    weights["head.linear.weight"] = mx.random.normal(weights["head.linear.weight"].shape) * 3.0
    return save_model(folder, weights, config)


def test_model_option_classifies_the_bundled_samples(tmp_path):
    folder = tiny_imagenet_model(tmp_path / "tiny-1000")
    stdout = run_script("scripts/demo.py", "--model", folder, "--json", timeout=120).stdout
    result = last_json(stdout)
    samples = demo.sample_images()
    assert [Path(p["path"]).name for p in result["predictions"]] == [p.name for p in samples]
    names = imagenet_classes()
    for pred in result["predictions"]:
        top = pred["top_k"]
        assert len(top) == 5
        assert [t["label"] for t in top] == [names[t["index"]] for t in top]
        probs = [t["probability"] for t in top]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
        assert f"{Path(pred['path']).name}: {top[0]['label']} ({top[0]['probability']:.3f})" in stdout


def test_model_option_reports_a_missing_model(tmp_path):
    proc = run_script("scripts/demo.py", "--model", tmp_path / "nowhere", check_rc=2, timeout=120)
    assert "nowhere" in proc.stderr


def test_bundled_samples_are_the_generator_output(tmp_path):
    shipped = demo.sample_images()
    assert [p.name for p in shipped] == sorted(f"sample_{n}.png" for n in demo.SAMPLE_CLASSES)
    redrawn = demo.write_sample_images(tmp_path)
    for path in redrawn:
        with Image.open(path) as new, Image.open(demo.ASSETS / path.name) as old:
            assert np.array_equal(np.asarray(new), np.asarray(old)), path.name
            assert old.size == (demo.SAMPLE_SIZE, demo.SAMPLE_SIZE)


def test_a_finished_run_with_other_settings_is_refused_by_name(tmp_path):
    first = demo.run_demo(tmp_path, seed=2, quick=True, progress=False, echo=lambda *a: None)
    pre_dir = Path(first["run_dir"]) / "pretrain"
    cfg = demo.QUICK
    assert demo.finished_pretraining(pre_dir, cfg.model_config(), cfg.train_config(2)) is not None
    with pytest.raises(ValueError, match=r"other settings \(lr: checkpoint 0.002, now 0.005\).*--force"):
        demo.finished_pretraining(pre_dir, cfg.model_config(), cfg.replace(lr=5e-3).train_config(2))
    # Runtime fields (how often to log, how many checkpoints to keep) do not make a run another one.
    assert demo.finished_pretraining(pre_dir, cfg.model_config(),
                                     cfg.train_config(2).replace(num_workers=1)) is not None


def _params(model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_random_baseline_is_the_pretraining_start_and_pinned():
    """A seeded trunk is the one pre-training with that seed starts from (the demo's random baseline), and the
    draws keep their order: values pinned from the builders this one replaced."""
    config = demo.DEFAULT.model_config()
    start = build_model(config, seed=0, pretraining=True)
    classifier = build_model(config, seed=0)
    assert isinstance(start, AIMForPretraining) and start.training
    assert isinstance(classifier, AIMEncoder) and not classifier.training and "head" not in classifier
    pre, cls = _params(start), _params(classifier)
    trunk = [k for k in cls if k.startswith(("preprocessor.", "trunk."))]
    assert trunk and all(np.array_equal(pre[k], cls[k]) for k in trunk)
    pinned = {
        "preprocessor.patchifier.proj.weight": [0.1324264258146286, -0.0035040676593780518, -0.0594465434551239],
        "trunk.blocks.0.attn.qkv.weight": [-0.09452246874570847, -0.027792692184448242, 0.0060606300830841064],
        "trunk.blocks.3.mlp.fc2.weight": [0.1257433295249939, -0.08936615288257599, 0.12415504455566406],
        "pixel_head.out_proj.weight": [0.008997440338134766, 0.1442563384771347, 0.11687816679477692],
    }
    for key, values in pinned.items():
        np.testing.assert_allclose(pre[key].reshape(-1)[:3], values, rtol=1e-6, err_msg=key)
    assert not np.array_equal(_params(build_model(config, seed=1))[trunk[0]], cls[trunk[0]])
