"""The native AdamW step (`mlx_aim.backend.native.adamw_update`, taken by `mlx_aim.training.optim.AdamW`) against the
portable one (mlx's `AdamW` and `clip_grad_norm`) and a float64 numpy reference: random trees of scalars, vectors,
matrices, conv kernels and a leaf spanning several of the kernel's blocks, clipping active, inactive and off, weight
decay on and off, over several steps (bias correction), compiled and not; and the optimizer state the two paths keep,
which must be the same so that a run resumes across them.

Skipped where the platform does not build the extension (macOS), failing where it should be built, as test_native.py."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from conftest import rel_err
from mlx_aim import backend, platforms
from mlx_aim.backend import native
from mlx_aim.training.optim import Schedule, adamw, clip_and_update, clip_gradients, layerwise_adamw

_NOT_BUILT_HERE = platforms.native_kernels_skipped(platforms.current())
pytestmark = pytest.mark.skipif(_NOT_BUILT_HERE is not None, reason=f"native kernels {_NOT_BUILT_HERE}")

TOLERANCE = 1e-6
BETAS, EPS = (0.9, 0.95), 1e-8
SCHEDULE = Schedule(steps=10, lr=1e-2, warmup_init_lr=1e-3, warmup_steps=2)  # the rate changes every step
STEPS = 3
# Scalars, vectors, odd matrices, a conv kernel, and a leaf of 181 x 389 = 70409 elements: three of the kernel's
# blocks of 32768, shared out over the threads.
SHAPES = {"scale": (), "bias": (7,), "blocks": [{"fc": (3, 5), "norm": (5,)}, {"fc": (181, 389), "norm": (389,)}],
          "patch": {"weight": (4, 3, 3, 2)}}


@pytest.fixture(autouse=True)
def _on_the_cpu():
    assert native.available(), f"native kernels not built: {native.unavailable_reason()}"
    with mx.stream(mx.cpu):
        yield


def random_tree(rng, draw) -> dict:
    return tree_map(lambda s: mx.array(draw(rng, s).astype(np.float32)), SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def grid_gradients(rng, scale: float) -> list[dict]:
    """Gradients on a grid of 1/8 (times a power of two): their squares and sums are exact in float32, so the portable
    path's float32 norm equals the native one's float64 sum, and a comparison of the two isolates the update."""
    return [random_tree(rng, lambda r, s: r.integers(-8, 9, s) / 8 * scale) for _ in range(STEPS)]


def float64_steps(params: dict, grads: list[dict], weight_decay: float, max_norm: float):
    """AdamW with clipping in float64 on the same inputs: (parameters, m, v, the norm of each step), flat dicts."""
    p = {k: np.array(v, np.float64) for k, v in tree_flatten(params)}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    b1, b2 = BETAS
    norms = []
    for t, tree in enumerate(grads, start=1):
        g = {k: np.array(x, np.float64) for k, x in tree_flatten(tree)}
        norm = np.sqrt(sum((x * x).sum() for x in g.values()))
        norms.append(norm)
        scale = min(max_norm / (norm + 1e-6), 1.0) if max_norm > 0 else 1.0
        lr = float(np.float32(SCHEDULE(t - 1)))
        for k in p:
            gk = g[k] * scale
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk * gk
            decay = 1 - lr * weight_decay if p[k].ndim >= 2 else 1.0
            update = lr / (1 - b1**t) * m[k] / (np.sqrt(v[k]) / np.sqrt(1 - b2**t) + EPS)
            p[k] = p[k] * decay - update
    return p, m, v, norms


def mlx_steps(params: dict, grads: list[dict], weight_decay: float, max_norm: float, native_path: bool,
              compiled: bool):
    """`STEPS` steps of the package's AdamW (`clip_and_apply`) on one path: (parameters, m, v, norms, the optimizer)."""
    optimizer = adamw(SCHEDULE, BETAS, EPS, weight_decay)
    optimizer.init(params)
    with backend.native_kernels(native_path):
        def step(g, p):
            return optimizer.clip_and_apply(g, p, max_norm)

        if compiled:
            step = mx.compile(step, inputs=optimizer.state, outputs=optimizer.state)
        norms = []
        for g in grads:
            params, norm = step(g, params)
            mx.eval(params, norm, optimizer.state)
            norms.append(float(norm))
    state = dict(tree_flatten(optimizer.state))
    keys = [k for k, _ in tree_flatten(params)]
    return (dict(tree_flatten(params)), {k: state[f"{k}.m"] for k in keys}, {k: state[f"{k}.v"] for k in keys}, norms,
            optimizer)


