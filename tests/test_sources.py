"""Which kind of source a name is (`checkpoints.sources`: one resolver per kind, in one order), what a loaded model
records of where it came from (`model.source`), and dtype and quantization parsed once, where they come in."""

import json
import re
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mlx_aim
from conftest import tiny_config
from mlx_aim.checkpoints import hub, loading, sources
from mlx_aim.checkpoints.sources import RESOLVERS, ModelSource, Named, locate
from mlx_aim.checkpoints.weights import save_model
from mlx_aim.cli import classify as classify_cli
from mlx_aim.cli.options import precision
from mlx_aim.models import model as model_module
from mlx_aim.models.config import get_config
from mlx_aim.tasks.inference import open_model


def model_folder(folder: Path, config=None) -> Path:
    config = config or tiny_config()
    return save_model(folder, dict(tree_flatten(mlx_aim.build_model(config).parameters())), config)


def taken_by(source) -> str:
    """The name of the first resolver that takes `source` (the one `locate` answers with)."""
    named = Named(source)
    return next(resolve.__name__ for resolve in RESOLVERS if resolve(named) is not None)


def test_the_docstring_lists_the_resolvers_in_the_order_they_are_tried():
    listed = re.findall(r"^\d+\. `(\w+)`", sources.__doc__, flags=re.MULTILINE)
    assert listed == [resolve.__name__ for resolve in RESOLVERS]


def test_each_local_kind_is_taken_by_its_own_resolver(tmp_path):
    folder = model_folder(tmp_path / "mlx")
    weights = folder / "model.safetensors"
    run = tmp_path / "run"  # a pre-training run: train_config.json and its exported trunk
    model_folder(run / "model")
    (run / "train_config.json").write_text("{}")
    demo = tmp_path / "demo"  # a demo run: the pre-training run inside it
    model_folder(demo / "pretrain" / "model")
    (demo / "pretrain" / "train_config.json").write_text("{}")
    step = model_folder(tmp_path / "step")  # a pre-training checkpoint: state.json beside the weights
    (step / "state.json").write_text("{}")
    loose = tmp_path / "loose"  # checkpoint files without config.json
    loose.mkdir()
    (loose / "backbone.safetensors").write_bytes(weights.read_bytes())
    aim_hub, aimv2_hub = tmp_path / "aim-hub", tmp_path / "aimv2-hub"
    for hub_folder, params in ((aim_hub, {"img_size": 16, "patch_size": 4, "embed_dim": 64, "num_heads": 4}),
                               (aimv2_hub, {"model_type": "aimv2_vision_model", "hidden_size": 64})):
        hub_folder.mkdir()
        (hub_folder / "config.json").write_text(json.dumps(params))
        (hub_folder / "model.safetensors").write_bytes(weights.read_bytes())

    assert taken_by(folder) == "mlx_folder"
    assert taken_by([weights]) == taken_by([weights, loose / "backbone.safetensors"]) == "checkpoint_files"
    assert taken_by(run) == taken_by(demo) == "run_folder"
    assert locate(run).folder == run / "model" and locate(demo).folder == demo / "pretrain" / "model"
    assert taken_by(step) == "pretraining_checkpoint" and locate(step).drop_prefix == "pixel_head."
    assert taken_by(loose) == "checkpoint_folder"
    assert taken_by(aim_hub) == "aim_hub_folder" and locate(aim_hub).layout == "torch"
    assert taken_by(aimv2_hub) == "aimv2_hub_folder" and locate(aimv2_hub).stated == {"width": 64}
    with pytest.raises(FileNotFoundError, match="no-such-thing: no such file or folder, and not a preset"):
        locate("no-such-thing")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'gone'}: no such file or folder$"):
        locate([weights, tmp_path / "gone"])


