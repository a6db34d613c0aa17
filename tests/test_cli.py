"""The command lines' shared convention (mlx_aim/cli): entry points, exit statuses, error lines, the options
every command takes. What each command computes is tested with its library (test_inference.py, ...)."""

import argparse
import importlib
import json
import re
import subprocess
import sys

import numpy as np
import pytest

import mlx_aim
from conftest import ROOT, last_json, tiny_config
from mlx_aim.cli import main as mlx_aim_cli
from mlx_aim.cli.options import quantization
from mlx_aim.cli.output import run_command
from mlx_aim.data import Skipped, gather_images
from mlx_aim.data.synthetic import write_image_folder
from probe_helpers import make_model_folder, save_image

MODULES = ["classify", "zero_shot", "extract_features", "probe", "pretrain", "convert", "demo", "scaling", "benchmark",
           "visualize", "search", "fuse", "finetune"]

# The least each command's parser accepts (probe, search: each sub-command).
MINIMAL = {
    "classify": ["--model", "m", "img"],
    "zero_shot": ["--model", "m", "--labels", "a,b", "img"],
    "extract_features": ["--model", "m", "--out", "o", "img"],
    "probe train": ["train", "--model", "m", "--data", "d", "--out", "o"],
    "probe eval": ["eval", "--head", "h", "--data", "d"],
    "pretrain": ["--preset", "aim-tiny", "--data", "d", "--out", "o"],
    "convert": ["src", "--out", "o"],
    "fuse": ["--model", "m", "--adapters", "a", "--out", "o"],
    "finetune": ["--model", "m", "--data", "d", "--out", "o"],
    "demo": [],
    "scaling": [],
    "benchmark": [],
    "visualize": ["--model", "m", "img"],
    "search index": ["index", "--model", "m", "--out", "o", "img"],
    "search query": ["query", "--index", "i", "text"],
    "search dupes": ["dupes", "--index", "i"],
    "search serve": ["serve", "--index", "i"],
}
LOADS_A_MODEL = ["classify", "zero_shot", "extract_features", "probe train", "probe eval", "convert", "demo",
                 "benchmark"]
LOADS_A_LIT = ["search index", "search query", "search serve"]  # fixed-size models: no --max-patches


def parser_of(command: str) -> argparse.ArgumentParser:
    return importlib.import_module(f"mlx_aim.cli.{command.split()[0]}").build_parser()


