"""A model folder's files are untrusted: a file that cannot be decoded is a ValueError naming it, and the command line
reports it as one error line, exit status 2."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
import mlx_aim
from mlx_aim.cli import classify
from mlx_aim.data import preprocessing_for
from mlx_aim.data.preprocessing import PREPROCESSOR_CONFIG
from mlx_aim.tokenizer import CLIPTokenizer
from probe_helpers import make_model_folder, probe_config, save_image
from test_cli import only_error_line

INDEX = "model.safetensors.index.json"
# A CLIPImageProcessor file for the tiny models (16-pixel images).
PROCESSOR = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 16},
             "crop_size": {"height": 16, "width": 16}}


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> Path:
    """A tiny random-weight MLX model folder (config.json + model.safetensors)."""
    return make_model_folder(tmp_path_factory.mktemp("honest") / "tiny")


def copy_of(honest: Path, folder: Path) -> Path:
    shutil.copytree(honest, folder)
    return folder


def keys_of(folder: Path) -> list[str]:
    return list(mx.load(str(folder / "model.safetensors")))


def write_index(folder: Path, keys, shard: str) -> Path:
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {k: shard for k in keys}}))
    return folder / INDEX


# ---------------------------------------------------------------------------------------------------
# Files that cannot be decoded.

CONFIG_MAX, TOKENIZER_MAX = 16 * 1024**2, 64 * 1024**2


def padded(value, size: int) -> str:
    """`value` as JSON, past `size` bytes with trailing whitespace: valid, only too large."""
    text = json.dumps(value)
    return text + " " * (size + 1 - len(text))


def undecodable(folder: Path, name: str, defect: str) -> Path:
    """`folder`'s file `name` (honest before) made nested past the parser, not UTF-8, or one byte too large."""
    path = folder / name
    if defect == "nested":
        path.write_text("[" * 200_000)
    elif defect == "not-utf8":
        path.write_bytes(b'{"model_type": "\xff"}')
    else:
        size = TOKENIZER_MAX if name in ("vocab.json", "merges.txt") else CONFIG_MAX
        honest = path.read_text()
        path.write_text(honest + "\n" * (size + 1 - len(honest)) if name == "merges.txt"
                        else padded(json.loads(honest), size))
    return path


DEFECT_MESSAGES = {"nested": "not valid JSON (nested too deeply)", "not-utf8": "not UTF-8 text",
                   "too-large": "larger than"}


@pytest.mark.parametrize("name, defect", [
    ("config.json", "nested"), ("config.json", "not-utf8"), ("config.json", "too-large"),
    (INDEX, "nested"), (INDEX, "not-utf8"), (INDEX, "too-large"),
    (PREPROCESSOR_CONFIG, "nested"), (PREPROCESSOR_CONFIG, "too-large"),
    ("vocab.json", "nested"), ("vocab.json", "too-large"), ("merges.txt", "too-large"),
])
def test_a_file_that_cannot_be_decoded_is_a_value_error_naming_it(honest, tmp_path, name, defect):
    folder = copy_of(honest, tmp_path / "model")
    write_index(folder, keys_of(folder), "model.safetensors")
    (folder / PREPROCESSOR_CONFIG).write_text(json.dumps(PROCESSOR))
    (folder / "vocab.json").write_text(json.dumps({"a": 0}))
    (folder / "merges.txt").write_text("#version: 0.2\na a\n")
    path = undecodable(folder, name, defect)
    with pytest.raises(ValueError) as refused:
        if name in ("vocab.json", "merges.txt"):
            CLIPTokenizer.from_folder(folder)
        elif name == PREPROCESSOR_CONFIG:
            preprocessing_for(probe_config(), folder)
        else:
            mlx_aim.load(folder)
    assert str(refused.value).startswith(f"{path}: {DEFECT_MESSAGES[defect]}")


# ---------------------------------------------------------------------------------------------------
# The command line: one error line and exit status 2 for each.

def nested_config(folder: Path) -> str:
    (folder / "config.json").write_text("[" * 200_000)
    return f"{folder / 'config.json'}: not valid JSON"


@pytest.mark.parametrize("defect", [nested_config],
                         ids=lambda f: f.__name__)
def test_classify_reports_a_hostile_folder_in_one_line(honest, tmp_path, capsys, defect):
    folder = copy_of(honest, tmp_path / "model")
    expected = defect(folder)
    image = save_image(tmp_path / "x.png", np.zeros((16, 16, 3), np.uint8))
    assert classify.main(["--model", str(folder), "--num-workers", "0", "--no-progress", str(image)]) == 2
    out, err = capsys.readouterr()
    line = only_error_line(err)
    assert line.startswith("error: cannot load the model: ") and expected in line
    assert str(image) not in out  # nothing classified