def test_hub_names_resolve_to_what_they_download(tmp_path, monkeypatch):
    """Presets and repo ids are located through `hub` (here answered from local files): a repo id as the folder it
    downloads, an AIM preset as Apple's files, an AIMv2 name as Apple's MLX file at its pinned revision."""
    folder = model_folder(tmp_path / "mlx")
    monkeypatch.setattr(hub, "download_repo", lambda repo_id: str(folder))
    monkeypatch.setattr(hub, "download_apple_files", lambda preset, probe_layers: [str(folder / "model.safetensors")])
    released = tmp_path / "released"
    released.mkdir()
    (released / hub.AIMV2_FILE).write_bytes(b"not opened")
    monkeypatch.setattr(hub, "download_aimv2_files", lambda preset: released)

    assert taken_by("someone/tiny") == "hub_repo" and locate("someone/tiny").name is None
    assert locate("apple/aimv2-large-patch14-224").name == "aimv2-large-patch14-224"  # a released name's repo
    assert taken_by("aim-600M") == "aim_preset" and locate("aim-600M").files == [folder / "model.safetensors"]
    located = locate("aimv2-huge-patch14-448")
    assert taken_by("aimv2-huge-patch14-448") == "released_aimv2"
    assert located.config == get_config("aimv2-huge-patch14-448") and located.folder == released
    assert located.files == [released / hub.AIMV2_FILE] and located.layout == "mlx"
    (tmp_path / "aim-600M").mkdir()  # a local path of a preset's name is the local path
    (tmp_path / "aim-600M" / "backbone.safetensors").write_bytes(b"not opened")
    monkeypatch.chdir(tmp_path)
    assert taken_by("aim-600M") == "checkpoint_folder"


def test_a_loaded_model_records_its_source(tmp_path):
    folder = model_folder(tmp_path / "mlx")
    assert mlx_aim.load(folder).source == ModelSource((str(folder),), folder, f"MLX model folder {folder}")
    run = tmp_path / "run"
    model_folder(run / "model")
    (run / "train_config.json").write_text("{}")
    assert mlx_aim.load(run).source.folder == run / "model"
    weights = model_folder(tmp_path / "aim-tiny", get_config("aim-tiny")) / "model.safetensors"
    files = mlx_aim.load([weights]).source  # a preset's architecture, from the shapes
    assert files.folder == weights.parent and files.name == str(weights)
    assert open_model(run, random_init=True, seed=1).source.folder == run / "model"  # random init: the same folder


def test_the_command_line_parses_precision_once():
    args = classify_cli.build_parser().parse_args(["x.png", "--model", "m", "--dtype", "bfloat16", "--quantize", "4",
                                                   "--q-group-size", "32"])
    assert precision(args) == {"dtype": mx.bfloat16, "quantize": {"bits": 4, "group_size": 32}}
    plain = classify_cli.build_parser().parse_args(["x.png", "--model", "m"])
    assert precision(plain) == {"dtype": None, "quantize": None}


@pytest.fixture
def parse_calls(monkeypatch) -> dict:
    """Counts of the calls that parse a dtype or a quantization (a name, a bit count: not a value already parsed) in
    `loading` and in `build_model`'s module, which takes a name from its own callers and an mx.Dtype from `load`."""
    calls = {}
    for module, prefix in ((loading, "loading"), (model_module, "model")):
        for name in ("parse_dtype", "parse_quantize"):
            def counted(value, *args, _parse=getattr(module, name), _key=f"{prefix}.{name}", **kwargs):
                if value is not None and not isinstance(value, mx.Dtype):
                    calls[_key] = calls.get(_key, 0) + 1
                return _parse(value, *args, **kwargs)

            monkeypatch.setattr(module, name, counted)
    return calls


def test_a_preset_is_converted_and_loaded_with_its_precision_parsed_once(tmp_path, monkeypatch, parse_calls):
    """`load("aim-tiny", ...)` converts Apple's files (here a local file) into the cache once and loads that; the
    dtype and quantization are parsed where they come in, not again by the conversion or by `build_model`."""
    config = get_config("aim-tiny")
    weights = model_folder(tmp_path / "apple", config) / "model.safetensors"
    monkeypatch.setattr(hub, "download_apple_files", lambda preset, probe_layers: [str(weights)])
    monkeypatch.setenv("MLX_AIM_CACHE", str(tmp_path / "cache"))
    model = mlx_aim.load("aim-tiny", dtype="bfloat16", quantize=8)
    cached = tmp_path / "cache" / "aim-tiny-best-layers-bfloat16-q8g64"
    assert parse_calls == {"loading.parse_dtype": 1, "loading.parse_quantize": 1}
    assert model.dtype == mx.bfloat16 and model.config.quantization == {"bits": 8, "group_size": 64}
    assert model.source == ModelSource(("aim-tiny",), cached, f"MLX model folder {cached}")
    parse_calls.clear()
    mlx_aim.convert(weights.parent, tmp_path / "converted", dtype="float16", quantize=4)
    assert parse_calls == {"loading.parse_dtype": 1, "loading.parse_quantize": 1}
