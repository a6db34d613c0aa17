"""AIMv2 checkpoints loaded and converted torch-free: our own MLX folders; the transformers layout (folders written by
transformers' `save_pretrained`), Apple's keys in `model.safetensors` and Apple's `mlx_model.safetensors`, each
matching transformers' `Aimv2VisionModel` stage by stage and each other exactly; hub ids and the released names
through an offline huggingface_hub cache; the preprocessor file carried along; the errors that name the problem."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import Aimv2Config, Aimv2Model

import mlx.core as mx
import mlx_aim
from aimv2_reference import make_reference, randomize, reference_stages, transformers_config
from conftest import ROOT, TWIN_TOLERANCE, dequantized_twin, last_json, rel_err, run_script
from mlx.utils import tree_flatten
from mlx_aim.models.config import AIMV2_PRESET_NAMES, AIMv2Config, get_config
from mlx_aim.data import preprocessing_for
from mlx_aim.checkpoints.loading import AIMV2_REVISIONS, local_folder, open_source, source_config
from mlx_aim.models.model import AIMv2LiT
from mlx_aim.checkpoints.weights import save_model
from mlx_aim.models.tokenizer import TOKENIZER_FILES

TOL = 1e-5
LAYOUTS = ("transformers", "apple", "apple-mlx")
# A CLIPImageProcessor file unlike the family default (mean/std 0.5), so that reading it shows.
PREPROCESSOR = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 16},
                "resample": 3, "do_center_crop": True, "crop_size": {"height": 16, "width": 16}, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}


def tiny_v2(**overrides) -> AIMv2Config:
    """A tiny AIMv2: 16-pixel images in 4x4-pixel patches (16 tokens), width 64, depth 3, SwiGLU 128."""
    fields = dict(image_size=16, patch_size=4, width=64, depth=3, num_heads=4, hidden_dim=128)
    return AIMv2Config(**{**fields, **overrides})


def random_images(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, height, width, 3)).astype(np.float32)


def our_stages(model, images: np.ndarray) -> dict[str, np.ndarray]:
    """Our model's stages under transformers' hook names (`aimv2_reference.reference_stages`)."""
    normed, features = model.extract_features(mx.array(images))
    out = {"embedding": np.array(model.preprocessor(mx.array(images))), "trunk": np.array(normed)}
    out.update({f"block_{i}": np.array(f) for i, f in enumerate(features)})
    return out


def assert_stages_match(ours: dict, ref: dict) -> None:
    assert set(ours) == set(ref)
    errors = {k: rel_err(ours[k], ref[k]) for k in ref}
    assert max(errors.values()) < TOL, errors


# ---------------------------------------------------------------------------------------------------
# The three layouts, written from one transformers model


def apple_keys(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers' weights under Apple's keys in Apple's PyTorch layouts: the tests' own renaming
    (Apple's names in apple/ml-aim's `aim-v2/aim/v2/torch/`, transformers' in
    `models/aimv2/modeling_aimv2.py`), kept apart from the library's."""
    names = {"embeddings.patch_embed.weight": "preprocessor.patchifier.proj.weight",
             "embeddings.patch_embed.bias": "preprocessor.patchifier.proj.bias",
             "embeddings.rms_norm.weight": "preprocessor.patchifier.norm.weight",
             "rms_norm.weight": "trunk.post_trunk_norm.weight"}
    block = {"attention.out_proj.weight": "attn.proj.weight", "rms_norm1.weight": "norm_1.weight",
             "rms_norm2.weight": "norm_2.weight", "ffn.gate_proj.weight": "mlp.fc1.weight",
             "ffn.up_proj.weight": "mlp.fc3.weight", "ffn.down_proj.weight": "mlp.fc2.weight"}
    out = {}
    for key, value in hf.items():
        layer = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
        if key in names:
            out[names[key]] = value
        elif key == "embeddings.position_embedding.weight":
            out["preprocessor.pos_embed"] = value[None]
        elif layer and layer[2] in block:
            out[f"trunk.blocks.{layer[1]}.{block[layer[2]]}"] = value
        elif layer and layer[2] == "attention.q_proj.weight":
            out[f"trunk.blocks.{layer[1]}.attn.qkv.weight"] = np.concatenate(
                [hf[f"encoder.layers.{layer[1]}.attention.{n}_proj.weight"] for n in "qkv"])
        elif not (layer and layer[2] in ("attention.k_proj.weight", "attention.v_proj.weight")):
            raise KeyError(key)
    return out


