"""LoRA (mlx_aim/models/lora.py, mlx_aim/checkpoints/adapters.py, `mlx-aim fuse`): an adapted model starts equal to
its base, fuses into plain weights that compute what it computes, trains only its adapters over a frozen quantized
trunk, saves and loads as mlx-lm's adapter folders, and refuses adapters made for another base."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

import mlx_aim
from conftest import rel_err, tiny_config
from mlx_aim.backend import cpu_workarounds
from mlx_aim.checkpoints.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapters
from mlx_aim.checkpoints.weights import save_model
from mlx_aim.cli import fuse as fuse_cli
from mlx_aim.models.config import AIMv2Config, get_config
from mlx_aim.models.lora import (
    LoRALinear, LoRAQKV, adapter_parameters, apply_lora, fuse_lora, lora_settings, trainable_parameters,
)
from mlx_aim.models.model import build_model, build_probe, with_probe


def tiny_v2(**overrides) -> AIMv2Config:
    fields = dict(image_size=16, patch_size=4, width=64, depth=4, num_heads=4, hidden_dim=128, num_classes=10,
                  probe_layers=[1, 2])
    return AIMv2Config(**{**fields, **overrides})


# The AIM classifier (probed trunk, GELU MLP) and the AIMv2 encoder (SwiGLU MLP): each with every key it has.
FAMILIES = {
    "aim": (lambda: build_model(tiny_config(), seed=0, probe=True), ("qkv", "proj", "fc1", "fc2")),
    "aimv2": (lambda: build_model(tiny_v2(), seed=0), ("qkv", "proj", "fc1", "fc2", "fc3")),
}


def images(batch=2):
    return mx.random.normal((batch, 16, 16, 3), key=mx.random.key(1))


def randomize_adapters(model, seed=2):
    """Random B (and A): the adapters then change the model's output."""
    updates = [(k, 0.05 * mx.random.normal(v.shape, key=mx.random.key(seed + i)))
               for i, (k, v) in enumerate(adapter_parameters(model).items())]
    model.load_weights(updates, strict=False)
    mx.eval(model.parameters())
    return model


def names_and_shapes(model):
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_zero_b_leaves_the_base_exactly(family, backend_path):
    build, keys = FAMILIES[family]
    model = build()
    x = images()
    base = model(x)
    mx.eval(base)
    apply_lora(model, keys=keys)
    adapted = model(x)
    assert mx.array_equal(adapted, base).item()
    # q, k and v each their own pair on the fused qkv; the rest one pair each; B zeros, A not.
    block = model.trunk.blocks[0]
    assert isinstance(block.attn.qkv, LoRAQKV) and isinstance(block.attn.proj, LoRALinear)
    assert block.attn.qkv.lora_a.shape == (3, 64, 8) and block.attn.qkv.lora_b.shape == (3, 8, 64)
    assert all(isinstance(block.mlp[k], LoRALinear) for k in keys if k.startswith("fc"))
    assert block.attn.qkv.scale == 1 / 8
    assert not mx.any(block.attn.qkv.lora_b).item() and mx.all(block.attn.qkv.lora_a != 0).item()
    # Only the adapters train.
    assert {k for k, _ in tree_flatten(model.trainable_parameters())} == set(adapter_parameters(model))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_model_computes_what_the_adapted_one_does(family, backend_path):
    build, keys = FAMILIES[family]
    model = build()
    base_names = names_and_shapes(model)
    x = images()
    base = model(x)
    randomize_adapters(apply_lora(model, keys=keys))
    adapted = model(x)
    mx.eval(base, adapted)
    assert rel_err(adapted, base) > 1e-3  # the adapters matter
    fuse_lora(model)
    assert names_and_shapes(model) == base_names  # plain layers under the base's names again
    assert lora_settings(model) is None
    assert rel_err(model(x), adapted) < 1e-4


def test_apply_lora_on_the_last_layers_only():
    model = build_model(tiny_config(), seed=0)
    apply_lora(model, num_layers=2)
    assert lora_settings(model).layers == (2, 3)
    assert not isinstance(model.trunk.blocks[1].attn.qkv, LoRAQKV)
    assert isinstance(model.trunk.blocks[2].attn.qkv, LoRAQKV)


