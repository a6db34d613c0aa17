"""AIMv2-LiT (zero-shot image-text) against transformers' `Aimv2Model` on random weights: loaded torch-free from a
folder that transformers' `save_pretrained` wrote and from Apple's keys (in PyTorch's and MLX's layouts, written by
this file's own renaming); image embeddings against `get_image_features`; text embeddings against transformers' text
tower with the causal attention Apple's has forced on it; the logits in Apple's orientation; dtype and quantization.

transformers 5.24's text tower is not causal (`is_causal=False`), so unmodified it is no reference: a test shows how
far it is from the causal one, so that a fix upstream is noticed."""

import json
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
from aimv2_reference import randomize, transformers_config
from conftest import TWIN_TOLERANCE, dequantized_twin, rel_err
from mlx_aim.models.config import AIMv2Config, AIMv2LiTConfig
from mlx_aim.checkpoints.loading import AIMV2_REVISIONS, LIT_NAME
from mlx_aim.models.model import AIMv2LiT
from test_aimv2_loading import apple_keys, hub_snapshot, mlx_layout, offline_env

TOL = 1e-5
VOCAB, CONTEXT, EOS = 50, 8, 49


def tiny_lit_image() -> AIMv2Config:
    return AIMv2Config(image_size=16, patch_size=4, width=64, depth=2, num_heads=4, hidden_dim=128)


@torch.no_grad()
def make_lit(seed: int = 0, log_logit_scale: float = 2.0) -> Aimv2Model:
    """transformers' LiT of a tiny config, every parameter drawn so that each stage shows (`randomize`)."""
    config = Aimv2Config(
        vision_config={**transformers_config(tiny_lit_image()).to_dict(), "use_head": True},
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=VOCAB, max_position_embeddings=CONTEXT, eos_token_id=EOS),
        projection_dim=24)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Aimv2Model(config).eval()
    randomize(model.vision_model, seed)
    randomize(model.text_model, seed + 1)
    generator = torch.Generator().manual_seed(seed + 2)
    for projection in (model.visual_projection, model.text_projection):
        projection.weight.copy_(torch.randn(projection.weight.shape, generator=generator) / 8)
    model.logit_scale.fill_(log_logit_scale)
    return model


