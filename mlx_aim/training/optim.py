"""The optimizer and the learning-rate schedule the training loops use (pre-training, fine-tuning and the probe): AdamW
with weight decay on matrices only, global gradient-norm clipping, and the learning rate as a function of the step
(linear warm-up, then cosine to 0), as AIM's released recipe has them (arXiv 2401.08541, section 4 and its appendix).

Two paths compute the same AdamW step, chosen per trace by `mlx_aim.backend` (`use_native_kernels`: the CPU, the
workarounds on, the extension built, MLX_AIM_NATIVE not 0):
- portable, what Metal and CUDA run: `clip_gradients` (mlx's `clip_grad_norm`) and mlx's `AdamW`, one small graph of
  element-wise ops per parameter, which MLX's CPU backend runs on one thread;
- native: `mlx_aim.backend.native.adamw_update`, one multithreaded C++ primitive (`csrc/kernels.cpp`) over the whole
  tree. Decisions:
  - the tree goes to the kernel as one primitive over four lists of arrays (gradients, parameters, m, v, in the
    gradients' `tree_map` order) with 3n + 1 outputs, so the norm and the update share one parallel region each and
    `mx.compile` sees one node;
  - the global norm is summed in float64 per block of at most 32768 elements (a block never straddles two tensors),
    the partial sums added in block order: the same norm whatever the thread count, and closer to exact than
    float32 sums (the portable path's);
  - threads: the native kernels' fixed pool, shared with GELU, the softmax and layer norm (MLX_AIM_NATIVE_THREADS,
    else the CPUs this process may run on, which is `platforms.compute_threads` on Linux, the one platform that builds
    the kernels; `backend.compute_threads` changes it); the calling MLX stream thread takes a share. Memory-bound
    work: one pass reads the gradients for the norm, a second reads gradients, parameters and moments and writes the
    new ones (new buffers: MLX offered none of the old ones for reuse in the compiled step);
  - the step's scalars (lr from the schedule, bias corrections c1 = lr / (1 - b1^t), c2 = 1 / sqrt(1 - b2^t), and
    1 - lr weight_decay) are computed with MLX's ops exactly as mlx's Adam computes them, and the kernel then does
    mlx's float32 element-wise operations in mlx's order; weight decay is masked as `AdamW.apply_single` masks it
    (only parameters with ndim >= 2); clipping scales by min(max_norm / (norm + 1e-6), 1), as
    `torch.nn.utils.clip_grad_norm_` and mlx's `clip_grad_norm`;
  - the optimizer's state is mlx's own: `step`, `learning_rate`, and `m`, `v` per parameter, the same keys, shapes
    and dtypes, so checkpoints (`optimizer.safetensors`) are unchanged and a run resumes across the two paths;
  - only float32 trees take the native path (the training loops keep float32 masters); anything else, and an empty
    tree, runs the portable path.
`clip_and_update` is the step's entry (clipping and update fused on the native path); `AdamW.apply_gradients` (what
`optimizer.update` calls, as fine-tuning's step does) takes the native path without clipping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from .. import backend


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up from `warmup_init_lr` to `lr` over `warmup_steps`, then cosine to 0 at `steps`."""

    steps: int
    lr: float
    warmup_init_lr: float
    warmup_steps: int

    @classmethod
    def warmup_cosine(cls, steps: int, lr: float, warmup_init_lr: float, warmup_frac: float) -> "Schedule":
        """The schedule of a run of `steps` steps whose first `warmup_frac` of them warm up."""
        return cls(steps, lr, warmup_init_lr, int(round(warmup_frac * steps)))

    def __call__(self, step):
        return learning_rate(step, self)


def learning_rate(step, schedule):
    """The learning rate of optimizer step `step` (0-based) under `schedule` (a `Schedule`, or anything with
    its four fields, as `pretrain.TrainConfig`). Takes and returns an int/float or an mx.array."""
    as_array = isinstance(step, mx.array)
    s = step.astype(mx.float32) if as_array else mx.array(float(step))
    warmup = schedule.warmup_steps
    peak, init = schedule.lr, schedule.warmup_init_lr
    warm = init + (peak - init) * s / max(warmup, 1)
    progress = mx.clip((s - warmup) / max(schedule.steps - warmup, 1), 0.0, 1.0)
    cosine = 0.5 * peak * (1.0 + mx.cos(math.pi * progress))
    lr = mx.where(s < warmup, warm, cosine)
    return lr if as_array else float(lr)


def clip_gradients(grads: dict, max_norm: float) -> tuple[dict, mx.array]:
    """(gradients scaled so that their global norm is at most `max_norm`, the global norm before scaling), as
    `torch.nn.utils.clip_grad_norm_` (scale max_norm / (norm + 1e-6) when below 1); `max_norm` 0 leaves them as
    they are."""
    if max_norm > 0:
        return optim.clip_grad_norm(grads, max_norm)
    return grads, mx.sqrt(sum(mx.square(g).sum() for _, g in tree_flatten(grads)))


def decayed(parameter: mx.array) -> bool:
    """Whether AdamW decays this parameter: matrices and conv kernels, not biases or LayerNorm parameters."""
    return parameter.ndim >= 2


