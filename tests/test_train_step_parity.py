"""One whole pre-training step of MLX (`TrainStep`, compiled as `pretrain`'s loop compiles it) against the same step
in PyTorch (`torch_reference.PretrainStep`) on the same weights, images and prefix lengths, in float32, quantity by
quantity: the loss, every gradient before clipping, the global norm, the clipped gradients, the AdamW update and its
moments; and the gradient clipping alone against `torch.nn.utils.clip_grad_norm_`."""

import numpy as np
import pytest
import torch

import mlx.core as mx
import torch_reference
from conftest import rel_err, tiny_config
from mlx.utils import tree_flatten, tree_unflatten
from mlx_aim.backend import native
from mlx_aim.models.model import build_model
from mlx_aim.training.pretrain import TrainConfig, TrainStep, clip_gradients, make_optimizer

# Both sides sum the same float32 terms in other orders: a few ulps of the largest terms, about 1e-6 of a tensor's
# largest entry (an entry's own relative error is unbounded: small entries are cancellations of large terms).
TOLERANCE = 1e-5

CASES = {
    # name: (config, prefix lengths (one per image), scale of the pixel head's output layer, whether clipping acts)
    "tiny-batch1-clipped": (tiny_config(), [5], 1.0, True),
    # The output layer shrunk as after some training (predictions near the targets' mean): the norm falls under 1.
    "tiny-batch3-unclipped": (tiny_config(), [1, 7, 15], 0.3, False),
    "deep-head-batch2-clipped": (tiny_config(head_depth=4), [3, 11], 1.0, True),
}


def torch_layout(key: str, value: np.ndarray) -> np.ndarray:
    """An MLX array as the torch parameter of the same name holds it (conv kernels (out, kh, kw, in) -> (out, in, kh,
    kw), as `torch_reference.load_mlx_weights`)."""
    return value.transpose(0, 3, 1, 2) if value.ndim == 4 else value


def numpy_tree(tree) -> dict[str, np.ndarray]:
    return {k: torch_layout(k, np.array(v)) for k, v in tree_flatten(tree)}