def token_ids() -> np.ndarray:
    """Rows whose first end-of-text id sits at different places, tokens after it, one row with two."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, EOS, (4, CONTEXT))
    for row, eos in enumerate((2, 7, 0, 4)):
        ids[row, eos] = EOS
    ids[3, 6] = EOS
    return ids


def images(batch: int = 3) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((batch, 16, 16, 3)).astype(np.float32)


@torch.no_grad()
def reference_image_embeddings(lit: Aimv2Model, nhwc: np.ndarray) -> np.ndarray:
    pixels = torch.from_numpy(np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)))
    return lit.get_image_features(pixel_values=pixels).pooler_output.numpy()


@torch.no_grad()
def reference_text_embeddings(lit: Aimv2Model, ids: np.ndarray, causal: bool = True) -> np.ndarray:
    """transformers' text embeddings; with `causal`, each text attention's `is_causal` forced on (Apple's tower)."""
    layers = [layer.attention for layer in lit.text_model.encoder.layers]
    saved = [a.is_causal for a in layers]
    try:
        for a in layers:
            a.is_causal = causal
        return lit.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
    finally:
        for a, was in zip(layers, saved):
            a.is_causal = was


def apple_lit_keys(lit: Aimv2Model) -> dict[str, np.ndarray]:
    """transformers' LiT weights under Apple's keys in Apple's PyTorch layouts (apple/ml-aim's `aim-v2/aim/v2/torch/`
    against transformers' `models/aimv2/modeling_aimv2.py`), renamed here, apart from the library's mapping."""
    state = {k: v.detach().numpy().copy() for k, v in lit.state_dict().items() if not k.endswith("position_ids")}

    def tower(prefix):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    vision, text = tower("vision_model."), tower("text_model.")
    out = {f"image_encoder.{k}": v for k, v in apple_keys({k: v for k, v in vision.items()
                                                            if not k.startswith("head.")}).items()}
    out.update({f"image_encoder.head.{ours}": vision[f"head.{theirs}"] for theirs, ours in
                [("cls_token", "cls_token"), ("k_proj.weight", "k.weight"), ("v_proj.weight", "v.weight"),
                 ("output_proj.weight", "linear.weight"), ("output_proj.bias", "linear.bias")]})
    blocks = apple_keys({k: v for k, v in text.items() if k.startswith("encoder.") or k == "rms_norm.weight"})
    out.update({f"text_encoder.{k}": v for k, v in blocks.items()})
    out["text_encoder.preprocessor.text_embedding.weight"] = text["embeddings.token_embedding.weight"]
    out["text_encoder.preprocessor.positional_embedding"] = text["embeddings.position_embedding.weight"]
    out.update({"image_projector.weight": state["visual_projection.weight"],
                "text_projector.weight": state["text_projection.weight"], "log_logit_scale": state["logit_scale"]})
    return out


@pytest.fixture(scope="module")
def lit_folders(tmp_path_factory):
    """One reference LiT written as transformers saves it and as Apple's keys in both of Apple's layouts."""
    root = tmp_path_factory.mktemp("lit")
    lit = make_lit()
    lit.save_pretrained(root / "transformers")
    apple = apple_lit_keys(lit)
    (root / "apple").mkdir()
    save_file({k: np.require(v, requirements="C") for k, v in apple.items()}, str(root / "apple" / "model.safetensors"))
    (root / "apple-mlx").mkdir()
    mx.save_safetensors(str(root / "apple-mlx" / "mlx_model.safetensors"),
                        {k: mx.array(v) for k, v in mlx_layout(apple).items()})
    for layout in ("apple", "apple-mlx"):  # the head counts no shape shows, from the hub's config.json now
        shutil.copyfile(root / "transformers" / "config.json", root / layout / "config.json")
    return lit, root


def test_loaded_lit_matches_transformers_image_side_and_causal_text_side(lit_folders):
    lit, root = lit_folders
    ids, pixels = token_ids(), images()
    ref_image = reference_image_embeddings(lit, pixels)
    ref_text = reference_text_embeddings(lit, ids)
    outputs = {}
    for layout in ("transformers", "apple", "apple-mlx"):
        model = mlx_aim.load(root / layout)
        assert isinstance(model, AIMv2LiT) and not model.training
        assert model.config.image.replace(name=None) == tiny_lit_image()
        assert (model.config.vocab_size, model.config.context_length, model.config.eos_token_id) == (VOCAB, CONTEXT,
                                                                                                     EOS)
        assert model.config.projection_dim == 24 and model.config.text_num_heads == 2
        image, text = np.array(model.encode_image(mx.array(pixels))), np.array(model.encode_text(mx.array(ids)))
        assert rel_err(image, ref_image) < TOL, layout
        assert rel_err(text, ref_text) < TOL, layout
        outputs[layout] = (image, text)
    for layout in ("apple", "apple-mlx"):  # one set of weights, three files: the same numbers exactly
        np.testing.assert_array_equal(outputs[layout][0], outputs["transformers"][0])
        np.testing.assert_array_equal(outputs[layout][1], outputs["transformers"][1])


def test_transformers_text_tower_is_not_causal(lit_folders):
    """transformers 5.24's text attention has `is_causal=False`: its unmodified text embeddings are far from the
    causal tower's (Apple's, and ours). When this fails, upstream made it causal: it can then be the reference
    as it stands."""
    lit, root = lit_folders
    ids = token_ids()
    causal = reference_text_embeddings(lit, ids, causal=True)
    with torch.no_grad():
        as_shipped = lit.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
    assert rel_err(as_shipped, causal) > 0.01
    ours = np.array(mlx_aim.load(root / "transformers").encode_text(mx.array(ids)))
    assert rel_err(ours, causal) < TOL


@pytest.mark.parametrize("log_logit_scale", [2.0, 5.0, -1.0])  # inside, above ln 100 and below 0: clamped
def test_logits_as_apple_computes_them(tmp_path, log_logit_scale):
    """Apple's pair: logits_per_image (images x texts) and logits_per_text, its transpose; transformers computes
    the same scores."""
    lit = make_lit(log_logit_scale=log_logit_scale)
    lit.save_pretrained(tmp_path)
    model = mlx_aim.load(tmp_path)
    ids, pixels = token_ids(), images()
    for layer in lit.text_model.encoder.layers:
        layer.attention.is_causal = True
    with torch.no_grad():
        ref = lit(input_ids=torch.from_numpy(ids),
                  pixel_values=torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))))
    per_image, per_text = model(mx.array(pixels), mx.array(ids))
    assert per_image.shape == (3, 4) and per_text.shape == (4, 3)
    assert rel_err(np.array(per_image), ref.logits_per_image.numpy()) < TOL
    np.testing.assert_array_equal(np.array(per_text), np.array(per_image).T)
    scale = float(np.exp(np.clip(log_logit_scale, 0, np.log(100))))
    assert float(model.logit_scale) == pytest.approx(scale, rel=1e-6)