def mlx_layout(apple: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Apple's PyTorch layouts -> its MLX ones (mlx_model.safetensors): the patch conv OIHW -> OHWI."""
    conv = "preprocessor.patchifier.proj.weight"
    return {k: np.ascontiguousarray(v.transpose(0, 2, 3, 1)) if k.endswith(conv) else v for k, v in apple.items()}


def apple_config(config: AIMv2Config) -> dict:
    """A config.json as Apple's remote code wrote it: transformers' names, "model_type" "aimv2", no is_native."""
    return {"architectures": ["AIMv2Model"], "model_type": "aimv2", "hidden_size": config.width,
            "intermediate_size": config.hidden_dim, "num_hidden_layers": config.depth,
            "num_attention_heads": config.num_heads, "num_channels": 3, "patch_size": config.patch_size,
            "image_size": config.image_size or 224, "rms_norm_eps": 1e-5, "qkv_bias": False, "use_bias": False,
            "auto_map": {"AutoConfig": "configuration_aimv2.AIMv2Config"}}


def write_layouts(root, ref, config: AIMv2Config) -> dict:
    """One folder per layout from `ref`'s weights (Apple's two beside Apple's remote-code config.json, as at Apple's
    revisions), and a hub-like folder holding all three files (as a hub repo does now) with a preprocessor file."""
    hf = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    apple = apple_keys(hf)
    folders = {name: root / name for name in (*LAYOUTS, "hub")}
    ref.save_pretrained(folders["transformers"])
    folders["apple"].mkdir()
    (folders["apple"] / "config.json").write_text(json.dumps(apple_config(config)))
    save_file(apple, str(folders["apple"] / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(folders["apple"], folders["apple-mlx"], ignore=shutil.ignore_patterns("*.safetensors"))
    mx.save_safetensors(str(folders["apple-mlx"] / "mlx_model.safetensors"),
                        {k: mx.array(v) for k, v in mlx_layout(apple).items()}, metadata={"format": "mlx"})
    shutil.copytree(folders["transformers"], folders["hub"])
    shutil.copy(folders["apple-mlx"] / "mlx_model.safetensors", folders["hub"])
    (folders["hub"] / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return folders


@pytest.fixture(scope="module", params=["fixed", "native"])
def tiny(request, tmp_path_factory):
    """A tiny transformers reference (fixed 16x16, or native resolution on a 12x20 image), its layouts, and its
    stages on two images."""
    config = tiny_v2() if request.param == "fixed" else tiny_v2(image_size=None)
    ref = make_reference(config, seed=3)
    folders = write_layouts(tmp_path_factory.mktemp(request.param), ref, config)
    images = random_images(2, 16, 16) if config.image_size else random_images(2, 12, 20)
    return config, folders, images, reference_stages(ref, images)


LOAD_SCRIPT = """
import sys, mlx_aim, numpy as np, mlx.core as mx
images, out = np.load(sys.argv[1]), {}
for i, source in enumerate(sys.argv[3:]):
    model = mlx_aim.load(source)
    normed, features = model.extract_features(mx.array(images))
    out[f"{i}/embedding"], out[f"{i}/trunk"] = np.array(model.preprocessor(mx.array(images))), np.array(normed)
    out.update({f"{i}/block_{b}": np.array(f) for b, f in enumerate(features)})
np.savez(sys.argv[2], **out)
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


def load_elsewhere(sources, images, tmp_path, env=None) -> list[dict]:
    """Each source loaded by `mlx_aim.load` in a fresh interpreter, which must import neither torch nor
    transformers; their stages."""
    np.save(tmp_path / "images.npy", images)
    done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, tmp_path / "images.npy", tmp_path / "out.npz",
                           *map(str, sources)], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", "the loading path imported torch or transformers"
    saved = np.load(tmp_path / "out.npz")
    return [{k.split("/", 1)[1]: saved[k] for k in saved.files if k.startswith(f"{i}/")} for i in range(len(sources))]


def test_every_layout_loads_torch_free_and_matches_transformers(tiny, tmp_path):
    config, folders, images, ref = tiny
    loaded = load_elsewhere([folders[name] for name in LAYOUTS], images, tmp_path)
    for stages in loaded:
        assert_stages_match(stages, ref)
        for stage in stages:  # the same weights, however they were stored: the same numbers
            np.testing.assert_array_equal(stages[stage], loaded[0][stage])
    for name in LAYOUTS:
        model = mlx_aim.load(folders[name])
        assert model.config == config and type(model) is mlx_aim.AIMv2  # an encoder: no probe head


def test_folder_with_several_files_reads_model_safetensors_and_says_so(tiny):
    config, folders, images, ref = tiny
    source = open_source(folders["hub"])
    source.close()
    assert source.description == f"{folders['hub'] / 'model.safetensors'}; also there, not read: mlx_model.safetensors"
    assert source.config == config == source_config(folders["hub"])
    assert [p.name for p in source.extra_files] == ["preprocessor_config.json"]
    # A loose file: its layout from its name, its architecture from its shapes, but no shape tells the head count.
    with pytest.raises(ValueError, match="width 64 is no released AIMv2 encoder's, so the head count is unknown"):
        open_source(folders["apple-mlx"] / "mlx_model.safetensors")


def features(model, images: np.ndarray) -> np.ndarray:
    """The encoder's output tokens for `images`, as float32."""
    return np.array(model.extract_features(mx.array(images))[0].astype(mx.float32))


@pytest.mark.parametrize("name", LAYOUTS)
def test_convert_each_layout_dtype_and_quantize(tiny, name, tmp_path):
    """The command line converts each layout with --dtype bfloat16 --quantize 4; the library with each alone."""
    config, folders, images, _ = tiny
    float32 = mlx_aim.load(folders[name])
    expected = np.array(float32.extract_features(mx.array(images))[0])
    out = tmp_path / "bf16-q4"
    figures = last_json(run_script("convert/convert.py", folders[name], "--out", out, "--dtype", "bfloat16",
                                   "--quantize", "4", "--json").stdout)
    assert figures["out"] == str(out)
    both = mlx_aim.load(out)
    assert both.config == config.replace(quantization={"bits": 4, "group_size": 64}) and both.dtype == mx.bfloat16
    assert type(both.trunk.blocks[0].mlp.fc3).__name__ == "QuantizedLinear"
    assert rel_err(features(both, images), features(dequantized_twin(both), images)) < TWIN_TOLERANCE["bfloat16"]
    half = mlx_aim.load(mlx_aim.convert(folders[name], tmp_path / "bf16", dtype="bfloat16"))
    assert half.trunk.blocks[0].mlp.fc3.weight.dtype == mx.bfloat16 and half.config == config
    assert rel_err(np.array(half.extract_features(mx.array(images))[0].astype(mx.float32)), expected) < 5e-2
    q4 = mlx_aim.load(mlx_aim.convert(folders[name], tmp_path / "q4", quantize=4))
    assert q4.trunk.blocks[2].attn.qkv.weight.dtype == mx.uint32 and q4.dtype == mx.float32
    assert rel_err(np.array(q4.extract_features(mx.array(images))[0]), expected) < 0.2
    assert rel_err(features(q4, images), features(dequantized_twin(q4), images)) < TWIN_TOLERANCE["float32"]
    # Quantizing at load time gives what loading the quantized conversion gives.
    on_load = mlx_aim.load(folders[name], quantize=4)
    np.testing.assert_array_equal(np.array(on_load.extract_features(mx.array(images))[0]),
                                  np.array(q4.extract_features(mx.array(images))[0]))


def test_conversion_carries_the_preprocessor_file(tiny, tmp_path):
    config, folders, _, _ = tiny
    out = mlx_aim.convert(folders["hub"], tmp_path / "mlx")
    assert json.loads((out / "preprocessor_config.json").read_text()) == PREPROCESSOR
    assert "Converted from" in (out / "README.md").read_text()
    prep = preprocessing_for(mlx_aim.load(out).config, out)
    assert prep.mean == (0.5, 0.5, 0.5) and prep.native == (config.image_size is None)
    assert not (mlx_aim.convert(folders["transformers"], tmp_path / "none") / "preprocessor_config.json").exists()


# ---------------------------------------------------------------------------------------------------
# At full size: aimv2-large-patch14-224 from transformers' folder, and as the released name from a hub cache


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """aimv2-large-patch14-224 at full size, saved by transformers, with its stages on one image; removed after the
    module (the folders hold gigabytes)."""
    root = tmp_path_factory.mktemp("large")
    config = get_config("aimv2-large-patch14-224")
    ref = make_reference(config, seed=5)
    ref.save_pretrained(root / "transformers")
    images = random_images(1, 224, 224, seed=1)
    stages = reference_stages(ref, images)
    del ref
    yield config, root, images, stages
    shutil.rmtree(root, ignore_errors=True)


def test_full_size_transformers_folder(large):
    config, root, images, ref = large
    model = mlx_aim.load(root / "transformers")
    assert model.config == config.replace(name=None)  # a local folder names no release
    assert_stages_match(our_stages(model, images), ref)


def test_full_size_conversion_streams(large, tmp_path):
    """Converting the 1.2 GB transformers folder (q, k and v fused on the way) holds a few tensors at a time, never
    the model: MLX's peak allocation stays far below the model's size."""
    _, root, _, _ = large
    mx.reset_peak_memory()
    out = mlx_aim.convert(root / "transformers", tmp_path / "mlx")
    peak = mx.get_peak_memory()
    size = (out / "model.safetensors").stat().st_size
    shutil.rmtree(out)
    assert size > 10**9 and peak < size / 8


def hub_snapshot(cache, repo_id: str, revision: str, ref: str = "main"):
    """An empty snapshot folder in huggingface_hub's cache layout, with `ref` pointing at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    return snapshot


def offline_env(tmp_path) -> dict:
    import os

    return dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"),
                MLX_AIM_CACHE=str(tmp_path / "converted"), PYTHONPATH=str(ROOT))


def test_released_name_from_an_offline_cache(large, tmp_path):
    """`load("aimv2-large-patch14-224")` reads Apple's mlx_model.safetensors at Apple's pinned revision from the
    huggingface_hub cache, converts it once into the mlx-aim cache with its preprocessor file, and matches
    transformers; no network, no torch."""
    config, root, images, ref = large
    name = "aimv2-large-patch14-224"
    snapshot = hub_snapshot(tmp_path / "hub", f"apple/{name}", AIMV2_REVISIONS[name])
    model = mlx_aim.load(root / "transformers")
    trunk = {k: v for k, v in tree_flatten(model.parameters()) if not k.startswith("head.")}
    mx.save_safetensors(str(snapshot / "mlx_model.safetensors"), trunk)  # Apple's keys, MLX layouts
    crop = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}
    (snapshot / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR, **crop}))
    del model, trunk
    env = offline_env(tmp_path)
    [stages] = load_elsewhere([name], images, tmp_path, env)
    assert_stages_match(stages, ref)
    converted = tmp_path / "converted" / f"{name}-float32"
    assert json.loads((converted / "config.json").read_text())["name"] == name
    assert (converted / "preprocessor_config.json").exists()
    loose = open_source(converted / "model.safetensors")  # our file alone: {"format": "mlx"} says its layout
    loose.close()
    assert loose.config == config.replace(name=None)
    shutil.rmtree(tmp_path / "converted")
    code = ("from mlx_aim.models.config import get_config; from mlx_aim.data import preprocessing_for; "
            f"from mlx_aim.checkpoints.loading import local_folder; folder = local_folder({name!r}); "
            f"print(folder); print(preprocessing_for(get_config({name!r}), folder).mean)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(snapshot), "(0.5, 0.5, 0.5)"]


def test_every_released_name_resolves_to_its_repo(monkeypatch):
    """Each of the 16 names downloads Apple's mlx_model.safetensors (and preprocessor file; the LiT its tokenizer
    files too) from apple/<name> at a pinned commit; nothing is fetched here."""
    import huggingface_hub

    assert set(AIMV2_REVISIONS) == set(AIMV2_PRESET_NAMES) and len(AIMV2_REVISIONS) == 16
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        raise OSError("offline in this test")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    for name in AIMV2_PRESET_NAMES:
        with pytest.raises(OSError, match="offline in this test"):
            open_source(name)
        repo, revision, patterns = calls[-1]
        assert repo == f"apple/{name}" and re.fullmatch(r"[0-9a-f]{40}", revision)
        tokenizer = set(TOKENIZER_FILES) if name == "aimv2-large-patch14-224-lit" else set()
        assert set(patterns) == {"mlx_model.safetensors", "preprocessor_config.json", *tokenizer}
        assert source_config(name) == get_config(name)  # the registry's, with nothing downloaded
    assert len(calls) == 16


def test_hub_id_from_an_offline_cache(tiny, tmp_path):
    """A hub id resolves to its cached snapshot (HF_HUB_OFFLINE): the repo's model.safetensors is read, not its
    mlx_model.safetensors; the preprocessor file is found beside it."""
    config, folders, images, ref = tiny
    snapshot = hub_snapshot(tmp_path / "hub", "someone/aimv2-tiny", "b" * 40)
    for f in folders["hub"].iterdir():
        shutil.copy(f, snapshot)
    [stages] = load_elsewhere(["someone/aimv2-tiny"], images, tmp_path, offline_env(tmp_path))
    assert_stages_match(stages, ref)
    code = ("import mlx_aim; from mlx_aim.checkpoints.loading import local_folder, open_source; "
            "s = open_source('someone/aimv2-tiny'); print(s.description); print(local_folder('someone/aimv2-tiny'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=offline_env(tmp_path))
    assert done.returncode == 0, done.stderr
    described = f"{snapshot / 'model.safetensors'}; also there, not read: mlx_model.safetensors"
    assert done.stdout.splitlines() == [described, str(snapshot)]


# ---------------------------------------------------------------------------------------------------
# The LiT checkpoint: its image encoder, in transformers' and Apple's keys


def test_lit_image_encoder_in_both_layouts(tmp_path):
    """transformers' `Aimv2Model` (vision_model. + text tower, projections, pooling head) and Apple's LiT keys
    (image_encoder. + text_encoder., projectors, log_logit_scale): `open_source` reads the image encoder, the rest is
    left out and said so; `load` of the whole LiT gives `AIMv2LiT`, whose image encoder is the same."""
    config = tiny_v2()
    vision = transformers_config(config).to_dict()
    lit_config = Aimv2Config(vision_config={**vision, "use_head": True}, projection_dim=32,
                             text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, vocab_size=50, max_position_embeddings=8,
                                              eos_token_id=49))
    torch.manual_seed(0)
    lit = Aimv2Model(lit_config).eval()
    randomize(lit.vision_model, seed=7)
    lit.save_pretrained(tmp_path / "transformers")
    images = random_images(2, 16, 16)
    ref = reference_stages(lit.vision_model, images)
    vision_state = {k[len("vision_model."):]: v.detach().numpy().copy() for k, v in lit.state_dict().items()
                    if k.startswith("vision_model.") and ".head." not in k}
    apple = {f"image_encoder.{k}": v for k, v in mlx_layout(apple_keys(vision_state)).items()}
    d = config.width
    apple.update({"image_encoder.head.k.weight": np.zeros((d, d), np.float32),
                  "image_encoder.head.cls_token": np.zeros((1, 1, d), np.float32),
                  "text_encoder.preprocessor.text_embedding.weight": np.zeros((50, 32), np.float32),
                  "image_projector.weight": np.zeros((32, d), np.float32), "log_logit_scale": np.zeros((), np.float32)})
    (tmp_path / "apple").mkdir()
    (tmp_path / "apple" / "config.json").write_text(json.dumps(apple_config(config)))
    mx.save_safetensors(str(tmp_path / "apple" / "mlx_model.safetensors"), {k: mx.array(v) for k, v in apple.items()})
    for folder, left_out in [(tmp_path / "transformers", None), (tmp_path / "apple", 5)]:
        source = open_source(folder)
        source.close()
        assert source.config == config and "image encoder only: " in source.description
        parts = ("image_encoder.head, image_projector, log_logit_scale, text_encoder" if left_out else
                 "logit_scale, text_model, text_projection, vision_model.head, visual_projection")
        assert re.search(rf"only: {left_out or '[0-9]+'} tensors left out, of {parts}\)$", source.description)
        # `load` reads a whole LiT (the transformers folder; Apple's here lacks the text tower) as the LiT model.
        model = mlx_aim.load(folder)
        assert isinstance(model, AIMv2LiT) == (left_out is None)
        assert_stages_match(our_stages(model.image_encoder if left_out is None else model, images), ref)


# ---------------------------------------------------------------------------------------------------
# Errors that name the problem


def edited_transformers_folder(tmp_path, edit_config=None, edit_weights=None):
    config = tiny_v2()
    folder = tmp_path / "edited"
    make_reference(config).save_pretrained(folder)
    if edit_config:
        params = json.loads((folder / "config.json").read_text())
        edit_config(params)
        (folder / "config.json").write_text(json.dumps(params))
    if edit_weights:
        weights = dict(mx.load(str(folder / "model.safetensors")))
        mx.eval(weights)
        edit_weights(weights)
        mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return folder


@pytest.mark.parametrize("edit_config, edit_weights, message", [
    (lambda p: p.update(qkv_bias=True), None, r"qkv_bias=true: AIMv2's attention and MLP have no biases"),
    (lambda p: p.update(is_native=True), None, r"says native resolution \(is_native true\), but the checkpoint has "
                                                r"a position embedding"),
    (lambda p: p.update(image_size=24), None, r"'preprocessor.pos_embed' has shape \(1, 16, 64\), expected "
                                              r"\(1, 36, 64\)"),
    (lambda p: p.update(num_hidden_layers=4), None, r"missing keys \['trunk.blocks.3"),
    (None, lambda w: w.pop("encoder.layers.1.attention.k_proj.weight"),
     r"missing keys \['trunk.blocks.1.attn.qkv.weight'\]; unexpected keys \['encoder.layers.1.attention.q_proj"),
    (None, lambda w: w.update({"encoder.layers.0.ffn.up_proj.bias": mx.zeros((128,))}),
     r"unexpected keys \['encoder.layers.0.ffn.up_proj.bias'\]"),
], ids=["bias", "native-flag", "image-size", "depth", "missing-k", "extra-bias"])
def test_checkpoints_that_disagree_are_refused_by_name(tmp_path, edit_config, edit_weights, message):
    folder = edited_transformers_folder(tmp_path, edit_config, edit_weights)
    with pytest.raises(ValueError, match=message):
        mlx_aim.convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fixed_size_checkpoint_refuses_another_size(tmp_path):
    model = mlx_aim.load(edited_transformers_folder(tmp_path))
    with pytest.raises(ValueError, match=r"takes 16x16 images .* 4x4 grid.*got 24x24"):
        model.extract_features(mx.zeros((1, 24, 24, 3)))


def test_config_json_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(apple_config(tiny_v2())))
    with pytest.raises(FileNotFoundError, match="config.json but no weights .*mlx_model.safetensors"):
        mlx_aim.load(tmp_path)


# ---------------------------------------------------------------------------------------------------
# Our own MLX folders


@pytest.mark.parametrize("config", [tiny_v2(num_classes=10), tiny_v2(image_size=None, num_classes=10)],
                         ids=["fixed", "native"])
def test_mlx_folder_round_trip(config, tmp_path):
    """A folder `save_model` writes ("model_type": "aimv2" + model.safetensors) loads back as the same model,
    with or without a trained probe head; `convert` rewrites it in bfloat16 and 4 bits."""
    model = mlx_aim.build_model(config, seed=1, probe=True)
    trunk = {k: v for k, v in tree_flatten(model.parameters()) if not k.startswith("head.")}
    folder = save_model(tmp_path / "trunk", trunk, config)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "aimv2"
    assert "AIMv2" in (folder / "README.md").read_text()
    assert open_source(folder).description == f"MLX model folder {folder}"
    loaded = mlx_aim.load(folder)
    assert type(loaded) is mlx_aim.AIMv2 and loaded.config == config
    images = random_images(2, 16, 16 if config.image_size else 24)
    np.testing.assert_array_equal(np.array(loaded.extract_features(mx.array(images))[0]),
                                  np.array(model.extract_features(mx.array(images))[0]))
    with_head = save_model(tmp_path / "probed", dict(tree_flatten(model.parameters())), config)
    probed = mlx_aim.load(with_head, probe_layers=[0, 2])
    assert type(probed) is mlx_aim.ProbedAIMv2 and probed.config.probe_layers == [0, 2]
    np.testing.assert_array_equal(np.array(probed.head.linear.weight), np.array(model.head.linear.weight))
    half = mlx_aim.load(mlx_aim.convert(folder, tmp_path / "bf16", dtype="bfloat16"))
    assert half.dtype == mx.bfloat16 and half.config == config
    q4 = mlx_aim.load(mlx_aim.convert(folder, tmp_path / "q4", quantize=4))
    assert q4.config.quantization == {"bits": 4, "group_size": 64}
    assert type(q4.trunk.blocks[0].mlp.fc3).__name__ == "QuantizedLinear"
    assert rel_err(features(q4, images), features(dequantized_twin(q4), images)) < TWIN_TOLERANCE["float32"]
    assert local_folder(folder) == folder