def only_error_line(stderr: str) -> str:
    """The one `error: ...` line of a failed command's stderr (other lines: skipped inputs, progress)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.parametrize("module", ["main", *MODULES])
def test_every_entry_point_runs_as_a_module(module):
    done = subprocess.run([sys.executable, "-m", f"mlx_aim.cli.{module}", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")
    if module not in ("main", "probe", "search"):  # their options are their sub-commands' (below)
        assert "--json" in done.stdout and "--no-progress" in done.stdout


def test_installed_command_dispatches_to_each_module(capsys):
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    target, function = re.search(r'^mlx-aim = "([\w.]+):(\w+)"$', scripts, re.M).groups()
    assert getattr(importlib.import_module(target), function) is mlx_aim_cli.main
    assert {module for module, _ in mlx_aim_cli.COMMANDS.values()} == set(MODULES)
    for name in mlx_aim_cli.COMMANDS:
        with pytest.raises(SystemExit) as done:
            mlx_aim_cli.main([name, "--help"])
        assert done.value.code == 0 and capsys.readouterr().out.startswith(f"usage: mlx-aim {name} ")
    with pytest.raises(SystemExit) as done:
        mlx_aim_cli.main(["clasify", "x"])
    assert done.value.code == 2 and "invalid choice: 'clasify'" in capsys.readouterr().err
    # `python -m mlx_aim.cli` is the same command.
    done = subprocess.run([sys.executable, "-m", "mlx_aim.cli", "probe", "eval", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: mlx-aim probe eval ")


@pytest.mark.parametrize("command", list(MINIMAL))
def test_json_and_no_progress_everywhere(command):
    args = parser_of(command).parse_args([*MINIMAL[command], "--json", "--no-progress"])
    assert args.json is True and args.no_progress is True
    args = parser_of(command).parse_args(MINIMAL[command])
    assert args.json is False and args.no_progress is False


@pytest.mark.parametrize("command", LOADS_A_MODEL + LOADS_A_LIT)
def test_one_quantize_option_wherever_a_model_is_loaded(command, capsys):
    parser = parser_of(command)
    args = parser.parse_args([*MINIMAL[command], "--quantize", "4", "--q-group-size", "32"])
    assert quantization(args) == {"bits": 4, "group_size": 32}
    assert quantization(parser.parse_args([*MINIMAL[command], "--quantize", "8"])) == {"bits": 8, "group_size": 64}
    assert quantization(parser.parse_args(MINIMAL[command])) is None
    with pytest.raises(SystemExit) as refused:
        parser.parse_args([*MINIMAL[command], "--quantize", "3"])
    assert refused.value.code == 2 and "--quantize" in capsys.readouterr().err


# convert runs no model; the zero-shot LiT has a fixed image size
@pytest.mark.parametrize("command", [c for c in LOADS_A_MODEL if c not in ("convert", "zero_shot")])
def test_one_max_patches_option_wherever_a_model_runs(command, capsys):
    parser = parser_of(command)
    assert parser.parse_args([*MINIMAL[command], "--max-patches", "9"]).max_patches == 9
    assert parser.parse_args(MINIMAL[command]).max_patches is None  # the model's own config decides
    with pytest.raises(SystemExit) as refused:
        parser.parse_args([*MINIMAL[command], "--max-patches", "0"])
    assert refused.value.code == 2 and "--max-patches" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["classify", "zero_shot", "extract_features", "probe train", "probe eval",
                                     "pretrain", "search index"])
def test_negative_worker_count_is_a_usage_error(command, capsys):
    with pytest.raises(SystemExit) as refused:
        parser_of(command).parse_args([*MINIMAL[command], "--num-workers", "-1"])
    assert refused.value.code == 2
    assert "argument --num-workers: -1: expected an integer >= 0" in capsys.readouterr().err
    assert parser_of(command).parse_args([*MINIMAL[command], "--num-workers", "0"]).num_workers == 0


@pytest.fixture(scope="module")
def unreadable(tmp_path_factory):
    """Two class folders of files that only look like images."""
    root = tmp_path_factory.mktemp("unreadable")
    for name in ("a", "b"):
        for i in range(2):
            (root / name).mkdir(exist_ok=True)
            (root / name / f"{i}.png").write_text("not a PNG")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("models") / "tiny")


def test_missing_model_exits_2_with_one_error_line(tmp_path):
    image = save_image(tmp_path / "x.png", np.zeros((16, 16, 3), np.uint8))
    done = subprocess.run([sys.executable, "-m", "mlx_aim.cli.classify", "--model", str(tmp_path / "nowhere"),
                           str(image)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2
    assert only_error_line(done.stderr).startswith("error: cannot load the model: ")
    assert str(tmp_path / "nowhere") in done.stderr and done.stdout == ""


def test_only_unreadable_images_exit_1(unreadable, model_dir, tmp_path, capsys):
    from mlx_aim.cli import classify, extract_features, probe

    assert classify.main(["--model", str(model_dir), "--no-progress", "--json", str(unreadable)]) == 1
    out, err = capsys.readouterr()
    assert last_json(out)["num_images"] == 0 and last_json(out)["num_skipped"] == 4
    assert err.count("skipping ") == 4  # each skip shown as it happens, on stderr

    assert extract_features.main(["--model", str(model_dir), "--out", str(tmp_path / "f"), "--no-progress",
                                  str(unreadable)]) == 1
    assert "features of 0 image(s)" in capsys.readouterr().out

    # Probe training decides it by the library's typed error (NoUsableImages), not by its message.
    trunk = make_model_folder(tmp_path / "trunk", with_head=False)
    assert probe.main(["train", "--model", str(trunk), "--data", str(unreadable), "--out", str(tmp_path / "p"),
                       "--no-progress"]) == 1
    assert "0 usable training image(s)" in only_error_line(capsys.readouterr().err)

    # Pre-training: the loader's typed error once every draw for a batch slot failed.
    from mlx_aim.cli import pretrain

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config(width=32, depth=1, num_heads=2, head_depth=1,
                                             probe_layers=[0]).to_dict()))
    assert pretrain.main(["--config", str(config), "--data", str(unreadable), "--out", str(tmp_path / "run"),
                          "--steps", "2", "--batch-size", "2", "--val-ratio", "0", "--num-workers", "0",
                          "--no-progress"]) == 1
    assert "samples in a row failed to load" in only_error_line(capsys.readouterr().err)


def test_library_logs_skips_and_prints_nothing(tmp_path, capsys, caplog):
    missing = tmp_path / "missing.png"
    skipped = Skipped()
    with caplog.at_level("WARNING", logger="mlx_aim"):
        assert gather_images([missing], skipped) == []
    assert capsys.readouterr() == ("", "")
    assert [r.getMessage() for r in caplog.records] == [f"skipping {missing}: {skipped.items[0][1]}"]


def test_progress_option_turns_download_bars_off_for_the_run():
    from huggingface_hub.utils import are_progress_bars_disabled

    seen = []
    body = lambda args: seen.append(are_progress_bars_disabled()) or 0  # noqa: E731
    assert run_command(body, argparse.Namespace(no_progress=True)) == 0
    assert run_command(body, argparse.Namespace(no_progress=False)) == 0
    assert seen == [True, False] and not are_progress_bars_disabled()


def test_convert_takes_the_common_quantize_option(model_dir, tmp_path, capsys):
    from mlx_aim.cli import convert

    out = tmp_path / "q4"
    assert convert.main([str(model_dir), "--out", str(out), "--quantize", "4", "--q-group-size", "32",
                         "--json"]) == 0
    assert last_json(capsys.readouterr().out)["out"] == str(out)
    assert mlx_aim.load(out).config.quantization == {"bits": 4, "group_size": 32}
    assert convert.main([str(model_dir), "--out", str(out)]) == 2  # exists: a usage error, one line
    assert "already exists" in only_error_line(capsys.readouterr().err)


def test_pretrain_exit_statuses(tmp_path, monkeypatch, capsys):
    """A diverged run exits 1 (its JSON says so); an existing run without --resume is an error line and 2."""
    import mlx_aim.training.pretrain as train_module
    from mlx_aim.cli import pretrain

    data = write_image_folder(tmp_path / "data", num_train=16, num_val=4, image_size=16)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config(width=32, depth=1, num_heads=2, head_depth=1,
                                             probe_layers=[0]).to_dict()))
    real = train_module.TrainTransform
    calls = {"n": 0}

    class PoisonAfter(real):
        def __call__(self, image, rng):
            calls["n"] += 1
            out = super().__call__(image, rng)
            return out * np.nan if calls["n"] > 4 else out  # from the 2nd batch of 4 on

    monkeypatch.setattr(train_module, "TrainTransform", PoisonAfter)
    args = ["--config", str(config), "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "4",
            "--batch-size", "4", "--ckpt-interval", "1", "--val-interval", "0", "--num-workers", "0",
            "--no-progress", "--json"]
    assert pretrain.main(args) == 1
    out, err = capsys.readouterr()
    assert last_json(out) == {"error": "diverged", "step": 2,
                              "checkpoint": str(tmp_path / "run" / "checkpoints" / "step_00000001")}
    assert only_error_line(err).startswith("error: training diverged")
    assert pretrain.main(args) == 2
    assert "--resume" in only_error_line(capsys.readouterr().err)
