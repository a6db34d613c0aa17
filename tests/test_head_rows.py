"""The pixel head on the counted rows only (`objective.counted_rows`, `AIMForPretraining(..., rows=)`,
`aim_loss(..., rows=, row_weights=)`): the same loss and every gradient as the head on all rows, eager and compiled,
in prefix and causal modes; the host-side row lists and their few padded lengths; the training step and the
validation built on them."""

import numpy as np
import pytest

import mlx.core as mx
from conftest import tiny_config
from mlx.utils import tree_flatten
from mlx_aim.models.model import build_model
from mlx_aim.models.objective import (
    ROW_BUCKETS, aim_loss, bucketed_length, counted_rows, counted_rows_loss, next_patch_loss, norm_pix_target,
    patchify, target_mask,
)
from mlx_aim.training.pretrain import TrainConfig, TrainStep, Validator, make_optimizer

N = 16  # tiny_config's patches (16-pixel images in 4-pixel patches)


def images_for(batch: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 16, 16, 3)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# The rows


@pytest.mark.parametrize("prefix", [[1, 15], [5, 9, 13], [15, 15, 15], [1, 1], [3]])
def test_counted_rows_are_the_target_mask_then_weightless_padding(prefix):
    prefix = np.array(prefix, np.int32)
    rows, weights = counted_rows(prefix, N)
    mask = np.array(target_mask(mx.array(prefix), N))  # (B, N - 1): output i of image b counts
    expected = [b * N + i for b in range(len(prefix)) for i in range(N - 1) if mask[b, i]]
    count = len(expected)
    assert rows.dtype == np.int32 and weights.dtype == np.float32 and rows.shape == weights.shape
    assert len(rows) == bucketed_length(count, len(prefix) * (N - 1)) >= count
    np.testing.assert_array_equal(rows[:count], expected)
    np.testing.assert_array_equal(weights[:count], 1.0)
    np.testing.assert_array_equal(rows[count:], 0)  # a valid row: output 0 of image 0, target patch 1
    np.testing.assert_array_equal(weights[count:], 0.0)
    assert weights.sum() == (N - prefix).sum()


def test_causal_counts_every_output_but_the_last_whatever_the_prefixes():
    rows, weights = counted_rows(np.array([7, 3], np.int32), N, attention="causal")
    np.testing.assert_array_equal(rows, [b * N + i for b in range(2) for i in range(N - 1)])
    np.testing.assert_array_equal(weights, 1.0)  # B * (N - 1) is the cap: no padding


