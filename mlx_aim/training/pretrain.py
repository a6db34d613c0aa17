"""Pre-training AIM on an image folder, on one machine or several (AIM section 3 and the released recipe).

    from mlx_aim import get_config
    from mlx_aim.training.pretrain import TrainConfig, pretrain
    summary = pretrain(get_config("aim-tiny"), TrainConfig(steps=2000, batch_size=64), "data/shapes", "runs/tiny")
    model = mlx_aim.load("runs/tiny/model")  # the pre-trained trunk (`AIMEncoder`): probe it to classify

The output folder:

    out/config.json, out/train_config.json   the run's two configs
    out/log.jsonl                            one JSON object a line: training and validation records
    out/checkpoints/step_00001000/           model.safetensors (trunk + pixel head), optimizer.safetensors,
                                             config.json, state.json (step, data position, configs)
    out/model/                               the trunk alone, a folder `mlx_aim.load` reads

Decisions where the paper is silent or does not fit a laptop:
- `batch_size` is the global batch of one optimizer step (all processes, all micro-batches), as the paper's
  4096. The peak learning rate is not scaled with the batch: the paper's 1e-3 at batch 4096 holds up at the
  small batches used here (32-256) with warm-up and clipping; pass `lr` to change it.
- Mixed precision: parameters and optimizer state stay float32; with `dtype="bfloat16"` the forward and
  backward run on a bfloat16 copy of the weights (gradients flow back to the float32 masters); the loss and
  its targets are float32. Validation always runs in float32, so its numbers compare across dtypes.
- Randomness after initialisation comes from explicit seeds, never from MLX's global generator: step s
  draws its prefix lengths from `np.random.default_rng([PREFIX_STREAM, seed, s])` and the data loader's
  augmentation from (seed, epoch, sample). Resuming therefore needs only the step and the data position.
- Weight decay applies to matrices and conv kernels only (`ndim >= 2`): biases and LayerNorm parameters
  are 1-D; the position embeddings are fixed sin-cos, not parameters.

Several machines (data parallel, `mx.distributed`). Every process builds the same model from the same
seed, reads its own shard of each global batch (`BatchLoader(rank, world_size)`), and the gradients are
averaged across processes before clipping. Each process's loss is its share of the global batch's loss
(divided by the global count of targets), so the result equals single-process training on the same global
batch. Only rank 0 writes logs and checkpoints. On one machine:

    mlx.launch -n 2 python scripts/pretrain.py --preset aim-tiny --data DIR --out DIR

On several Macs (the ring backend over Ethernet or Thunderbolt; every host needs the same Python
environment, the repository at the same path, the data at the same path, and passwordless ssh):

    hosts.json: [{"ssh": "mac1.local", "ips": ["192.168.1.10"]}, {"ssh": "mac2.local", "ips": ["192.168.1.11"]}]
    mlx.launch --hostfile hosts.json --backend ring -- python scripts/pretrain.py --preset aim-small \\
        --data /data/images --out /data/runs/small

`--resume` on several machines needs the output folder readable at the same path by every host (a shared
folder, or rank 0's checkpoint copied to the others), since every process loads the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from tqdm import tqdm

from ..models.config import AIMConfig, check_int_fields
from ..data import BatchLoader, EvalTransform, TrainTransform, load_splits
from ..fileio import read_json, write_json
from ..models.model import AIMEncoder, AIMForPretraining, build_model, parse_dtype
from ..models.objective import aim_loss, counted_rows
from .optim import AdamW, Schedule, adamw, clip_and_update, clip_gradients  # noqa: F401 (clip_gradients: the tests')
from .runs import (
    LossWindow, RecipeConfig, RunFolder, RunLog, check_finite, check_same_start, compare_settings, last_step, read_log,
    silent,
)
from ..checkpoints.run_folders import CHECKPOINTS_DIR, MODEL_DIR, TRAIN_CONFIG_NAME, WEIGHTS_FILE, latest_checkpoint
from ..checkpoints.weights import check_weights, read_safetensors, save_model

PREFIX_STREAM = 101  # first word of the seed of step s's prefix draws: [PREFIX_STREAM, seed, s]
VAL_PREFIX_STREAM = 102  # the validation set's fixed prefix draws
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclass
class TrainConfig(RecipeConfig):
    """The optimisation recipe (AIM's released config, scaled down) and the run's bookkeeping.

    The first group of fields decides the numbers a run produces; a resumed run must keep them. The
    second group (intervals, workers) changes only what is written and how fast.
    """

    steps: int = 1000
    batch_size: int = 64  # global: all processes and all micro-batches of one optimizer step
    grad_accum: int = 1  # micro-batches per step on each process
    lr: float = 1e-3  # peak
    warmup_init_lr: float = 1e-6
    warmup_frac: float = 0.025
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"
    seed: int = 0
    crop_scale: tuple[float, float] = (0.4, 1.0)
    hflip: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_prob: float = 0.8
    val_ratio: float = 0.1  # of the training folder held out when the data has no val/ folder
    val_images: int = 512  # at most this many held-out images per validation (a fixed seeded subset)

    log_interval: int = 10
    val_interval: int = 200  # 0: validate only at the end
    ckpt_interval: int = 500  # 0: checkpoint only at the end
    keep_last: int = 2
    num_workers: int = 2
    prefetch: int = 4

    RUNTIME_FIELDS = ("log_interval", "val_interval", "ckpt_interval", "keep_last", "num_workers", "prefetch")
    WHAT = "train config"

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        self.crop_scale = tuple(float(s) for s in self.crop_scale)
        self.color_jitter = tuple(float(c) for c in self.color_jitter)
        self.validate()

    def validate(self) -> None:
        check_int_fields(self, ("steps", "batch_size", "grad_accum", "keep_last", "prefetch"), 1, "train config")
        check_int_fields(self, ("log_interval", "val_interval", "ckpt_interval", "num_workers", "val_images", "seed"),
                         0, "train config")
        if self.log_interval == 0:
            raise ValueError("train config log_interval=0: expected a positive integer")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"train config dtype={self.dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
        if not (self.lr > 0 and self.warmup_init_lr >= 0):
            raise ValueError(f"train config lr={self.lr}, warmup_init_lr={self.warmup_init_lr}: expected lr > 0")
        if not 0 <= self.warmup_frac <= 1:
            raise ValueError(f"train config warmup_frac={self.warmup_frac}: expected a fraction in [0, 1]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train config betas={self.betas}: expected two values in [0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise ValueError("train config: weight_decay and grad_clip must be >= 0, eps > 0")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"train config batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}"
            )
        if not 0 <= self.val_ratio < 1:
            raise ValueError(f"train config val_ratio={self.val_ratio}: expected a fraction in [0, 1)")

    @property
    def schedule(self) -> Schedule:
        return Schedule.warmup_cosine(self.steps, self.lr, self.warmup_init_lr, self.warmup_frac)

    @property
    def warmup_steps(self) -> int:
        return self.schedule.warmup_steps




    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------------
# The recipe's pieces: optimizer (`optim`: schedule and AdamW; the initialisation is `model.build_model`'s)


def make_optimizer(config: TrainConfig) -> AdamW:
    return adamw(config.schedule, config.betas, config.eps, config.weight_decay)


def pretraining_attention(config: AIMConfig) -> str:
    """AIM pre-trains with the prefix-causal mask for bidirectional use downstream; a model meant to stay
    causal downstream is pre-trained with the plain causal mask (every target counts)."""
    return "prefix" if config.attention == "bidirectional" else "causal"


def step_prefix_len(seed: int, step: int, batch_size: int, num_patches: int, attention: str) -> np.ndarray:
    """Prefix lengths of the global batch of optimizer step `step` (1-based), int32 (batch_size,)."""
    if attention != "prefix":
        return np.ones(batch_size, np.int32)
    rng = np.random.default_rng([PREFIX_STREAM, seed, step])
    return rng.integers(1, num_patches, size=batch_size).astype(np.int32)


# ----------------------------------------------------------------------------------------------------
# The compiled step


def _loss_and_grad(model: nn.Module, compute_dtype: mx.Dtype, attention: str) -> Callable:
    """(images, prefix_len, num_targets, rows, row_weights) -> (loss, grads w.r.t. the float32 parameters); the
    pixel head runs on the counted rows only (`objective.counted_rows`)."""

    def loss_of(params, images, prefix_len, divisor, rows, row_weights):
        if compute_dtype != mx.float32:
            params = tree_map(lambda p: p.astype(compute_dtype), params)
        model.update(params)
        return aim_loss(model, images, prefix_len, divisor, attention, rows, row_weights)

    value_and_grad = mx.value_and_grad(loss_of)

    def run(images, prefix_len, divisor, rows, row_weights):
        params = model.trainable_parameters()
        loss, grads = value_and_grad(params, images, prefix_len, divisor, rows, row_weights)
        model.update(params)  # the float32 masters back in place of the compute-dtype copy
        return loss, grads

    return run


class TrainStep:
    """One optimizer step on this process's share of a global batch.

    `__call__(images, prefix_len, num_targets)` takes this process's images (batch_size / world_size of
    them), their prefix lengths and the global batch's count of targets; returns (loss, grad_norm) of the
    global batch. Gradients of `grad_accum` micro-batches are summed, averaged across processes, clipped
    and applied. The gradient and update functions are compiled with the model and optimizer state as
    implicit inputs (and outputs for the update). The pixel head runs on each micro-batch's counted rows
    only, listed on the host (`objective.counted_rows`) and padded to a few lengths: the gradient function
    compiles once per length (at most `objective.ROW_BUCKETS` per micro-batch size); processes may hold
    different lengths, since only the gradients are averaged.
    """

    def __init__(self, model: AIMForPretraining, optimizer: optim.Optimizer, config: TrainConfig,
                 group: Optional[mx.distributed.Group] = None):
        self.model, self.optimizer, self.config = model, optimizer, config
        self.group = group
        self.world_size = group.size() if group is not None else 1
        self.attention = attention = pretraining_attention(model.config)
        grad_fn = _loss_and_grad(model, parse_dtype(config.dtype), attention)
        self._grad = mx.compile(grad_fn, inputs=[model.state])
        state = [model.state, optimizer.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def update(grads, loss):
            if self.world_size > 1:
                grads = nn.average_gradients(grads, group=self.group)
                loss = mx.distributed.all_sum(loss, group=self.group) / self.world_size
            return loss, clip_and_update(optimizer, model, grads, config.grad_clip)

        self._update = update

    def __call__(self, images: np.ndarray, prefix_len: np.ndarray, num_targets: int) -> tuple[mx.array, mx.array]:
        loss, grads = self.gradients(images, prefix_len, num_targets)
        return self.apply(loss, grads)

    def gradients(self, images: np.ndarray, prefix_len: np.ndarray, num_targets: int) -> tuple[mx.array, dict]:
        """The first half of `__call__`: this process's loss and gradients, summed over the micro-batches, before
        averaging across processes and clipping (the parity test reads them between the two halves)."""
        accum = self.config.grad_accum
        micro = len(images) // accum
        p = self.model.config.patch_size
        num_patches = (images.shape[1] // p) * (images.shape[2] // p)
        # Each process divides by its share of the global count, so that the average over processes of
        # the per-process losses (and gradients) is the global batch's loss.
        divisor = mx.array(num_targets / self.world_size, dtype=mx.float32)
        loss, grads = None, None
        for m in range(accum):
            part = slice(m * micro, (m + 1) * micro)
            rows, row_weights = counted_rows(prefix_len[part], num_patches, self.attention)
            l, g = self._grad(mx.array(images[part]), mx.array(prefix_len[part]), divisor, mx.array(rows),
                              mx.array(row_weights))
            if grads is None:
                loss, grads = l, g
            else:
                loss, grads = loss + l, tree_map(mx.add, grads, g)
            if accum > 1:
                mx.eval(loss, grads)
        return loss, grads

    def apply(self, loss: mx.array, grads: dict) -> tuple[mx.array, mx.array]:
        """The second half of `__call__`: averages `gradients`' result across processes, clips it and updates the
        model and optimizer; returns the global batch's (loss, gradient norm before clipping)."""
        loss, norm = self._update(grads, loss)
        mx.eval(loss, norm, self.model.state, self.optimizer.state)
        return loss, norm


