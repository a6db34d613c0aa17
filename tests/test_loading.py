"""Converting and loading checkpoints written by real torch.save, offline, and refusing bad ones."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mlx.core as mx
import mlx_aim
from mlx.utils import tree_flatten
from conftest import TWIN_TOLERANCE, dequantized_twin, last_json, rel_err, run_script, tiny_config
from mlx_aim.models.config import AIMConfig, get_config
from mlx_aim.checkpoints.loading import open_source, source_config
from torch_reference import AIMReference

TINY_HUB = {"img_size": 16, "patch_size": 4, "embed_dim": 64, "num_blocks": 4, "num_heads": 4}


def reference(config: AIMConfig, seed=0) -> AIMReference:
    torch.manual_seed(seed)
    return AIMReference.from_config(config).randomize_norms(seed).eval()


def ref_logits(ref: AIMReference, images: np.ndarray) -> np.ndarray:
    return ref.stages(torch.from_numpy(images.transpose(0, 3, 1, 2)))["logits"].numpy()


@pytest.fixture(scope="module")
def tiny_apple(tmp_path_factory):
    """aim-tiny's architecture saved as Apple's apple/AIM split files (backbone + best-layers head)."""
    folder = tmp_path_factory.mktemp("apple")
    config = get_config("aim-tiny").replace(image_size=64)
    ref = reference(config)
    sd = ref.state_dict()
    backbone = {k: v for k, v in sd.items() if not k.startswith("head.")}
    head = {k: v for k, v in sd.items() if k.startswith("head.")}
    torch.save(backbone, folder / "aim_tiny_attnprobe_backbone.pth")
    torch.save(head, folder / "aim_tiny_attnprobe_head_best_layers.pth")
    return folder, ref, config


def test_convert_apple_split_files_and_load(tiny_apple, tmp_path):
    folder, ref, config = tiny_apple
    files = sorted(str(p) for p in folder.iterdir())
    out = mlx_aim.convert(files, tmp_path / "mlx")
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "aim" and saved["probe_layers"] == config.probe_layers
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    model = mlx_aim.load(out)
    assert not model.training and type(model) is mlx_aim.AIM  # the backbone with its released head
    images = np.random.randn(2, 64, 64, 3).astype(np.float32)
    assert rel_err(np.array(model(mx.array(images))), ref_logits(ref, images)) < 1e-5
    # The same files load directly, without a conversion step.
    direct = mlx_aim.load(files)
    assert rel_err(np.array(direct(mx.array(images))), ref_logits(ref, images)) < 1e-5


def test_convert_refuses_to_overwrite_and_force_replaces(tiny_apple, tmp_path):
    folder, _, _ = tiny_apple
    files = sorted(str(p) for p in folder.iterdir())
    out = tmp_path / "mlx"
    mlx_aim.convert(files, out)
    with pytest.raises(FileExistsError, match="--force"):
        mlx_aim.convert(files, out)
    mlx_aim.convert(files, out, dtype="bfloat16", force=True)
    assert mlx_aim.load(out).trunk.blocks[0].mlp.fc1.weight.dtype == mx.bfloat16
    assert [p.name for p in tmp_path.iterdir()] == ["mlx"]  # no temporary folder left behind


@pytest.mark.parametrize("weights_format", ["safetensors", "bin"])
def test_apple_hub_layout_loads(tmp_path, weights_format):
    config = AIMConfig.from_dict(TINY_HUB)
    assert config.probe_layers == [0, 1, 2, 3]  # Apple's hub class: the last 6 blocks (here all 4)
    ref = reference(config, seed=2)
    (tmp_path / "config.json").write_text(json.dumps(TINY_HUB))
    if weights_format == "safetensors":
        mx.save_safetensors(str(tmp_path / "model.safetensors"),
                            {k: mx.array(v.numpy()) for k, v in ref.state_dict().items()})
    else:
        torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    model = mlx_aim.load(tmp_path)
    images = np.random.randn(3, 16, 16, 3).astype(np.float32)
    assert rel_err(np.array(model(mx.array(images))), ref_logits(ref, images)) < 1e-5


def test_float64_checkpoint_loads_as_float32(tmp_path):
    """float64 weights (no model computes in them, and Metal has none) load as float32, cast on the CPU stream."""
    config = AIMConfig.from_dict(TINY_HUB)
    ref = reference(config, seed=3)
    (tmp_path / "config.json").write_text(json.dumps(TINY_HUB))
    torch.save({k: v.double() for k, v in ref.state_dict().items()}, tmp_path / "pytorch_model.bin")
    model = mlx_aim.load(tmp_path)
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}
    images = np.random.randn(2, 16, 16, 3).astype(np.float32)
    assert rel_err(np.array(model(mx.array(images))), ref_logits(ref, images)) < 1e-5


def test_legacy_float16_and_views(tmp_path):
    """A legacy-format, float16 file whose qkv weights are views with offsets into one shared storage."""
    config = AIMConfig.from_dict(TINY_HUB)
    ref = reference(config, seed=3).half()
    sd = dict(ref.state_dict())
    big = torch.randn(4 * 3 * 64 * 64 + 5, dtype=torch.float16)
    for i in range(4):
        view = big[5 + i * 3 * 64 * 64 : 5 + (i + 1) * 3 * 64 * 64].view(3 * 64, 64)
        view.copy_(sd[f"trunk.blocks.{i}.attn.qkv.weight"])
        sd[f"trunk.blocks.{i}.attn.qkv.weight"] = view
    (tmp_path / "config.json").write_text(json.dumps(TINY_HUB))
    torch.save(sd, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    model = mlx_aim.load(tmp_path, dtype="float32")
    images = np.random.randn(2, 16, 16, 3).astype(np.float32)
    expected = ref_logits(ref.float(), images)
    assert rel_err(np.array(model(mx.array(images))), expected) < 1e-5


def test_quantized_conversion(tiny_apple, tmp_path):
    folder, ref, config = tiny_apple
    files = sorted(str(p) for p in folder.iterdir())
    out = mlx_aim.convert(files, tmp_path / "q4", quantize=4, q_group_size=64)
    saved = json.loads((out / "config.json").read_text())
    assert saved["quantization"] == {"bits": 4, "group_size": 64}
    model = mlx_aim.load(out)
    assert type(model.trunk.blocks[0].mlp.fc1).__name__ == "QuantizedLinear"
    assert type(model.head.linear).__name__ == "Linear"  # the probe head stays in float
    images = np.random.randn(2, 64, 64, 3).astype(np.float32)
    assert rel_err(np.array(model(mx.array(images))), ref_logits(ref, images)) < 0.1
    twin = dequantized_twin(model)  # what the 4-bit trunk must compute: its dequantized weights, in float
    assert rel_err(np.array(model(mx.array(images))), np.array(twin(mx.array(images)))) < TWIN_TOLERANCE["float32"]
    # Quantizing at load time gives the same model as loading the quantized conversion.
    on_load = mlx_aim.load(files, quantize=4)
    np.testing.assert_allclose(np.array(on_load(mx.array(images))), np.array(model(mx.array(images))), atol=1e-5)


def test_sharded_output(tiny_apple, tmp_path):
    folder, ref, _ = tiny_apple
    files = sorted(str(p) for p in folder.iterdir())
    out = mlx_aim.convert(files, tmp_path / "sharded", max_shard_bytes=4 * 1024**2)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    images = np.random.randn(1, 64, 64, 3).astype(np.float32)
    assert rel_err(np.array(mlx_aim.load(out)(mx.array(images))), ref_logits(ref, images)) < 1e-5


def _bad_source(tmp_path, edit):
    config = AIMConfig.from_dict(TINY_HUB)
    sd = dict(reference(config).state_dict())
    edit(sd)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(TINY_HUB))
    torch.save(sd, tmp_path / "src" / "pytorch_model.bin")
    return tmp_path / "src"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("trunk.blocks.2.mlp.fc2.weight"), r"missing keys.*blocks\.2\.mlp\.fc2"),
        (lambda sd: sd.update({"trunk.extra.weight": torch.zeros(2)}), r"unexpected keys.*trunk\.extra"),
        (lambda sd: sd.update({"head.v.weight": torch.zeros(64, 63)}), r"head\.v\.weight.*\(64, 63\).*\(64, 64\)"),
    ],
)
def test_wrong_keys_and_shapes_leave_no_output(tmp_path, edit, message):
    src = _bad_source(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        mlx_aim.convert(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_runs_nothing_and_leaves_no_output(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text(json.dumps(TINY_HUB))
    torch.save({"trunk.post_trunk_norm.weight": _Payload(marker)}, evil / "pytorch_model.bin")
    with pytest.raises(ValueError, match="system"):
        mlx_aim.convert(evil, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_convert_cli(tiny_apple, tmp_path):
    folder, _, _ = tiny_apple
    files = sorted(str(p) for p in folder.iterdir())
    args = [*files, "--out", tmp_path / "m", "--json"]
    figures = last_json(run_script("convert/convert.py", *args).stdout)
    assert figures["peak_rss_mb"] > 0 and Path(figures["out"]).exists()
    again = run_script("convert/convert.py", *args, check_rc=2)
    assert "already exists" in again.stderr


def test_offline_hub_cache(tmp_path, monkeypatch):
    """A hub repo id resolves from huggingface_hub's cache with HF_HUB_OFFLINE set: no network."""
    config = AIMConfig.from_dict(TINY_HUB)
    ref = reference(config, seed=4)
    snapshot = tmp_path / "hub" / "models--someone--aim-tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    (snapshot / "config.json").write_text(json.dumps(TINY_HUB))
    mx.save_safetensors(str(snapshot / "model.safetensors"),
                        {k: mx.array(v.numpy()) for k, v in ref.state_dict().items()})
    script = (
        "import numpy as np, mlx.core as mx, mlx_aim;"
        "m = mlx_aim.load('someone/aim-tiny');"
        "np.save('out.npy', np.array(m(mx.array(np.load('in.npy')))))"
    )
    images = np.random.randn(2, 16, 16, 3).astype(np.float32)
    np.save(tmp_path / "in.npy", images)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert rel_err(np.load(tmp_path / "out.npy"), ref_logits(ref, images)) < 1e-5