@pytest.mark.parametrize("batch, num_patches", [(4, 256), (3, 16), (1, 196), (64, 16)])
def test_many_random_draws_give_few_lengths(batch, num_patches):
    rng = np.random.default_rng(0)
    total = batch * (num_patches - 1)
    step = -(-total // ROW_BUCKETS)
    lengths = set()
    for _ in range(300):
        prefix = rng.integers(1, num_patches, size=batch).astype(np.int32)
        rows, weights = counted_rows(prefix, num_patches)
        count = int(weights.sum())
        assert count == (num_patches - prefix).sum() and len(rows) - count < step
        lengths.add(len(rows))
    assert len(lengths) <= ROW_BUCKETS
    assert all(length % step == 0 or length == total for length in lengths)


def test_bucketed_length_rounds_up_within_the_cap():
    assert [bucketed_length(k, 30, 8) for k in (0, 1, 4, 5, 27, 28, 29, 30)] == [4, 4, 4, 8, 28, 28, 30, 30]
    assert bucketed_length(7, 30, 1) == 30 and bucketed_length(7, 30, 30) == 7
    with pytest.raises(ValueError, match="count=31"):
        bucketed_length(31, 30)


def test_bad_rows_input_is_refused_by_name():
    with pytest.raises(ValueError, match="1-D integer"):
        counted_rows(np.array([[1, 2]]), N)
    with pytest.raises(ValueError, match="1-D integer"):
        counted_rows(np.array([1.0, 2.0]), N)
    with pytest.raises(ValueError, match="'bidirectional'"):
        counted_rows(np.array([1, 2]), N, attention="bidirectional")
    with pytest.raises(ValueError, match="num_patches=1"):
        counted_rows(np.array([1]), 1)
    model = build_model(tiny_config(), seed=0, pretraining=True)
    rows, _ = counted_rows(np.array([3], np.int32), N)
    with pytest.raises(ValueError, match="row_weights"):
        aim_loss(model, mx.array(images_for(1)), mx.array([3]), rows=mx.array(rows))
    with pytest.raises(ValueError, match="pred_rows"):
        counted_rows_loss(mx.zeros((4, 48)), mx.zeros((1, N, 48)), mx.array([0, 1, 2]), mx.ones((3,)))


# ----------------------------------------------------------------------------------------------------
# The head on chosen rows: the same predictions, loss and gradients


def test_head_on_chosen_rows_gives_the_full_outputs_at_those_rows():
    model = build_model(tiny_config(), seed=0, pretraining=True)
    images, prefix = mx.array(images_for(2)), mx.array([4, 11])
    full = np.array(model(images, prefix)).reshape(2 * N, -1)
    rows = np.array([31, 0, 17, 5, 5, 16], np.int32)  # any order, repeats, both images, last and first positions
    picked = np.array(model(images, prefix, rows=mx.array(rows)))
    np.testing.assert_allclose(picked, full[rows], rtol=1e-5, atol=1e-6)


def loss_and_grads(model, images, prefix, attention, rows=None, weights=None, divisor=None, compiled=False):
    def loss_of(params, images, prefix, rows, weights):
        model.update(params)
        if rows is None:
            return aim_loss(model, images, prefix, divisor, attention)
        return aim_loss(model, images, prefix, divisor, attention, rows, weights)

    fn = mx.value_and_grad(loss_of)
    if compiled:
        fn = mx.compile(fn)
    params = model.trainable_parameters()
    loss, grads = fn(params, images, prefix, rows, weights)
    model.update(params)
    mx.eval(loss, grads)
    return float(loss), dict(tree_flatten(grads))


PREFIX_DRAWS = {
    # name: (prefix lengths of a batch of 3, attention)
    "extremes": ([1, 15, 7], "prefix"),
    "all-long": ([15, 14, 15], "prefix"),
    "random": (None, "prefix"),
    "causal": ([1, 1, 1], "causal"),
}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("draw", PREFIX_DRAWS)
def test_loss_and_every_gradient_equal_the_head_on_all_rows(draw, compiled):
    prefix, attention = PREFIX_DRAWS[draw]
    if prefix is None:
        prefix = np.random.default_rng(2).integers(1, N, size=3)
    prefix = np.asarray(prefix, np.int32)
    model = build_model(tiny_config(head_depth=3), seed=0, pretraining=True)
    images = mx.array(images_for(3))
    rows, weights = counted_rows(prefix, N, attention)
    if attention == "prefix":
        assert (weights == 0).any()  # padding rows take part
    divisor = mx.array(float((N - prefix).sum()) * 1.5)  # a micro-batch's share of a larger batch's count
    for d in (None, divisor):
        loss, grads = loss_and_grads(model, images, mx.array(prefix), attention, divisor=d, compiled=compiled)
        ours, our_grads = loss_and_grads(model, images, mx.array(prefix), attention, mx.array(rows),
                                         mx.array(weights), divisor=d, compiled=compiled)
        assert ours == pytest.approx(loss, rel=1e-5)
        assert our_grads.keys() == grads.keys()
        for key, grad in grads.items():
            np.testing.assert_allclose(np.array(our_grads[key]), np.array(grad), rtol=1e-5, atol=1e-6, err_msg=key)
    assert any(np.abs(np.array(g)).max() > 1e-3 for k, g in grads.items() if k.startswith("trunk."))


def test_counted_rows_loss_is_next_patch_loss_on_any_predictions():
    rng = np.random.default_rng(3)
    pred = mx.array(rng.standard_normal((2, N, 12)).astype(np.float32))
    target = norm_pix_target(mx.array(rng.standard_normal((2, N, 12)).astype(np.float32)))
    prefix = np.array([6, 2], np.int32)
    rows, weights = counted_rows(prefix, N)
    picked = pred.reshape(2 * N, 12)[mx.array(rows)]
    ours = counted_rows_loss(picked, target, mx.array(rows), mx.array(weights))
    assert float(ours) == pytest.approx(float(next_patch_loss(pred, target, mx.array(prefix))), rel=1e-6)
    summed = counted_rows_loss(picked, target, mx.array(rows), mx.array(weights), num_targets=1.0)
    assert float(summed) == pytest.approx(float(ours) * weights.sum(), rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# The training step and the validation on the counted rows


def step_gradients(config, prefix, grad_accum):
    tc = TrainConfig(steps=10, batch_size=len(prefix), grad_accum=grad_accum)
    model = build_model(config, seed=0, pretraining=True)
    optimizer = make_optimizer(tc)
    optimizer.init(model.trainable_parameters())
    step = TrainStep(model, optimizer, tc)
    loss, grads = step.gradients(images_for(len(prefix)), prefix, int((N - prefix).sum()))
    mx.eval(loss, grads)
    return model, float(loss), dict(tree_flatten(grads))


def test_train_step_in_two_micro_batches_equals_one_batch_and_the_full_head():
    config = tiny_config()
    prefix = np.array([1, 14, 6, 15], np.int32)  # the two micro-batches count 16 and 10 rows: two lengths
    model, loss, grads = step_gradients(config, prefix, grad_accum=1)
    _, loss_2, grads_2 = step_gradients(config, prefix, grad_accum=2)
    full, full_grads = loss_and_grads(model, mx.array(images_for(4)), mx.array(prefix), "prefix")
    for theirs, their_grads in ((loss_2, grads_2), (full, full_grads)):
        assert loss == pytest.approx(theirs, rel=1e-5)
        for key, grad in their_grads.items():
            np.testing.assert_allclose(np.array(grads[key]), np.array(grad), rtol=1e-5, atol=1e-6, err_msg=key)


def test_validation_sums_the_loss_over_the_counted_rows():
    config = tiny_config()
    model = build_model(config, seed=0, pretraining=True)
    model.eval()
    images = images_for(5)
    # Five samples named by their index; a batch of 2 leaves a last batch of 1 (another length).
    validator = Validator(model, [str(i) for i in range(5)], TrainConfig(steps=10, batch_size=2, val_images=5,
                                                                         num_workers=0))
    validator.transform = lambda path, rng=None: images[int(path.name)]
    prefix = mx.array(validator.prefix)  # the subset is every sample, in order
    pred = model(mx.array(images), prefix)
    target = norm_pix_target(patchify(mx.array(images), config.patch_size))
    assert validator() == pytest.approx(float(next_patch_loss(pred, target, prefix)), rel=1e-5)


@pytest.mark.parametrize("prefix", [[1, 15, 6], [15, 9]])
def test_torch_reference_step_on_counted_rows_equals_apples_step(prefix):
    import torch
    import torch_reference

    config = tiny_config(head_depth=3)
    weights = {k: np.array(v) for k, v in tree_flatten(build_model(config, seed=0, pretraining=True).parameters())}
    images = torch.from_numpy(images_for(len(prefix))).permute(0, 3, 1, 2).contiguous()
    prefix = torch.tensor(prefix)
    results = []
    for counted_rows_only in (False, True):
        model = torch_reference.load_mlx_weights(torch_reference.AIMPretrainingReference(config), weights)
        step = torch_reference.PretrainStep(model, counted_rows=counted_rows_only)
        loss = float(step.backward(images, prefix))
        results.append((loss, {k: p.grad.numpy().copy() for k, p in model.named_parameters()}))
    (loss, grads), (ours, our_grads) = results
    assert ours == pytest.approx(loss, rel=1e-5)
    for key, grad in grads.items():
        np.testing.assert_allclose(our_grads[key], grad, rtol=1e-5, atol=1e-6, err_msg=key)
    rows = torch_reference.counted_row_indices(prefix, N, "cpu")
    np.testing.assert_array_equal(rows.numpy(), counted_rows(prefix.numpy().astype(np.int32), N)[0][: len(rows)])
