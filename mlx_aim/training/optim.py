"""The optimizer and the learning-rate schedule both training loops use (pre-training and the probe): AdamW with
weight decay on matrices only, and the learning rate as a function of the step (linear warm-up, then cosine to 0),
as AIM's released recipe has them (arXiv 2401.08541, section 4 and its appendix)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import mlx.optimizers as optim


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


class AdamW(optim.AdamW):
    """AdamW whose weight decay skips 1-D parameters (biases, LayerNorm scales and shifts)."""

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        if parameter.ndim < 2:
            return optim.Adam.apply_single(self, gradient, parameter, state)
        return super().apply_single(gradient, parameter, state)


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