def quantized_aim():
    return build_model(tiny_config(), quantization={"bits": 4, "group_size": 32}, seed=0, probe=True)


def test_qlora_trains_only_float_adapters_over_a_frozen_quantized_trunk(backend_path):
    model = quantized_aim()
    frozen_before = {k: mx.array(v) for k, v in tree_flatten(model.trunk.parameters())}
    randomize_adapters(apply_lora(model))
    qkv = model.trunk.blocks[0].attn.qkv
    assert isinstance(qkv.linear, nn.QuantizedLinear) and qkv.linear.bits == 4
    assert qkv.lora_a.dtype == mx.float32 and qkv.lora_b.dtype == mx.float32
    model.train()

    def loss_fn(model, x):
        return (model(x) ** 2).mean()

    loss, grads = nn.value_and_grad(model, loss_fn)(model, images())
    grads = dict(tree_flatten(grads))
    assert set(grads) == set(adapter_parameters(model))
    # Every adapter the probe's input passes through gets a gradient (block 3 lies past the probe layers 1, 2).
    nonzero = {k for k, g in grads.items() if mx.any(g != 0).item()}
    assert nonzero == {k for k in grads if not k.startswith("trunk.blocks.3.")}
    # The quantized trunk is untouched by the adaptation.
    for key, value in frozen_before.items():
        if not key.endswith(("lora_a", "lora_b")):
            now = dict(tree_flatten(model.trunk.parameters()))
            assert mx.array_equal(now[key.replace(".attn.qkv.", ".attn.qkv.linear.")
                                      .replace(".attn.proj.", ".attn.proj.linear.")], value).item()


def qlora_grads(model, x, checkpoint: bool = False):
    """The adapters' gradients of one compiled QLoRA loss on `model` (adapted, quantized), and the peak MLX memory
    of computing them."""
    model.trunk.grad_checkpoint = checkpoint
    model.train()
    params = model.trainable_parameters()

    def loss_fn(params, x):
        model.update(params)
        return (model(x) ** 2).mean()

    grad_fn = mx.compile(mx.grad(loss_fn))
    mx.eval(params, x, model.parameters())
    mx.reset_peak_memory()
    grads = grad_fn(params, x)
    mx.eval(grads)
    return dict(tree_flatten(grads)), mx.get_peak_memory()


@pytest.mark.parametrize("checkpoint", [False, True])
def test_qlora_gradients_agree_on_every_path(checkpoint):
    """The CPU workaround's quantized linear (dequantize + BLAS forward, a backward that dequantizes again) gives
    the gradients MLX's quantized kernel gives, compiled, with and without gradient checkpointing."""
    with cpu_workarounds(False):
        expected, _ = qlora_grads(randomize_adapters(apply_lora(quantized_aim())), images(), checkpoint)
    with mx.stream(mx.cpu), cpu_workarounds(True):
        got, _ = qlora_grads(randomize_adapters(apply_lora(quantized_aim())), images(), checkpoint)
    assert set(got) == set(expected)
    for key in expected:
        assert rel_err(got[key], expected[key]) < 1e-4, key


def test_compiled_qlora_step_keeps_no_float_copy_of_the_base():
    """A compiled QLoRA step on the CPU workaround path holds well under the float32 size of the quantized layers:
    their float weights are made for each product, forward and backward, and dropped, not kept from the forward
    pass for the backward's (measured here: 54 MB against 138 MB when they were, for 101 MB of float weights)."""
    config = tiny_config(width=512, depth=8, num_heads=8, probe_layers=[6, 7])
    float_bytes = 8 * 12 * 512 * 512 * 4  # qkv, proj, fc1, fc2 of each block: 12 x width^2 weights, in float32
    with mx.stream(mx.cpu), cpu_workarounds(True):
        model = build_model(config, quantization={"bits": 4, "group_size": 64}, seed=0, probe=True)
        _, peak = qlora_grads(randomize_adapters(apply_lora(model)), mx.random.normal((1, 16, 16, 3)))
    assert peak < 0.75 * float_bytes