class AdamW(optim.AdamW):
    """AdamW whose weight decay skips 1-D parameters (biases, LayerNorm scales and shifts); its step runs as one native
    kernel over the whole tree where `mlx_aim.backend` uses the native kernels (see the module's docstring)."""

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        if not decayed(parameter):
            return optim.Adam.apply_single(self, gradient, parameter, state)
        return super().apply_single(gradient, parameter, state)

    def apply_gradients(self, gradients: dict, parameters: dict):
        if self._takes_native_path(gradients, parameters):
            return self._native_step(gradients, parameters, 0.0)[0]
        return super().apply_gradients(gradients, parameters)

    def clip_and_apply(self, gradients: dict, parameters: dict, max_norm: float) -> tuple[dict, mx.array]:
        """(the updated parameters, the gradients' global norm before clipping): `clip_gradients` then
        `apply_gradients`, fused into one kernel on the native path."""
        if self._takes_native_path(gradients, parameters):
            return self._native_step(gradients, parameters, max_norm)
        gradients, norm = clip_gradients(gradients, max_norm)
        return super().apply_gradients(gradients, parameters), norm

    def _takes_native_path(self, gradients: dict, parameters: dict) -> bool:
        if not backend.use_native_kernels():
            return False
        leaves = tree_flatten(gradients)
        return bool(leaves) and all(g.dtype == mx.float32 for _, g in leaves) and all(
            p.dtype == mx.float32 for _, p in _leaves_at(gradients, parameters))

    def _native_step(self, gradients: dict, parameters: dict, max_norm: float) -> tuple[dict, mx.array]:
        # Optimizer.apply_gradients' bookkeeping (initialise, schedule, count the step), then all leaves at once.
        if not self._initialized:
            self.init(gradients)
        for name, scheduler in self._schedulers.items():
            self.state[name] = scheduler(self.step)
        self.state["step"] = self.step + 1
        leaves = _leaves_at(gradients, parameters, self.state)  # (gradient, parameter, its {"m", "v"})
        lr = self.learning_rate.astype(mx.float32)
        b1, b2 = self.betas
        if self.bias_correction:  # as mlx.optimizers.Adam.apply_single computes them
            c1 = (lr / (1 - b1**self.step)).astype(mx.float32)
            c2 = mx.rsqrt(1 - b2**self.step).astype(mx.float32)
        else:
            c1, c2 = lr, mx.array(1.0, mx.float32)
        scalars = mx.stack([c1, c2, 1 - lr * self.weight_decay])
        params, ms, vs, norm = backend.native.adamw_update(
            [g for g, _, _ in leaves], [p for _, p, _ in leaves], [s["m"] for _, _, s in leaves],
            [s["v"] for _, _, s in leaves], scalars, (b1, b2), self.eps, max_norm,
            [decayed(p) for _, p, _ in leaves])
        for (_, _, state), m, v in zip(leaves, ms, vs):
            state["m"], state["v"] = m, v
        updated = iter(params)
        return tree_map(lambda _: next(updated), gradients), norm


def _leaves_at(gradients: dict, *trees) -> list[tuple]:
    """For each leaf of `gradients` in `tree_map` order, the leaf and what `trees` hold at its path (a parameter, or
    the optimizer's state dict of that parameter)."""
    found = []
    tree_map(lambda g, *others: found.append((g, *others)), gradients, *trees)
    return found


def clip_and_update(optimizer: optim.Optimizer, model: nn.Module, grads: dict, max_norm: float) -> mx.array:
    """Clips `grads` to global norm `max_norm` (0: not clipped) and applies one step of `optimizer` to `model`; returns
    the norm before clipping. An `AdamW` does both in one native kernel where the backend allows."""
    if isinstance(optimizer, AdamW):
        params, norm = optimizer.clip_and_apply(grads, model, max_norm)
    else:
        grads, norm = clip_gradients(grads, max_norm)
        params = optimizer.apply_gradients(grads, model)
    model.update(params)
    return norm


def adamw(schedule: Schedule, betas: Sequence[float], eps: float, weight_decay: float) -> AdamW:
    """The optimizer of both loops, its learning rate following `schedule`."""
    return AdamW(learning_rate=schedule, betas=list(betas), eps=eps, weight_decay=weight_decay,
                 bias_correction=True)  # as PyTorch's AdamW, which the paper's recipe used


def layer_id(path: str, depth: int) -> int:
    """The layer a parameter of a probed trunk belongs to for layer-wise learning-rate decay (BEiT, MAE's
    `lr_decay.py`): the patch embedding and positional embedding (`preprocessor.*`) 0, block i (`trunk.blocks.i.*`)
    i + 1, the final norm and the head depth + 1."""
    if path.startswith("preprocessor."):
        return 0
    if path.startswith("trunk.blocks."):
        return int(path.split(".")[2]) + 1
    return depth + 1


def layerwise_adamw(schedule: Schedule, depth: int, decay: float, betas: Sequence[float], eps: float,
                    weight_decay: float) -> optim.MultiOptimizer:
    """`adamw` with layer-wise learning-rate decay: layer `layer_id` follows `schedule` scaled by
    decay ** (depth + 1 - layer_id), so the head and final norm train at the full rate and each block below at
    `decay` times the one above. One AdamW per layer (mlx's `MultiOptimizer`), the head's last (the fallback)."""

    def scaled(layer: int) -> Schedule:
        scale = decay ** (depth + 1 - layer)
        return Schedule(schedule.steps, schedule.lr * scale, schedule.warmup_init_lr * scale, schedule.warmup_steps)

    optimizers = [adamw(scaled(layer), betas, eps, weight_decay) for layer in range(depth + 2)]
    filters = [lambda path, _, layer=layer: layer_id(path, depth) == layer for layer in range(depth + 1)]
    return optim.MultiOptimizer(optimizers, filters)