def test_unknown_source_names_it():
    with pytest.raises(FileNotFoundError, match="no-such-thing"):
        open_source("no-such-thing")


def test_probe_head_file_sets_classes_and_layers(tiny_apple, tmp_path):
    """A trained head with 7 classes, saved with Apple's head keys, loads over a trunk whose config says 1000."""
    folder, ref, config = tiny_apple
    trunk = mlx_aim.convert([str(folder / "aim_tiny_attnprobe_backbone.pth")], tmp_path / "trunk")
    assert type(mlx_aim.load(trunk)) is mlx_aim.AIMEncoder  # the backbone alone: no probe head
    d = config.width
    head = {"head.k.weight": mx.random.normal((d, d)), "head.v.weight": mx.random.normal((d, d)),
            "head.cls_token": mx.random.normal((1, 1, d)), "head.linear.weight": mx.random.normal((7, d)),
            "head.bn.running_mean": mx.zeros((d,)), "head.bn.running_var": mx.ones((d,))}
    mx.save_safetensors(str(tmp_path / "head.safetensors"), head, metadata={"probe_layers": "[4, 7]"})
    model = mlx_aim.load(trunk, head=tmp_path / "head.safetensors")
    assert type(model) is mlx_aim.AIM and model.config.num_classes == 7 and model.config.probe_layers == [4, 7]
    assert model(mx.random.normal((2, 64, 64, 3))).shape == (2, 7)
    np.testing.assert_array_equal(np.array(model.head.linear.weight), np.array(head["head.linear.weight"]))
    with pytest.raises(ValueError, match="head.\\* keys"):
        mx.save_safetensors(str(tmp_path / "bad.safetensors"), {"trunk.x": mx.zeros((1,))})
        mlx_aim.load(trunk, head=tmp_path / "bad.safetensors")


