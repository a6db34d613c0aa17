"""The pre-training objective's pieces against numpy/PyTorch references, the mask semantics, and the
recipe's small parts (schedule, optimizer, initialisation)."""

import math

import numpy as np
import pytest
import torch

import mlx.core as mx
import mlx.nn as nn
from conftest import rel_err, tiny_config
from mlx_aim.models.model import build_model
from mlx_aim.models.objective import (
    aim_loss, next_patch_loss, norm_pix_target, num_targets, patchify, sample_prefix_len, target_mask, unpatchify,
)
from mlx_aim.training.optim import AdamW, learning_rate
from mlx_aim.training.pretrain import TrainConfig, step_prefix_len


def torch_patchify(images_nhwc: np.ndarray, p: int) -> np.ndarray:
    """MAE's patchify, written independently: NCHW -> (B, N, p*p*C) with (row, col, channel) inside."""
    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(B, (H // p) * (W // p), p * p * C).numpy()


def numpy_loss(pred, target, prefix_len):
    """Loop-by-loop reference: mean over pixels, then over every counted (sample, position)."""
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        for i in range(pred.shape[1] - 1):
            if i + 1 >= prefix_len[b]:
                total += float(np.mean((pred[b, i].astype(np.float64) - target[b, i + 1]) ** 2))
                count += 1
    return total / count, count


def test_patchify_matches_reference_and_the_patch_conv():
    images = np.random.randn(2, 12, 20, 3).astype(np.float32)
    ours = np.array(patchify(mx.array(images), 4))
    assert ours.shape == (2, 15, 48)
    np.testing.assert_array_equal(ours, torch_patchify(images, 4))
    # Patch k is what the patch-embedding conv sees at token k: conv == patches @ W.reshape(out, -1).T + b.
    conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)
    direct = np.array(conv(mx.array(images)).reshape(2, -1, 8))
    via_patches = ours @ np.array(conv.weight).reshape(8, -1).T + np.array(conv.bias)
    np.testing.assert_allclose(direct, via_patches, atol=1e-5)


def test_unpatchify_inverts_patchify():
    images = mx.array(np.random.randn(3, 8, 16, 2).astype(np.float32))
    patches = patchify(images, 4)
    np.testing.assert_array_equal(np.array(unpatchify(patches, 4, grid=(2, 4), num_channels=2)), np.array(images))
    square = mx.array(np.random.randn(1, 12, 12, 3).astype(np.float32))
    np.testing.assert_array_equal(np.array(unpatchify(patchify(square, 3), 3)), np.array(square))
    with pytest.raises(ValueError, match="square grid"):
        unpatchify(patches, 4, num_channels=2)
    with pytest.raises(ValueError, match="not divisible"):
        patchify(mx.zeros((1, 10, 12, 3)), 4)


def test_sample_prefix_len_is_uniform_over_1_to_k_minus_1():
    k = 6
    draws = np.array(sample_prefix_len(np.random.default_rng(0), 6000, k))
    assert draws.dtype == np.int32 and draws.min() == 1 and draws.max() == k - 1
    counts = np.bincount(draws, minlength=k)[1:]
    assert counts.min() > 0.8 * 6000 / (k - 1)  # every length drawn about equally often
    np.testing.assert_array_equal(draws, np.array(sample_prefix_len(np.random.default_rng(0), 6000, k)))
    keyed = np.array(sample_prefix_len(mx.random.key(1), 5000, k))
    assert keyed.min() == 1 and keyed.max() == k - 1
    with pytest.raises(ValueError, match="at least 2 patches"):
        sample_prefix_len(None, 4, 1)
    # The training loop's per-step draw is a function of (seed, step) only.
    np.testing.assert_array_equal(step_prefix_len(3, 7, 16, 10, "prefix"), step_prefix_len(3, 7, 16, 10, "prefix"))
    assert not np.array_equal(step_prefix_len(3, 7, 16, 10, "prefix"), step_prefix_len(3, 8, 16, 10, "prefix"))
    np.testing.assert_array_equal(step_prefix_len(3, 7, 16, 10, "causal"), np.ones(16))


def test_norm_pix_target_matches_torch_unbiased_variance():
    patches = np.random.rand(2, 5, 48).astype(np.float32) * 3 + 1
    t = torch.from_numpy(patches)
    ref = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5  # var is unbiased
    ours = norm_pix_target(mx.array(patches))
    assert ours.dtype == mx.float32
    np.testing.assert_allclose(np.array(ours), ref.numpy(), atol=1e-5)
    # A flat patch gives zeros, not NaN (eps).
    assert np.all(np.array(norm_pix_target(mx.ones((1, 1, 12)))) == 0)


def test_next_patch_loss_matches_the_loop_reference():
    pred = np.random.randn(3, 6, 10).astype(np.float32)
    target = np.random.randn(3, 6, 10).astype(np.float32)
    prefix = np.array([1, 3, 5])
    ref, count = numpy_loss(pred, target, prefix)
    assert count == int(num_targets(mx.array(prefix), 6)) == 5 + 3 + 1
    ours = next_patch_loss(mx.array(pred), mx.array(target), mx.array(prefix))
    assert float(ours) == pytest.approx(ref, rel=1e-6)
    # Shards that divide by the whole batch's count sum to the whole batch's loss.
    parts = [next_patch_loss(mx.array(pred[i : i + 1]), mx.array(target[i : i + 1]), mx.array(prefix[i : i + 1]),
                             num_targets=count) for i in range(3)]
    assert float(sum(parts)) == pytest.approx(ref, rel=1e-6)
    mask = np.array(target_mask(mx.array(prefix), 6))
    np.testing.assert_array_equal(mask[1], [False, False, True, True, True])  # targets 3, 4, 5 count


def test_gradient_of_prefix_targets_is_exactly_zero():
    pred = mx.array(np.random.randn(2, 8, 12).astype(np.float32))
    target = mx.array(np.random.randn(2, 8, 12).astype(np.float32))
    prefix = mx.array([3, 6])
    g_pred, g_target = mx.grad(lambda p, t: next_patch_loss(p, t, prefix), argnums=(0, 1))(pred, target)
    g_pred, g_target = np.array(g_pred), np.array(g_target)
    for b, s in enumerate([3, 6]):
        # Targets 0..s-1 (the prefix) and the outputs predicting them never move the loss.
        assert np.all(g_target[b, :s] == 0) and np.all(g_pred[b, : s - 1] == 0)
        assert np.all(g_pred[b, -1] == 0)  # the last output predicts nothing
        assert np.all(np.abs(g_target[b, s:]).sum(-1) > 0) and np.all(np.abs(g_pred[b, s - 1 : -1]).sum(-1) > 0)


@pytest.fixture
def pretrain_config():
    return tiny_config(width=32, depth=2, num_heads=2, head_depth=1, probe_layers=[1])


def test_prefix_token_never_sees_a_later_token_outside_the_prefix(pretrain_config):
    model = build_model(pretrain_config, seed=0, pretraining=True)
    images = np.random.randn(1, 16, 16, 3).astype(np.float32)
    prefix = mx.array([5])  # tokens 0..4 are the prefix

    def outputs(imgs):
        return np.array(model(mx.array(imgs), prefix))

    base = outputs(images)

    def perturb(token):
        changed = images.copy()
        row, col = divmod(token, 4)
        changed[0, row * 4 : row * 4 + 4, col * 4 : col * 4 + 4] += 3.0
        return np.abs(outputs(changed) - base).max(axis=-1)[0]

    delta = perturb(9)  # outside the prefix: only outputs at 9 and later may change
    assert np.all(delta[:9] == 0) and np.all(delta[9:] > 1e-4)
    delta = perturb(3)  # inside the prefix: every output sees it, including the earlier prefix tokens
    assert np.all(delta > 1e-4)


def test_aim_loss_is_the_objective_on_the_model_output(pretrain_config):
    model = build_model(pretrain_config, seed=1, pretraining=True)
    images = mx.array(np.random.randn(2, 16, 16, 3).astype(np.float32))
    prefix = mx.array([2, 9])
    pred = np.array(model(images, prefix))
    target = np.array(norm_pix_target(patchify(images, 4)))
    ref, _ = numpy_loss(pred, target, [2, 9])
    assert float(aim_loss(model, images, prefix)) == pytest.approx(ref, rel=1e-5)
    causal = float(aim_loss(model, images, mx.array([1, 1]), attention="causal"))
    ref_causal, count = numpy_loss(np.array(model(images, attention="causal")), target, [1, 1])
    assert count == 2 * 15 and causal == pytest.approx(ref_causal, rel=1e-5)


def test_learning_rate_warms_up_then_follows_a_cosine_to_zero():
    tc = TrainConfig(steps=200, lr=1e-3, warmup_frac=0.1)
    assert tc.warmup_steps == 20
    assert learning_rate(0, tc) == pytest.approx(1e-6)
    assert learning_rate(10, tc) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert learning_rate(20, tc) == pytest.approx(1e-3)
    assert learning_rate(110, tc) == pytest.approx(0.5e-3, rel=1e-5)
    assert learning_rate(200, tc) == pytest.approx(0.0, abs=1e-12)
    step = mx.array(65)
    assert float(learning_rate(step, tc)) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 45 / 180)), rel=1e-5)
    assert learning_rate(0, TrainConfig(steps=10, warmup_frac=0.0)) == pytest.approx(1e-3)