def test_dtype_and_quantization(lit_folders):
    lit, root = lit_folders
    ids, pixels = mx.array(token_ids()), mx.array(images())
    full = mlx_aim.load(root / "transformers")
    ref_image, ref_text = np.array(full.encode_image(pixels)), np.array(full.encode_text(ids))
    half = mlx_aim.load(root / "transformers", dtype="bfloat16")
    assert half.dtype == mx.bfloat16 and half.text_encoder.trunk.blocks[0].attn.qkv.weight.dtype == mx.bfloat16
    assert rel_err(np.array(half.encode_image(pixels).astype(mx.float32)), ref_image) < 0.05
    assert rel_err(np.array(half.encode_text(ids).astype(mx.float32)), ref_text) < 0.05
    quantized = mlx_aim.load(root / "apple-mlx", quantize=8)
    assert quantized.config.quantization == {"bits": 8, "group_size": 64}
    for tower in (quantized.image_encoder, quantized.text_encoder):
        assert isinstance(tower.trunk.blocks[0].attn.qkv, mlx_aim.backend.QuantizedLinear)
    assert not isinstance(quantized.text_projector, mlx_aim.backend.QuantizedLinear)  # heads stay in float
    assert rel_err(np.array(quantized.encode_image(pixels)), ref_image) < 0.05
    assert rel_err(np.array(quantized.encode_text(ids)), ref_text) < 0.05
    twin = dequantized_twin(quantized)  # what the 8-bit towers must compute: their dequantized weights, in float
    assert rel_err(np.array(quantized.encode_image(pixels)), np.array(twin.encode_image(pixels))) < TWIN_TOLERANCE[
        "float32"]
    assert rel_err(np.array(quantized.encode_text(ids)), np.array(twin.encode_text(ids))) < TWIN_TOLERANCE["float32"]


def test_token_ids_checked(lit_folders):
    _, root = lit_folders
    model = mlx_aim.load(root / "apple-mlx")
    with pytest.raises(ValueError, match=r"rows \[1\] hold no end-of-text id \(49\)"):
        model.encode_text(mx.array([[1, EOS], [1, 2]]))
    with pytest.raises(ValueError, match="9 tokens, over the context length 8"):
        model.encode_text(mx.array([[1] * 8 + [EOS]]))


def test_lit_config_round_trip_and_no_probe():
    config = AIMv2LiTConfig(image=tiny_lit_image(), vocab_size=VOCAB, context_length=CONTEXT, eos_token_id=EOS)
    assert mlx_aim.models.config.config_from_dict(config.to_dict()) == config
    assert AIMv2LiTConfig().image == mlx_aim.get_config("aimv2-large-patch14-224-lit").replace(name=None)
    with pytest.raises(ValueError, match="no probe"):
        config.with_probe_layers("last")


