"""A model folder's files are untrusted: what they name stays in the folder (`fileio.confined`), a preprocessor file
asks for sizes within the model's bound, config values are of their type, and a file that cannot be decoded is a
ValueError naming it; the command line reports each as one error line, exit status 2."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
import mlx_aim
from mlx_aim.cli import classify
from mlx_aim.data import preprocessing_for
from mlx_aim.data.preprocessing import PREPROCESSOR_CONFIG
from mlx_aim.checkpoints.loading import local_folder
from mlx_aim.models.tokenizer import CLIPTokenizer
from probe_helpers import make_model_folder, native_config, probe_config, save_image
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
# What a folder's files name stays in the folder.

@pytest.mark.parametrize("kind", ["relative", "absolute", "symlink", "nul"])
def test_an_index_naming_a_shard_outside_the_folder_is_refused(honest, tmp_path, kind):
    folder = copy_of(honest, tmp_path / "model")
    keys = keys_of(folder)
    outside = tmp_path / "outside.safetensors"
    os.replace(folder / "model.safetensors", outside)  # a working shard, one folder up
    if kind == "symlink":
        (folder / "link.safetensors").symlink_to(outside)
    name = {"relative": "../outside.safetensors", "absolute": str(outside), "symlink": "link.safetensors",
            "nul": "model\0.safetensors"}[kind]
    index = write_index(folder, keys, name)
    with pytest.raises(ValueError) as refused:
        mlx_aim.load(folder)
    message = str(refused.value)
    assert f"{index}: weight_map[{keys[0]!r}]: {name!r}" in message and "expected a file inside" in message


def test_an_index_that_links_out_of_the_folder_is_refused(honest, tmp_path):
    folder = copy_of(honest, tmp_path / "model")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    write_index(outside, keys_of(folder), "model.safetensors")  # names the folder's own, honest shard
    (folder / INDEX).symlink_to(outside / INDEX)
    with pytest.raises(ValueError, match=f"{folder}: '{INDEX}' resolves to {outside / INDEX}, outside"):
        mlx_aim.load(folder)


def test_files_beside_the_weights_stay_in_the_folder(honest, tmp_path):
    """A preprocessor file linking out is neither read for preprocessing nor carried into a conversion."""
    folder = copy_of(honest, tmp_path / "model")
    outside = tmp_path / PREPROCESSOR_CONFIG
    outside.write_text(json.dumps(PROCESSOR))
    (folder / PREPROCESSOR_CONFIG).symlink_to(outside)
    expected = f"{folder}: '{PREPROCESSOR_CONFIG}' resolves to {outside}, outside"
    with pytest.raises(ValueError, match=expected):
        preprocessing_for(probe_config(), folder)
    with pytest.raises(ValueError, match=expected):
        mlx_aim.convert(folder, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()


def test_tokenizer_files_stay_in_the_folder(tmp_path):
    folder, outside = tmp_path / "tokenizer", tmp_path / "vocab.json"
    folder.mkdir()
    outside.write_text(json.dumps({"a": 0}))
    (folder / "vocab.json").symlink_to(outside)
    (folder / "merges.txt").write_text("#version: 0.2\na a\n")
    with pytest.raises(ValueError, match=f"{folder}: 'vocab.json' resolves to {outside}, outside"):
        CLIPTokenizer.from_folder(folder)


def hub_cache(root: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """huggingface_hub's cache layout for `repo_id` at one revision, which refs/main names: each file's bytes in
    blobs/, and the snapshot's file a relative symlink to its blob."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("c" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    for i, (name, source) in enumerate(files.items()):
        shutil.copyfile(source, repo / "blobs" / f"{i:064x}")
        (snapshot / name).symlink_to(Path("..", "..", "blobs", f"{i:064x}"))
    return snapshot