def worst(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> tuple[float, str]:
    """The largest `rel_err` over the parameters, and which parameter it is."""
    assert ours.keys() == theirs.keys()
    return max((rel_err(ours[k], theirs[k]), k) for k in theirs)


def mlx_step(config, prefix_len, out_scale):
    """The MLX step, taken in `TrainStep`'s two halves so that the gradients before clipping can be read between."""
    train_config = TrainConfig(steps=10, batch_size=len(prefix_len), warmup_frac=0.0)
    model = build_model(config, seed=0, pretraining=True)
    model.pixel_head.out_proj.weight = model.pixel_head.out_proj.weight * out_scale
    mx.eval(model.parameters())
    weights = {k: np.array(v) for k, v in tree_flatten(model.parameters())}  # MLX layout, for load_mlx_weights
    before = numpy_tree(model.parameters())
    optimizer = make_optimizer(train_config)
    optimizer.init(model.trainable_parameters())
    step = TrainStep(model, optimizer, train_config)
    images = np.random.default_rng(1).standard_normal((len(prefix_len), config.image_size, config.image_size,
                                                       config.num_channels)).astype(np.float32)
    prefix_len = np.asarray(prefix_len, np.int32)
    loss, grads = step.gradients(images, prefix_len, int((config.num_patches - prefix_len).sum()))
    mx.eval(loss, grads)
    clipped, _ = clip_gradients(grads, train_config.grad_clip)
    loss_after, norm = step.apply(loss, grads)
    state = dict(tree_flatten(optimizer.state))
    return {
        "train_config": train_config, "images": images, "prefix_len": prefix_len, "weights": weights, "before": before,
        "loss": float(loss), "loss_after": float(loss_after), "grads": numpy_tree(grads), "norm": float(norm),
        "clipped": numpy_tree(clipped), "after": numpy_tree(model.parameters()),
        "lr": float(optimizer.learning_rate), "step": int(optimizer.step),
        "m": {k: torch_layout(k, np.array(state[f"{k}.m"])) for k in before},
        "v": {k: torch_layout(k, np.array(state[f"{k}.v"])) for k in before},
    }


def torch_step(config, ours, lr):
    """The reference step on the same weights, its loss and gradients computed by torch."""
    model = torch_reference.load_mlx_weights(torch_reference.AIMPretrainingReference(config), ours["weights"])
    step = torch_reference.PretrainStep(model, lr=lr, grad_clip=1.0)
    images = torch.from_numpy(ours["images"]).permute(0, 3, 1, 2).contiguous()
    return model, step, step.backward(images, torch.from_numpy(ours["prefix_len"].astype(np.int64)))


def grads_of(model) -> dict[str, np.ndarray]:
    return {k: p.grad.detach().numpy().copy() for k, p in model.named_parameters()}


@pytest.mark.parametrize("case", CASES)
def test_one_training_step_matches_torch(backend_path, case, monkeypatch):
    config, prefix_len, out_scale, clipping = CASES[case]
    calls, kernel = [], native.adamw_update
    monkeypatch.setattr(native, "adamw_update", lambda *args: calls.append(1) or kernel(*args))
    ours = mlx_step(config, prefix_len, out_scale)
    assert bool(calls) == (backend_path == "native")  # the native path's step is the native AdamW's
    lr = ours["train_config"].schedule(0)
    assert ours["step"] == 1 and ours["lr"] == pytest.approx(lr, rel=1e-7)  # the rate the schedule gives step 1

    # Forward and backward: the loss and every gradient before clipping.
    model, step, loss = torch_step(config, ours, lr)
    assert abs(ours["loss"] - float(loss)) <= TOLERANCE * abs(float(loss))
    assert ours["loss_after"] == ours["loss"]
    err, name = worst(ours["grads"], grads_of(model))
    assert err < TOLERANCE, f"{case}: gradient of {name} differs by {err:.2e} of its largest entry"

    # Clipping: the global norm before clipping, and the clipped gradients, against clip_grad_norm_ on torch's own.
    norm = float(step.update())
    assert (norm > 1.0) == clipping, f"{case}: the global norm is {norm}, not {'over' if clipping else 'under'} 1"
    assert abs(ours["norm"] - norm) <= TOLERANCE * norm
    err, name = worst(ours["clipped"], grads_of(model))
    assert err < TOLERANCE, f"{case}: clipped gradient of {name} differs by {err:.2e} of its largest entry"

    # AdamW on equal inputs (MLX's gradients, clipped by torch): on torch's own, step 1's g / (|g| + eps) turns the
    # float32 rounding of entries with |g| near eps = 1e-8 into up to a few percent of lr (3e-4 of a tensor's max).
    model, step, _ = torch_step(config, ours, lr)
    for key, p in model.named_parameters():
        p.grad = torch.from_numpy(ours["grads"][key].copy())
    assert abs(float(step.update()) - ours["norm"]) <= TOLERANCE * ours["norm"]
    after = {k: p.detach().numpy() for k, p in model.named_parameters()}
    err, name = worst(ours["after"], after)
    assert err < TOLERANCE, f"{case}: {name} after the step differs by {err:.2e} of its largest entry"
    params = dict(model.named_parameters())
    for moment, torch_name in (("m", "exp_avg"), ("v", "exp_avg_sq")):
        theirs = {k: step.optimizer.state[p][torch_name].numpy() for k, p in params.items()}
        err, name = worst(ours[moment], theirs)
        assert err < TOLERANCE, f"{case}: moment {moment} of {name} differs by {err:.2e} of its largest entry"


def random_gradients(rng, scale: float) -> dict:
    """A tree shaped like a model's gradients: matrices, vectors, a conv kernel, nested."""
    shapes = {"proj": {"weight": (8, 4, 4, 3), "bias": (8,)}, "blocks": [{"fc1": (16, 8), "norm": (8,)}] * 2}
    leaves = [(k, mx.array(rng.standard_normal(s).astype(np.float32) * scale))
              for k, s in tree_flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))]
    return tree_unflatten(leaves)


@pytest.mark.parametrize("scale, clipped", [(1.0, True), (0.01, False), (0.0, False)], ids=["over", "under", "zero"])
def test_gradient_clipping_matches_clip_grad_norm(scale, clipped):
    grads = random_gradients(np.random.default_rng(0), scale)
    ours, norm = clip_gradients(grads, 1.0)
    flat = dict(tree_flatten(grads))
    tensors = {k: torch.from_numpy(np.array(g)) for k, g in flat.items()}
    their_norm = float(torch.nn.utils.clip_grad_norm_(_with_grads(tensors), 1.0))  # scales `tensors` in place
    assert (their_norm > 1.0) == clipped
    assert abs(float(norm) - their_norm) <= TOLERANCE * max(their_norm, 1e-30)
    for key, g in tree_flatten(ours):
        theirs = tensors[key].numpy()
        if scale == 0.0:
            np.testing.assert_array_equal(np.array(g), theirs)  # nothing to scale, nothing divided by zero
        else:
            assert rel_err(g, theirs) < TOLERANCE
    if clipped:
        assert float(mx.sqrt(sum(mx.square(g).sum() for _, g in tree_flatten(ours)))) == pytest.approx(1.0, rel=1e-5)
    else:
        for key, g in tree_flatten(ours):
            np.testing.assert_array_equal(np.array(g), np.array(flat[key]))  # under the bound: untouched


def _with_grads(tensors: dict) -> list:
    """Parameters whose `.grad` are `tensors` (clip_grad_norm_ scales them in place)."""
    params = []
    for t in tensors.values():
        p = torch.nn.Parameter(torch.zeros_like(t))
        p.grad = t
        params.append(p)
    return params