def test_convert_writes_a_lit_folder_that_loads_back(lit_folders, tmp_path):
    """A whole LiT converts into our folder ("model_type": "aimv2_lit"), in float and quantized, and loads back to
    the same model."""
    _, root = lit_folders
    ids, pixels = mx.array(token_ids()), mx.array(images())
    source = mlx_aim.load(root / "apple")
    for out, options, quantization in [(tmp_path / "float", {}, None),
                                       (tmp_path / "q8", {"quantize": 8}, {"bits": 8, "group_size": 64})]:
        mlx_aim.convert(root / "apple", out, **options)
        assert json.loads((out / "config.json").read_text())["model_type"] == "aimv2_lit"
        assert "text encoder: width 64, depth 2, heads 2" in (out / "README.md").read_text()
        loaded = mlx_aim.load(out)
        assert isinstance(loaded, AIMv2LiT) and loaded.config == source.config.replace(quantization=quantization)
        expected = mlx_aim.load(root / "apple", **options)
        np.testing.assert_array_equal(np.array(loaded(pixels, ids)[0]), np.array(expected(pixels, ids)[0]))


@torch.no_grad()
def test_full_size_lit_matches_transformers_and_loads_by_name(tmp_path):
    """aimv2-large-patch14-224-lit's architecture at full size (transformers' default `Aimv2Config`, projection 768
    as released), random weights: the config read from the folder is the released one, the embeddings and logits
    match transformers (text with causal attention forced), and the released name loads the whole LiT."""
    config = Aimv2Config(projection_dim=768)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):  # skips transformers' initialisation: every parameter is drawn below
        lit = Aimv2Model(config)
    lit = lit.to_empty(device="cpu").eval()
    for embeddings in (lit.vision_model.embeddings, lit.text_model.embeddings):
        ids = embeddings.position_ids  # a buffer: to_empty leaves it unset
        ids.copy_(torch.arange(ids.shape[-1]).expand_as(ids))
    randomize(lit.vision_model, 0)
    randomize(lit.text_model, 1)
    generator = torch.Generator().manual_seed(2)
    for projection in (lit.visual_projection, lit.text_projection):
        projection.weight.copy_(torch.randn(projection.weight.shape, generator=generator) / 30)
    lit.logit_scale.fill_(2.0)
    lit.save_pretrained(tmp_path)
    model = mlx_aim.load(tmp_path)
    assert model.config == AIMv2LiTConfig()
    pixels = np.random.default_rng(0).standard_normal((1, 224, 224, 3)).astype(np.float32)
    ids = np.random.default_rng(1).integers(0, 49407, (2, 77))
    ids[0, 5], ids[1, 76] = 49407, 49407
    assert rel_err(np.array(model.encode_image(mx.array(pixels))), reference_image_embeddings(lit, pixels)) < TOL
    assert rel_err(np.array(model.encode_text(mx.array(ids))), reference_text_embeddings(lit, ids)) < TOL
    for layer in lit.text_model.encoder.layers:
        layer.attention.is_causal = True
    ref = lit(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
    logits = np.array(model(mx.array(pixels), mx.array(ids))[0])
    assert rel_err(logits, ref.logits_per_image.numpy()) < TOL
    # The released name: Apple's mlx_model.safetensors at Apple's pinned revision, from an offline cache, in a fresh
    # interpreter (converted once into the mlx-aim cache), gives the whole LiT and the same logits.
    snapshot = hub_snapshot(tmp_path / "hub", f"apple/{LIT_NAME}", AIMV2_REVISIONS[LIT_NAME])
    mx.save_safetensors(str(snapshot / "mlx_model.safetensors"),
                        {k: mx.array(v) for k, v in mlx_layout(apple_lit_keys(lit)).items()})
    del lit, ref
    np.save(tmp_path / "pixels.npy", pixels)
    np.save(tmp_path / "ids.npy", ids)
    code = ("import sys, mlx_aim, mlx.core as mx, numpy as np; model = mlx_aim.load(sys.argv[1]); "
            "print(type(model).__name__, model.config.name, model.config.image.name); "
            "np.save('out.npy', np.array(model(mx.array(np.load('pixels.npy')), mx.array(np.load('ids.npy')))[0]))")
    done = subprocess.run([sys.executable, "-c", code, LIT_NAME], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env=offline_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["AIMv2LiT", LIT_NAME, LIT_NAME]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), logits)