def test_a_hub_snapshot_reads_its_blobs_and_nothing_outside_its_cache_folder(honest, tmp_path, monkeypatch):
    """A snapshot's files are symlinks into the repo's blobs/: its bound is the repo's cache folder, so they load,
    from the repo id (offline) as from the snapshot's path; a symlink out of that folder is refused."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot = hub_cache(tmp_path / "hub", "someone/tiny", {"config.json": honest / "config.json",
                                                          "model.safetensors": honest / "model.safetensors"})
    assert local_folder("someone/tiny") == snapshot
    assert mlx_aim.load("someone/tiny").config == mlx_aim.load(honest).config
    assert mlx_aim.load(snapshot).config == mlx_aim.load(honest).config

    outside = tmp_path / "elsewhere" / "blob"  # beside the cache, not in it
    outside.parent.mkdir()
    shutil.copyfile(honest / "model.safetensors", outside)
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(Path("..", "..", "..", "..", "elsewhere", "blob"))
    repo = snapshot.parents[1]
    expected = f"{snapshot}: 'model.safetensors' resolves to {outside}, outside {repo}"
    for source in ("someone/tiny", snapshot):
        with pytest.raises(ValueError, match=expected):
            mlx_aim.load(source)


# ---------------------------------------------------------------------------------------------------
# What a preprocessor file may ask for.

@pytest.mark.parametrize("config, bound, why", [
    (probe_config(), 64, "4 x the model's image size 16"),
    (native_config(), 4096 * 4, "max_patches 4096 x patch_size 4"),
], ids=["fixed-size", "native"])
def test_a_preprocessor_asking_past_the_models_bound_is_refused(tmp_path, config, bound, why):
    file = tmp_path / PREPROCESSOR_CONFIG
    file.write_text(json.dumps({**PROCESSOR, "size": {"shortest_edge": bound}}))
    assert preprocessing_for(config, tmp_path).source == str(file)  # at the bound: taken
    file.write_text(json.dumps({**PROCESSOR, "size": {"shortest_edge": 10**6}}))
    with pytest.raises(ValueError, match=rf"{file}: size.shortest_edge=1000000: past the limit {bound} \({why}\)"):
        preprocessing_for(config, tmp_path)


# ---------------------------------------------------------------------------------------------------
# Config values of the wrong type, and files that cannot be decoded.

@pytest.mark.parametrize("key, value, expected", [
    ("depth", "3", "a 32-bit integer"),
    ("depth", True, "a 32-bit integer"),
    ("num_classes", "10", "a 32-bit integer"),
    ("head_width", "32", "a 32-bit integer"),
    ("mlp_ratio", "4", "a finite number"),
    ("norm_eps", "1e-6", "a finite number"),
    ("probe_layers", 5, "a list of integers or null"),
    ("name", {"a": 1}, "a string or null"),
    ("quantization", {"bits": "4", "group_size": 64}, 'positive integers "bits" and "group_size"'),
])
def test_config_values_of_the_wrong_type_are_refused_by_key(honest, tmp_path, key, value, expected):
    folder = copy_of(honest, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    if key == "depth":
        del config["probe_layers"]  # the default ones are computed from the depth
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=f"config {key}=.*: expected {expected}"):
        mlx_aim.load(folder)


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


def shard_outside(folder: Path) -> str:
    keys = keys_of(folder)
    os.replace(folder / "model.safetensors", folder.parent / "outside.safetensors")
    write_index(folder, keys, "../outside.safetensors")
    return f"{folder / INDEX}: weight_map["


def huge_resize(folder: Path) -> str:
    (folder / PREPROCESSOR_CONFIG).write_text(json.dumps({**PROCESSOR, "size": {"shortest_edge": 10**6}}))
    return "size.shortest_edge=1000000: past the limit 64"


def string_depth(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    del config["probe_layers"]
    (folder / "config.json").write_text(json.dumps({**config, "depth": "3"}))
    return "config depth='3': expected a 32-bit integer"


@pytest.mark.parametrize("defect", [nested_config, shard_outside, huge_resize, string_depth],
                         ids=lambda f: f.__name__)
def test_classify_reports_a_hostile_folder_in_one_line(honest, tmp_path, monkeypatch, capsys, defect):
    def no_resize(*args, **kwargs):
        raise AssertionError("an image was resized")

    monkeypatch.setattr("mlx_aim.data.preprocessing.resize_short_side", no_resize)
    folder = copy_of(honest, tmp_path / "model")
    expected = defect(folder)
    image = save_image(tmp_path / "x.png", np.zeros((16, 16, 3), np.uint8))
    assert classify.main(["--model", str(folder), "--num-workers", "0", "--no-progress", str(image)]) == 2
    out, err = capsys.readouterr()
    line = only_error_line(err)
    assert line.startswith("error: cannot load the model: ") and expected in line
    assert str(image) not in out  # nothing classified