def test_folders_that_are_not_runs_keep_their_errors(tmp_path):
    """Only a folder with a pre-training run's markers (train_config.json or checkpoints/step_*/, and no
    weights of its own) stands for its model/: other folders resolve, or fail, as before."""
    from mlx_aim.checkpoints.weights import save_model

    stray = tmp_path / "stray"  # neither a model nor a run
    (stray / "checkpoints" / "notes").mkdir(parents=True)
    (stray / "pretrain").mkdir()
    (stray / "readme.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match="no config.json and no checkpoint files"):
        open_source(stray)
    config = tiny_config(depth=2, probe_layers=[0, 1])
    half = tmp_path / "half"  # a model folder without its weights
    half.mkdir()
    config.save(half / "config.json")
    (half / "model").mkdir()
    with pytest.raises(FileNotFoundError, match="weight file missing from the model folder"):
        open_source(half)
    # A model folder with a stray train_config.json is still a model folder (its weights, not model/'s).
    from mlx.utils import tree_flatten

    folder = save_model(tmp_path / "model-folder", dict(tree_flatten(mlx_aim.build_model(config).parameters())),
                        config)
    (folder / "train_config.json").write_text("{}")
    assert open_source(folder).description == f"MLX model folder {folder}"


def test_source_config_reads_no_weights(tiny_apple, tmp_path, monkeypatch):
    """A source's config through load's own dispatch, without reading a tensor (nor downloading a preset)."""
    folder, _, config = tiny_apple
    files = sorted(str(p) for p in folder.iterdir())
    assert source_config(files) == open_source(files).config == config  # from the shapes and the file names
    assert source_config(files, probe_layers="last").probe_layers == list(range(6, 12))
    out = mlx_aim.convert(files, tmp_path / "mlx")
    (out / "model.safetensors").write_bytes(b"not read")
    assert source_config(out, probe_layers=[2, 3]) == config.replace(probe_layers=[2, 3])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert source_config("aim-600M", probe_layers="last") == get_config("aim-600M", probe_layers="last")
    with pytest.raises(FileNotFoundError, match="no-such-thing"):
        source_config("no-such-thing")