@pytest.fixture
def native_calls(monkeypatch):
    """Counts the calls of the native kernel (each call is one whole tree's step)."""
    calls = []
    kernel = native.adamw_update

    def counted(*args, **kwargs):
        calls.append(len(args[0]))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(native, "adamw_update", counted)
    return calls


def assert_close(ours: dict, theirs: dict, what: str, tolerance: float = TOLERANCE):
    assert ours.keys() == theirs.keys()
    for k in theirs:
        err = rel_err(np.array(ours[k]), np.array(theirs[k]))
        assert err < tolerance, f"{what} of {k} differs by {err:.2e} of its largest entry"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no-decay", "decay"])
@pytest.mark.parametrize("grad_scale, max_norm", [(1.0, 1.0), (1 / 64, 1e4), (1.0, 0.0)],
                         ids=["clipping", "under-the-bound", "no-clipping"])
def test_native_step_matches_portable_and_float64(native_calls, compiled, weight_decay, grad_scale, max_norm):
    rng = np.random.default_rng(0)
    params = random_tree(rng, lambda r, s: r.standard_normal(s))
    grads = grid_gradients(rng, grad_scale)
    p64, m64, v64, norms64 = float64_steps(params, grads, weight_decay, max_norm)
    if max_norm > 0:
        assert (norms64[0] > max_norm) == (max_norm == 1.0)  # the case clips, or not, as its name says
    p_port, m_port, v_port, norms_port, _ = mlx_steps(params, grads, weight_decay, max_norm, False, compiled)
    assert native_calls == []
    p_nat, m_nat, v_nat, norms_nat, _ = mlx_steps(params, grads, weight_decay, max_norm, True, compiled)
    assert native_calls == [len(tree_flatten(params))] * (1 if compiled else STEPS)  # one call per trace
    for ours, name in ((p_nat, "parameter"), (m_nat, "m"), (v_nat, "v")):
        assert_close(ours, {"parameter": p64, "m": m64, "v": v64}[name], f"native {name} against float64")
        assert_close(ours, {"parameter": p_port, "m": m_port, "v": v_port}[name], f"native {name} against portable")
    np.testing.assert_allclose(norms_nat, norms64, rtol=TOLERANCE)
    np.testing.assert_allclose(norms_nat, norms_port, rtol=TOLERANCE)


def test_native_norm_is_float64_accurate_and_independent_of_the_thread_count():
    """On continuous values MLX's float32 sum of 70409 squares is off by ~1e-5; the kernel's float64 blocks are not,
    and sum in the same order on any number of threads."""
    rng = np.random.default_rng(1)
    params = random_tree(rng, lambda r, s: r.standard_normal(s))
    grads = random_tree(rng, lambda r, s: r.standard_normal(s))
    exact = np.sqrt(sum((np.array(g, np.float64) ** 2).sum() for _, g in tree_flatten(grads)))
    leaves = [g for _, g in tree_flatten(grads)]
    ps = [p for _, p in tree_flatten(params)]

    def norm():
        zeros = [mx.zeros_like(p) for p in ps]
        out = native.adamw_update(leaves, ps, zeros, zeros, mx.array([1e-3, 1.0, 1.0]), BETAS, EPS, 1.0,
                                  [p.ndim >= 2 for p in ps])
        return float(out[3])

    with backend.compute_threads(1):
        one = norm()
    with backend.compute_threads(2):
        two = norm()
    assert one == two
    assert abs(one - exact) <= TOLERANCE * exact
    _, portable = clip_gradients(grads, 1.0)
    assert abs(float(portable) - exact) <= 1e-4 * exact  # the portable path's float32 sum, for scale