def test_adamw_matches_torch_and_skips_decay_on_1d_parameters():
    lr, wd = 1e-2, 0.1
    w0 = np.random.randn(4, 3).astype(np.float32)
    b0 = np.random.randn(4).astype(np.float32)
    grads = [(np.random.randn(4, 3).astype(np.float32), np.random.randn(4).astype(np.float32)) for _ in range(3)]
    opt = AdamW(learning_rate=lr, betas=[0.9, 0.95], eps=1e-8, weight_decay=wd, bias_correction=True)
    params = {"w": mx.array(w0), "b": mx.array(b0)}
    tw, tb = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
    topt = torch.optim.AdamW([{"params": [tw], "weight_decay": wd}, {"params": [tb], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)
    for gw, gb in grads:
        params = opt.apply_gradients({"w": mx.array(gw), "b": mx.array(gb)}, params)
        tw.grad, tb.grad = torch.from_numpy(gw), torch.from_numpy(gb)
        topt.step()
    assert rel_err(params["w"], tw.detach().numpy()) < 1e-5
    assert rel_err(params["b"], tb.detach().numpy()) < 1e-5
    # With a zero gradient only the matrix shrinks, by exactly (1 - lr * wd).
    fresh = AdamW(learning_rate=lr, weight_decay=wd)
    out = fresh.apply_gradients({"w": mx.zeros((4, 3)), "b": mx.zeros(4)}, {"w": mx.array(w0), "b": mx.array(b0)})
    np.testing.assert_allclose(np.array(out["w"]), w0 * (1 - lr * wd), rtol=1e-6)
    np.testing.assert_array_equal(np.array(out["b"]), b0)


def test_init_is_xavier_uniform_with_zero_biases(pretrain_config):
    model = build_model(pretrain_config, seed=0, pretraining=True)
    fc1 = np.array(model.trunk.blocks[0].mlp.fc1.weight)  # (128, 32)
    bound = math.sqrt(6 / (128 + 32))
    assert np.abs(fc1).max() <= bound and np.abs(fc1).max() > 0.9 * bound
    assert np.std(fc1) == pytest.approx(bound / math.sqrt(3), rel=0.1)
    conv = np.array(model.preprocessor.patchifier.proj.weight)  # (32, 4, 4, 3): fan_in 48
    assert np.abs(conv).max() <= math.sqrt(6 / (48 + 32))
    assert np.all(np.array(model.preprocessor.patchifier.proj.bias) == 0)
    assert np.all(np.array(model.pixel_head.in_proj.bias) == 0)
    assert np.all(np.array(model.trunk.post_trunk_norm.weight) == 1)
    # The same seed gives the same model: every data-parallel process starts identical.
    again = build_model(pretrain_config, seed=5, pretraining=True)
    other = build_model(pretrain_config, seed=5, pretraining=True)
    np.testing.assert_array_equal(np.array(again.trunk.blocks[1].attn.qkv.weight),
                                  np.array(other.trunk.blocks[1].attn.qkv.weight))