def test_fuse_requantizes_a_quantized_base_and_dequantize_gives_float():
    x = images()
    model = randomize_adapters(apply_lora(quantized_aim()))
    adapted = model(x)
    qkv = model.trunk.blocks[0].attn.qkv
    expected = mx.quantize((mx.dequantize(qkv.linear.weight, qkv.linear.scales, qkv.linear.biases, 32, 4)
                            + qkv.delta()), 32, 4)
    fuse_lora(model)
    fused = model.trunk.blocks[0].attn.qkv
    assert isinstance(fused, nn.QuantizedLinear) and (fused.bits, fused.group_size) == (4, 32)
    assert mx.array_equal(fused.weight, expected[0]).item() and mx.allclose(fused.scales, expected[1]).item()
    assert model.config.quantization == {"bits": 4, "group_size": 32}

    model = randomize_adapters(apply_lora(quantized_aim()))
    fuse_lora(model, dequantize=True)
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    assert model.config.quantization is None
    assert rel_err(model(x), adapted) < 1e-4  # dequantized W + scale B A: what the adapted model computes


def base_folder(tmp_path, config=None, name="base", probe=False):
    model = build_model(config or tiny_config(), seed=0, probe=probe)
    return save_model(tmp_path / name, dict(tree_flatten(model.parameters())), model.config)


def test_saved_adapters_load_onto_their_base(tmp_path):
    base = base_folder(tmp_path)  # a trunk without a head: the adapted model carries a new probe
    model = with_probe(apply_lora(mlx_aim.load(base), rank=4, alpha=2.0, num_layers=3), build_probe(tiny_config(), 5))
    randomize_adapters(model)
    model.head.update({"cls_token": mx.random.normal(model.head.cls_token.shape, key=mx.random.key(9))})
    save_adapters(tmp_path / "adapters", model, {"learning_rate": 1e-4, "rank": 4})
    saved = json.loads((tmp_path / "adapters" / ADAPTER_CONFIG).read_text())
    assert {k: saved[k] for k in ("mode", "rank", "alpha", "dropout", "keys", "layers", "num_classes")} == {
        "mode": "lora", "rank": 4, "alpha": 2.0, "dropout": 0.0, "keys": ["qkv", "proj"], "layers": [1, 2, 3],
        "num_classes": 5}
    assert saved["learning_rate"] == 1e-4 and saved["base_config"]["width"] == 64 and len(saved["base_digest"]) == 64
    stored = mx.load(str(tmp_path / "adapters" / ADAPTER_WEIGHTS))
    assert set(stored) == set(adapter_parameters(model)) | {f"head.{k}" for k, _ in tree_flatten(model.head.parameters())}

    loaded = mlx_aim.load(base, adapters=tmp_path / "adapters")
    model.eval()
    x = images()
    assert mx.array_equal(loaded(x), model(x)).item()
    assert lora_settings(loaded) == lora_settings(model)


def test_save_adapters_refuses_a_config_that_contradicts_the_model(tmp_path):
    model = apply_lora(build_model(tiny_config(), seed=0))
    with pytest.raises(ValueError, match="rank=16.*rank=8"):
        save_adapters(tmp_path / "a", model, {"rank": 16})
    assert not (tmp_path / "a").exists()


def test_rank_must_fit_the_layer():
    model = build_model(tiny_config(), seed=0)
    for rank in (65, 0):
        with pytest.raises(ValueError, match=rf"rank {rank}\b.*width 64"):
            apply_lora(model, rank=rank)
    assert lora_settings(model) is None  # refused before anything changed
    assert apply_lora(model, rank=64) is model
    with pytest.raises(ValueError, match=r"rank 9\b.*width 8"):
        LoRALinear(nn.Linear(8, 32), rank=9)


def adapted_folder(tmp_path, config=None):
    base = base_folder(tmp_path, config)
    model = randomize_adapters(apply_lora(mlx_aim.load(base)))
    return base, save_adapters(tmp_path / "adapters", model), model