def test_optimizer_state_is_the_same_on_both_paths_and_a_run_resumes_across_them():
    """The state's keys, shapes and dtypes are mlx's on both paths; two portable steps, the state saved and restored as
    a checkpoint restores it, then a native step equal three portable steps (and the other way round)."""
    rng = np.random.default_rng(2)
    params = random_tree(rng, lambda r, s: r.standard_normal(s))
    grads = grid_gradients(rng, 1.0)
    *_, portable = mlx_steps(params, grads, 0.05, 1.0, False, False)
    *_, nat = mlx_steps(params, grads, 0.05, 1.0, True, False)
    ours, theirs = dict(tree_flatten(nat.state)), dict(tree_flatten(portable.state))
    assert ours.keys() == theirs.keys()
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    assert int(ours["step"]) == int(theirs["step"]) == STEPS

    for first, then in ((False, True), (True, False)):
        p, *_, optimizer = mlx_steps(params, grads[:2], 0.05, 1.0, first, False)
        saved = dict(tree_flatten(optimizer.state))  # what optimizer.safetensors holds
        resumed = adamw(SCHEDULE, BETAS, EPS, 0.05)
        resumed.init(params)
        resumed.state = tree_unflatten(list(saved.items()))
        resumed.init(params)
        with backend.native_kernels(then):
            after, _ = resumed.clip_and_apply(grads[2], tree_unflatten(list(p.items())), 1.0)
        straight, *_ = mlx_steps(params, grads, 0.05, 1.0, first, False)
        assert_close(dict(tree_flatten(after)), straight, f"resumed ({first} then {then})")


def test_clip_and_update_and_fine_tuning_update_take_the_native_path(native_calls):
    """The pre-training step's `clip_and_update` and `optimizer.update` (fine-tuning's step: no clipping; a layer-wise
    `MultiOptimizer` runs each layer's AdamW natively) give the portable results."""
    import mlx.nn as nn

    def model():
        mx.random.seed(3)
        return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))

    rng = np.random.default_rng(3)
    results = {}
    for native_path in (False, True):
        net = model()
        grads = tree_map(lambda p: mx.array(rng.integers(-8, 9, p.shape).astype(np.float32) / 8),
                         net.trainable_parameters())
        rng = np.random.default_rng(3)  # the same gradients for the other path
        plain = adamw(SCHEDULE, BETAS, EPS, 0.05)
        layered = layerwise_adamw(SCHEDULE, 1, 0.5, BETAS, EPS, 0.05)
        with backend.native_kernels(native_path):
            norm = clip_and_update(plain, net, grads, 1.0)
            layered.update(net, grads)
        mx.eval(net.parameters(), norm)
        results[native_path] = (dict(tree_flatten(net.parameters())), float(norm))
    assert len(native_calls) == 1 + 1  # clip_and_update's one call; the layer-wise optimizer's one non-empty layer
    assert_close(results[True][0], results[False][0], "parameter")
    assert results[True][1] == pytest.approx(results[False][1], rel=TOLERANCE)


def test_other_dtypes_take_the_portable_path_and_bad_lists_are_refused(native_calls):
    params = {"w": mx.ones((3, 4), dtype=mx.bfloat16)}
    optimizer = adamw(SCHEDULE, BETAS, EPS, 0.05)
    with backend.native_kernels(True):
        updated, _ = optimizer.clip_and_apply({"w": mx.ones((3, 4), dtype=mx.bfloat16)}, params, 1.0)
    mx.eval(updated)
    assert native_calls == [] and updated["w"].dtype == mx.bfloat16
    w, scalars = mx.ones((3, 4)), mx.array([1e-3, 1.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        native.adamw_update([mx.ones((4, 3))], [w], [w], [w], scalars, BETAS, EPS, 1.0, [True])
    with pytest.raises(ValueError, match="as many"):
        native.adamw_update([w, w], [w], [w], [w], scalars, BETAS, EPS, 1.0, [True])
    with pytest.raises(ValueError, match="float32"):
        native.adamw_update([w.astype(mx.float16)], [w], [w], [w], scalars, BETAS, EPS, 1.0, [True])