def _val_sum_fn(model: AIMForPretraining, attention: str) -> Callable:
    """(images, prefix_len, rows, row_weights) -> the loss summed over the counted targets (divided by 1), the pixel
    head run on the counted rows only (`objective.counted_rows`)."""

    def val_sum(images, prefix_len, rows, row_weights):
        return aim_loss(model, images, prefix_len, 1.0, attention, rows, row_weights)

    return mx.compile(val_sum, inputs=[model.state])


class Validator:
    """The held-out loss: a fixed seeded subset of the validation images, each with a fixed prefix length,
    token-weighted over the whole subset, so the number compares across steps and runs. Each process
    evaluates a disjoint slice; the sums are added across processes."""

    def __init__(self, model: AIMForPretraining, samples: Sequence, config: TrainConfig,
                 group: Optional[mx.distributed.Group] = None):
        c = model.config
        self.model, self.group = model, group
        rank, world = (group.rank(), group.size()) if group is not None else (0, 1)
        self.world_size = world
        self.attention = attention = pretraining_attention(c)
        rng = np.random.default_rng([VAL_PREFIX_STREAM, config.seed])
        chosen = np.sort(rng.permutation(len(samples))[: config.val_images]) if len(samples) else []
        if attention == "prefix":
            prefix = rng.integers(1, c.num_patches, size=len(chosen)).astype(np.int32)
        else:
            prefix = np.ones(len(chosen), np.int32)
        self.size = len(chosen)
        self.samples = [samples[i] for i in chosen][rank::world]
        self.prefix = prefix[rank::world]
        self.batch_size = max(1, config.batch_size // (world * config.grad_accum))
        self.transform = EvalTransform(c.image_size)
        self.num_workers, self.prefetch = config.num_workers, config.prefetch
        self._sum = _val_sum_fn(model, attention)
        self.num_patches = c.num_patches

    def __call__(self) -> Optional[float]:
        if self.size == 0:
            return None
        total, count = mx.array(0.0), mx.array(0.0)
        if self.samples:
            loader = BatchLoader(self.samples, self.batch_size, self.transform, seed=0, shuffle=False,
                                 drop_last=False, num_workers=self.num_workers, prefetch=self.prefetch)
            start = 0
            for images, _, _ in loader:
                prefix = self.prefix[start : start + len(images)]
                start += len(images)
                rows, row_weights = counted_rows(prefix, self.num_patches, self.attention)
                total = total + self._sum(mx.array(images), mx.array(prefix), mx.array(rows), mx.array(row_weights))
                count = count + float((self.num_patches - prefix).sum())
                mx.eval(total)
        if self.world_size > 1:
            total = mx.distributed.all_sum(total, group=self.group)
            count = mx.distributed.all_sum(count, group=self.group)
        return float(total / count)


# ----------------------------------------------------------------------------------------------------
# The run folder and its checkpoints (`runs.RunFolder`)


def pretraining_run(out_dir: Union[str, os.PathLike], keep_last: int = 1) -> RunFolder:
    """A pre-training run folder: numbered checkpoints `checkpoints/step_00001000/` with the model and its
    pixel head (model.safetensors), the optimizer state, config.json and state.json."""
    return RunFolder(out_dir, checkpoint_dir=CHECKPOINTS_DIR, weights_file=WEIGHTS_FILE, numbered=True,
                     keep_last=keep_last)


def load_pretraining_checkpoint(path: Union[str, os.PathLike]) -> tuple[AIMForPretraining, dict]:
    """(model with the pixel head, state dict) from a checkpoint folder or a run folder (its newest
    checkpoint). The model is float32, in eval mode."""
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(
            f"{path}: no pre-training checkpoint (expected a run folder with checkpoints/step_*/ or a "
            "checkpoint folder with state.json); note that an exported model/ folder has no pixel head"
        )
    config = AIMConfig.from_file(found / "config.json")
    model = build_model(config, pretraining=True)
    weights = read_safetensors(found / WEIGHTS_FILE)
    check_weights(model, weights, str(found / WEIGHTS_FILE))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model, RunFolder.read_state(found)


def checkpoint_trunk(path: Union[str, os.PathLike]) -> AIMEncoder:
    """The trunk of a pre-training checkpoint (or of a run folder's newest) as an eval-mode `AIMEncoder`, as
    `mlx_aim.load` gives for its exported trunk: a checkpoint to probe (it has no probe head)."""
    pretraining, _ = load_pretraining_checkpoint(path)
    model = build_model(pretraining.config)
    model.preprocessor, model.trunk = pretraining.preprocessor, pretraining.trunk
    mx.eval(model.parameters())
    model.eval()
    return model


def export_trunk(folder: Path, model: AIMForPretraining) -> Path:
    """The pre-trained trunk as an MLX model folder (`preprocessor.*`, `trunk.*`): `mlx_aim.load` reads it."""
    weights = {k: v for k, v in tree_flatten(model.parameters()) if k.startswith(("preprocessor.", "trunk."))}
    return save_model(folder, weights, model.config, force=True,
                      source_note="Pre-trained with mlx-aim (scripts/pretrain.py); a trunk without a probe head "
                                  "(train one: mlx-aim probe train).")


def run_settings(model_config: AIMConfig, train_config: TrainConfig) -> dict:
    """What decides a run's numbers: the model config (its name aside) and the recipe (`TrainConfig.recipe`)."""
    model = {k: v for k, v in model_config.to_dict().items() if k != "name"}
    return {**model, **train_config.recipe()}


def saved_settings(state: dict) -> dict:
    """`run_settings` of the run that wrote a checkpoint's state.json."""
    return run_settings(AIMConfig.from_dict(state["model_config"]), TrainConfig.from_dict(state["train_config"]))


def settings_differences(state: dict, model_config: AIMConfig, train_config: TrainConfig) -> str:
    """How a checkpoint's `state.json` settings differ from these ("key: checkpoint X, now Y; ..."), the
    model's name and the runtime fields (`TrainConfig.RUNTIME_FIELDS`) aside; empty when they match."""
    return "; ".join(compare_settings(saved_settings(state), run_settings(model_config, train_config)))


def finished_pretraining(pre_dir: Path, model_config: AIMConfig, train_config: TrainConfig) -> Optional[dict]:
    """The summary of a pre-training run in `pre_dir` that already reached its last step with these settings
    (so that a caller reuses it); None when there is none, or it is unfinished (`pretrain` resumes it)."""
    found = latest_checkpoint(pre_dir)
    if found is None or not (pre_dir / MODEL_DIR).is_dir():
        return None
    state = read_json(found / "state.json")
    if int(state.get("step", -1)) != train_config.steps:
        return None
    details = settings_differences(state, model_config, train_config)
    if details:
        raise ValueError(f"{pre_dir} holds a finished pre-training run with other settings ({details}); start it over "
                         "with --force, or choose another --out")
    summary_path = pre_dir / "summary.json"
    summary = read_json(summary_path) if summary_path.is_file() else {}
    return dict(summary, checkpoint=str(found))


def loss_records(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, training loss) and (step, validation loss) pairs from a pre-training run's log."""
    train, val = [], []
    for record in read_log(run_dir):
        if "loss" in record:
            train.append((int(record["step"]), float(record["loss"])))
        if "val_loss" in record:
            val.append((int(record["step"]), float(record["val_loss"])))
    return train, val


# ----------------------------------------------------------------------------------------------------
# The loop


def _resolve_data(data, val_ratio: float, seed: int) -> tuple[list, list]:
    if isinstance(data, (str, os.PathLike)):
        return load_splits(data, val_ratio, seed, labelled=False)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return tuple(list(part.samples) if hasattr(part, "samples") else list(part or []) for part in data)
    raise ValueError("data: expected an image folder path or a (train samples, val samples) pair")


def _parameter_counts(model: AIMForPretraining) -> str:
    num_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    trunk_params = sum(v.size for k, v in tree_flatten(model.parameters()) if not k.startswith("pixel_head."))
    return f"{trunk_params / 1e6:.2f}M trunk + {(num_params - trunk_params) / 1e6:.2f}M head parameters"


def _resume(run: RunFolder, found: Path, model: AIMForPretraining, optimizer: optim.Optimizer,
            loader: BatchLoader, settings: dict, world_size: int) -> dict:
    """Continues from checkpoint `found`: checks it was written by this run's settings and as many processes,
    restores the model, the optimizer and the data position; returns its state.json."""
    state = run.read_state(found)
    run.check_settings(found, saved_settings(state), settings)
    if state.get("world_size", 1) != world_size:
        raise ValueError(f"cannot resume from {found}: it was written by {state.get('world_size')} process(es), "
                         f"this run has {world_size}; the data order would not continue exactly")
    run.restore(found, model, optimizer)
    loader.load_state_dict(state["loader"])
    return state


def pretrain(
    model_config: AIMConfig,
    train_config: TrainConfig,
    data,
    out_dir: Union[str, os.PathLike],
    resume: bool = False,
    *,
    stop_at: Optional[int] = None,
    progress: bool = True,
    group: Optional[mx.distributed.Group] = None,
    echo: Optional[Callable[[str], None]] = None,
) -> dict:
    """Pre-trains an `AIMForPretraining` and exports its trunk to `out_dir/model`; returns a summary.

    `data` is an image folder (`data.load_splits(labelled=False)`: `train/` and `val/`, or any images under
    it, of which `val_ratio` is held out) or a (train, val) pair of sample lists or image folders. `resume`
    continues from the newest complete checkpoint in `out_dir` (or starts afresh when there is none).
    `stop_at` ends this invocation after that step with a checkpoint, leaving the schedule as for `steps`
    (to train in slices). `group` is the `mx.distributed` group (default: `mx.distributed.init()`, a single
    process unless started by `mlx.launch`).

    Raises `runs.TrainingDiverged` when the loss becomes NaN or infinite; the last good checkpoint is kept.
    """
    echo = echo or silent
    tc, mc = train_config, model_config
    group = group if group is not None else mx.distributed.init()
    rank, world = group.rank(), group.size()
    is_main = rank == 0
    if tc.batch_size % (world * tc.grad_accum):
        raise ValueError(f"batch_size={tc.batch_size} must be divisible by processes x grad_accum "
                         f"= {world} x {tc.grad_accum}")
    end_step = last_step(stop_at, tc.steps)
    out_dir = Path(out_dir)
    run = pretraining_run(out_dir, tc.keep_last)
    found = run.prepare(resume=resume, writer=is_main)

    # The run: data, model (the paper's initialisation drawn from the run's seed, the same on every
    # process), optimizer, then the checkpoint's state over them when resuming.
    train_samples, val_samples = _resolve_data(data, tc.val_ratio, tc.seed)
    local_batch = tc.batch_size // world
    transform = TrainTransform(mc.image_size, scale=tc.crop_scale, hflip=tc.hflip,
                               color_jitter=tc.color_jitter, jitter_prob=tc.jitter_prob)
    loader = BatchLoader(train_samples, local_batch, transform, seed=tc.seed, shuffle=True, drop_last=True,
                         num_workers=tc.num_workers, prefetch=tc.prefetch, rank=rank, world_size=world, loop=True)
    model = build_model(mc, seed=tc.seed, pretraining=True)
    mx.eval(model.parameters())
    optimizer = make_optimizer(tc)
    optimizer.init(model.trainable_parameters())
    start_step, elapsed_before = 0, 0.0
    if found is not None:
        state = _resume(run, found, model, optimizer, loader, run_settings(mc, tc), world)
        start_step, elapsed_before = int(state["step"]), float(state.get("elapsed_s", 0.0))
        if is_main:
            echo(f"resuming from {found} (step {start_step})")
    elif resume and is_main:
        echo(f"no checkpoint in {out_dir}: starting from step 0")
    check_same_start(start_step, group, out_dir)  # e.g. each host found the checkpoint
    if start_step >= tc.steps:
        raise ValueError(f"{found} is the end of the run (step {start_step} of {tc.steps}): nothing to resume; "
                         "use its model/ folder, or start a longer run in another folder")
    if is_main:
        write_json(out_dir / "config.json", mc.to_dict())
        write_json(out_dir / TRAIN_CONFIG_NAME, tc.to_dict())

    # The step, the validation, the log.
    train_step = TrainStep(model, optimizer, tc, group)
    validator = Validator(model, val_samples, tc, group)
    log = RunLog(out_dir, start_step if found is not None else None, enabled=is_main)
    attention = pretraining_attention(mc)
    if is_main:
        echo(f"pre-training {mc.name or 'AIM'}: {_parameter_counts(model)}, {len(train_samples)} training images, "
             f"{validator.size} validation images, global batch {tc.batch_size} ({world} process(es) x "
             f"{tc.grad_accum} micro-batch(es) of {local_batch // tc.grad_accum}), {tc.dtype}, "
             f"steps {start_step + 1}-{end_step} of {tc.steps}")

    last_checkpoint, val_loss = found, None
    losses: list[float] = []
    window, timed = LossWindow(), LossWindow()  # since the last record; all but this call's first (compiling) step
    run_start = time.perf_counter()

    def checkpoint(step: int) -> Path:
        state = {"loader": loader.state_dict(), "model_config": mc.to_dict(), "train_config": tc.to_dict(),
                 "world_size": world, "elapsed_s": elapsed_before + time.perf_counter() - run_start,
                 "loss": losses[-1] if losses else None, "val_loss": val_loss}
        path = run.save(step, model, optimizer, state, json_files={"config.json": mc.to_dict()})
        export_trunk(out_dir / MODEL_DIR, model)
        return path

    bar = tqdm(total=end_step, initial=start_step, desc="pre-training", unit="step", dynamic_ncols=True,
               disable=not (is_main and progress))
    batches = iter(loader)
    try:
        tick = time.perf_counter()
        for step in range(start_step + 1, end_step + 1):
            images, _, _ = next(batches)
            prefix_all = step_prefix_len(tc.seed, step, tc.batch_size, mc.num_patches, attention)
            count = int((mc.num_patches - prefix_all).sum())
            # Process r holds entries r, r + world, ... of the global batch (BatchLoader's sharding).
            loss, grad_norm = train_step(images, prefix_all[rank::world], count)
            loss = float(loss)
            now = time.perf_counter()
            seconds, tick = now - tick, now
            check_finite(loss, step, last_checkpoint, tc.lr)
            losses.append(loss)
            window.add(loss, tc.batch_size, seconds)
            if step > start_step + 1:
                timed.add(loss, tc.batch_size, seconds)
            lr = tc.schedule(step - 1)  # the rate this step's update used
            if step % tc.log_interval == 0 or step == end_step:
                log.write({"step": step, "loss": window.mean_loss, "lr": lr, "grad_norm": float(grad_norm),
                           "images_per_s": window.images_per_s, "elapsed_s": elapsed_before + now - run_start})
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{window.images_per_s:.1f}",
                                refresh=False)
                window = LossWindow()
            bar.update(1)
            last = step == end_step
            validating = bool(tc.val_interval and step % tc.val_interval == 0)
            if validating or (last and step == tc.steps):
                val_loss = validator()
                if val_loss is not None:
                    log.write({"step": step, "val_loss": val_loss})
                    if not bar.disable:
                        bar.write(f"step {step}: validation loss {val_loss:.4f}")
            if (tc.ckpt_interval and step % tc.ckpt_interval == 0) or last:
                if is_main:
                    last_checkpoint = checkpoint(step)
                tick = time.perf_counter()  # checkpoint and validation time do not count as training time
            elif validating:
                tick = time.perf_counter()
    finally:
        batches.close()  # stops the loader's prefetching threads
        bar.close()

    summary = {
        "preset": mc.name,
        "steps": end_step,
        "total_steps": tc.steps,
        "start_step": start_step,
        "global_batch": tc.batch_size,
        "processes": world,
        "dtype": tc.dtype,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "end_loss": float(np.mean(losses[-10:])) if losses else None,
        "val_loss": val_loss,
        "images_per_s": timed.images_per_s if timed.seconds > 0 else None,
        "wall_s": time.perf_counter() - run_start,
        "out_dir": str(out_dir),
        "checkpoint": str(last_checkpoint) if last_checkpoint else None,
        "model_dir": str(out_dir / MODEL_DIR),
    }
    if is_main:
        write_json(out_dir / "summary.json", summary)
    return summary