def test_adapters_for_another_base_are_refused(tmp_path):
    _, adapters, _ = adapted_folder(tmp_path)
    # Same shapes, another config: the digest tells them apart.
    other = base_folder(tmp_path, tiny_config(num_heads=2), name="other-heads")
    with pytest.raises(ValueError, match=r"adapters for the base .*num_heads=4.* not for the loaded base .*num_heads=2"):
        mlx_aim.load(other, adapters=adapters)
    wider = base_folder(tmp_path, tiny_config(width=128), name="other-width")
    with pytest.raises(ValueError, match=r"width=64.*width=128.*differ in width"):
        mlx_aim.load(wider, adapters=adapters)


def test_adapters_of_another_shape_are_refused(tmp_path):
    base, adapters, _ = adapted_folder(tmp_path)
    tensors = dict(mx.load(str(adapters / ADAPTER_WEIGHTS)))
    tensors["trunk.blocks.0.attn.proj.lora_a"] = mx.zeros((64, 4))
    mx.save_safetensors(str(adapters / ADAPTER_WEIGHTS), tensors)
    with pytest.raises(ValueError, match=r"do not fit the loaded base .*trunk\.blocks\.0\.attn\.proj\.lora_a \(64, 4\) "
                                         r"\(expected \(64, 8\)\)"):
        mlx_aim.load(base, adapters=adapters)


@pytest.mark.parametrize("key", ["rank", "base_digest", "keys"])
def test_an_adapter_config_missing_a_key_is_refused(tmp_path, key):
    base, adapters, _ = adapted_folder(tmp_path)
    config = json.loads((adapters / ADAPTER_CONFIG).read_text())
    del config[key]
    (adapters / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{ADAPTER_CONFIG}: missing {key}"):
        mlx_aim.load(base, adapters=adapters)


def test_trainable_fraction_of_aim_600m_is_the_adapters(capsys):
    model = build_model(get_config("aim-600M"))  # lazy: shapes are counted, nothing is evaluated
    total = trainable_parameters(model)
    apply_lora(model)
    width, depth = 1536, 24
    adapters = depth * (3 * 8 * (width + width) + 8 * (width + width))
    assert trainable_parameters(model) == adapters == 2_359_296
    assert 0.003 < adapters / total < 0.004  # about 0.4% of the 600M trunk
    assert capsys.readouterr() == ("", "")


def test_fuse_command_writes_a_model_folder_every_command_reads(tmp_path, capsys):
    base, adapters, model = adapted_folder(tmp_path)
    model.eval()
    out = tmp_path / "fused"
    assert fuse_cli.main(["--model", str(base), "--adapters", str(adapters), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}")
    fused = mlx_aim.load(out)
    x = images()
    assert rel_err(fused.probe_features(x), model.probe_features(x)) < 1e-4
    assert names_and_shapes(fused) == names_and_shapes(mlx_aim.load(base))

    wrong = base_folder(tmp_path, tiny_config(norm_eps=1e-5), name="wrong")
    assert fuse_cli.main(["--model", str(wrong), "--adapters", str(adapters), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "not for the loaded base" in lines[0] and "norm_eps" in lines[0]
    assert not (tmp_path / "x").exists()


def test_fuse_command_dequantizes_a_quantized_base(tmp_path):
    qbase = build_model(tiny_config(), quantization={"bits": 4, "group_size": 32}, seed=0)
    base = save_model(tmp_path / "q", dict(tree_flatten(qbase.parameters())), qbase.config)
    adapters = save_adapters(tmp_path / "adapters", randomize_adapters(apply_lora(mlx_aim.load(base))))
    assert fuse_cli.main(["--model", str(base), "--adapters", str(adapters), "--out", str(tmp_path / "q-fused")]) == 0
    assert mlx_aim.load(tmp_path / "q-fused").config.quantization == {"bits": 4, "group_size": 32}
    assert fuse_cli.main(["--model", str(base), "--adapters", str(adapters), "--out", str(tmp_path / "f"),
                          "--dequantize"]) == 0
    fused = mlx_aim.load(tmp_path / "f")
    assert fused.config.quantization is None
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in fused.named_modules())
