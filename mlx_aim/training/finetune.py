"""Fine-tuning a trunk with an attentive probe (AIM section 5.5, Table 8): LoRA adapters and the head trained jointly
(`fine_tune_type="lora"`, the default), or every weight (`"full"`).

    import mlx_aim
    from mlx_aim.training.finetune import FinetuneConfig, finetune
    result = finetune("runs/tiny/model", "data/shapes", "runs/ft", FinetuneConfig(steps=200))
    model = mlx_aim.load("runs/tiny/model", adapters="runs/ft")   # the fine-tuned classifier

The base is loaded with `mlx_aim.load` (with `quantize`, 4 or 8 bits: QLoRA, the base quantized and frozen, the
adapters float), LoRA is put on its blocks (`models.lora.apply_lora`: rank 8, alpha 1, qkv and proj by default, as
apple/ml-l3m's `LoraAttention`), and a fresh attentive probe (`probe.new_head`, seeded) is composed onto it
(`with_probe`). Only the adapters and the head train; the probe's BatchNorm trains on batch statistics and updates
its running statistics, as in probing. Attention is bidirectional (the config's, as for probing).

Full fine-tuning (`"full"`) trains every parameter of a float base (cast to float32) with the recipes of BEiT and MAE
(`main_finetune.py`, `util/lr_decay.py`): layer-wise learning-rate decay (`layer_decay`, 0.75: the head at the peak
rate, each block below at 0.75 times the one above; `optim.layerwise_adamw`) and drop path rising linearly over the
blocks to `drop_path` (0.1; `layers.Block.drop_path`). A quantized base is refused there.

Memory and speed: `grad_checkpoint` (--grad-checkpoint) recomputes each block's activations in the backward pass
(`mx.checkpoint`, `layers.Trunk.grad_checkpoint`) instead of keeping them: each block's output is kept, its
intermediates only while it is recomputed, for about one more forward pass of time. The loss and gradients are those
of a run without it; with drop path or LoRA dropout, though, the masks come from a key drawn per block (so that the
recomputation draws the same ones), other draws than a run without it makes, so the flag is part of the recipe. `dtype`
"bfloat16" (--dtype bfloat16) computes in half precision with float32 master weights, as pre-training does: the frozen
base is cast to bfloat16 once (a quantized base's scales and biases too: QLoRA in bfloat16), the trainable parameters
stay float32 in the optimizer and the checkpoints and are cast for each step's forward and backward pass
(`make_step`); the head runs in float32 on the trunk's output cast up, so its BatchNorm, softmax and the loss stay in
float32. Validation runs the model as it stands (LoRA: the bfloat16 base with float32 adapters; full: the float32
masters). The saved adapters and full model are float32.

Several processes (data parallel, `mx.distributed`), as pre-training: every process builds the same model from the
same seed, takes its share of each global batch (`batch_size` is the global batch, a multiple of the process count;
`BatchLoader(rank, world_size)`), and the gradients are averaged over the processes before the update. The probe's
BatchNorm takes its batch statistics over all the shares (`GroupBatchNorm`), so the losses and weights equal one
process's on the same global batch (LoRA dropout and drop path aside: each process draws the masks of its share).
Every process validates (the same numbers); only rank 0 writes the log, checkpoints and outputs.

    mlx.launch -n 2 python scripts/finetune.py --model BASE --data DIR --out OUT
    mlx.launch --hostfile hosts.json --backend ring -- python scripts/finetune.py --model BASE --data DIR --out OUT

Several Macs need what pre-training needs (`training/pretrain.py`): the same environment, repository, base and data
paths on every host, and for `resume` the output folder readable by every host.

The output folder (LoRA):

    out/adapters.safetensors   the LoRA factors and the head (`checkpoints.adapters.save_adapters`)
    out/adapter_config.json    the adapters' settings, the base's identity, the classes, the preprocessing, the run's
                               recipe and its final metrics: `mlx_aim.load(base, adapters=out)` reads the two files,
                               `mlx-aim fuse` folds them into an ordinary model folder
    out/checkpoint/            the latest checkpoint: adapters + head (adapters.safetensors), optimizer state, step,
                               data position, losses
    out/log.jsonl              the training loss and learning rate every `log_interval` steps, validation top-1 and
                               top-5 at each evaluation

In full mode out/model/ (an ordinary model folder: the fine-tuned trunk with its head, and finetune.json) and
out/finetune.json take the adapter files' place, and the checkpoint holds the whole model (model.safetensors).

Decisions where the paper is silent:
- Step-based, on augmented batches (random resized crop + flip, as the probe's `augment`) drawn by a looping
  `BatchLoader` whose position is checkpointed; without `augment` the images are only preprocessed. The schedule
  (warm-up, cosine to 0) and AdamW (weight decay on matrices only) are the probe's and pre-training's (`optim`).
- The step is compiled (`mx.compile` with `[model.state, optimizer.state, mx.random.state]` as inputs and outputs);
  before each step the generator is seeded from (seed, step), so LoRA dropout draws the same masks in a resumed run.
- Fine-tuning needs validation images of every class: a folder with one class, or a class without validation
  images, is refused before anything is written.
- Unreadable images do not stop a run: a training one is replaced by a seeded draw (`BatchLoader`), a validation one
  is left out of the metrics. Each is counted and the first `SHOWN_SKIPPED` listed with the reason in the result's
  summary, in log.jsonl (a record whenever the count grows), in adapter_config.json / finetune.json and in the
  command's output; a resumed run carries the earlier slices' list in its checkpoint. With several processes the
  training images are those rank 0's share met.
- Native-resolution trunks (AIMv2 `*-native`, `image_size` None): a batch needs one image size, so a run trains and
  validates on square images of `image_size` (default `NATIVE_IMAGE_SIZE`, 224: 16 x 16 patches of 14 pixels, as
  the 224-pixel AIMv2 models), resized and center-cropped with the checkpoint's colour settings (`Preprocessing.
  at_size`; random resized crops of that size when augmenting); the position embedding is the trunk's sin-cos one
  for that grid. The model stays native: the adapted or fused model takes any size, as its base does, and
  classifies at native resolution unless the images are preprocessed as adapter_config.json records. `image_size`
  must be a multiple of the patch size within `max_patches`; a fixed-size trunk takes only its own size.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten
from tqdm import tqdm

from ..checkpoints.adapters import ADAPTER_WEIGHTS, base_identity, config_digest, save_adapters
from ..checkpoints.loading import load
from ..checkpoints.run_folders import MODEL_DIR
from ..checkpoints.weights import save_model
from ..data import (
    NUM_WORKERS, PREPROCESSOR_CONFIG, BatchLoader, ImageFolder, NoUsableImages, Preprocessing, Skipped, TrainTransform,
    is_native, preprocessing_for,
)
from ..models.config import check_int_fields
from ..models.lora import apply_lora, trainable_parameters
from ..models.model import Probed, parse_dtype, with_probe
from ..fileio import write_json
from .optim import Schedule, adamw, layerwise_adamw
from .pretrain import COMPUTE_DTYPES
from .probe import _check_augmentable, _samples_key, _splits, compute_features, evaluate, new_head
from .runs import LossWindow, RecipeConfig, RunFolder, RunLog, check_finite, check_same_start, last_step, silent

CHECKPOINT_DIR = "checkpoint"
FULL_WEIGHTS = "model.safetensors"
FINETUNE_INFO = "finetune.json"  # full mode: the run's description, beside out/model/
FINE_TUNE_TYPES = ("lora", "full")
SHOWN_SKIPPED = 10  # skipped images listed in the summary, the log and adapter_config.json (all are counted)
NATIVE_IMAGE_SIZE = 224  # a native-resolution trunk's training size when `image_size` is None
_SEED_STREAM = 1_000_003  # the step's generator seed is seed * _SEED_STREAM + step


@dataclass
class FinetuneConfig(RecipeConfig):
    """The fine-tuning recipe and the run's bookkeeping (`RUNTIME_FIELDS` change only what is written and how
    fast; the other fields decide the numbers, and a resumed run must keep them)."""

    fine_tune_type: str = "lora"
    rank: int = 8
    alpha: float = 1.0
    dropout: float = 0.0
    lora_keys: tuple[str, ...] = ("qkv", "proj")
    num_layers: Optional[int] = None  # the last N blocks; None: all
    layer_decay: float = 0.75  # full only: layer-wise learning-rate decay (BEiT, MAE: 0.75 for large models)
    drop_path: float = 0.1  # full only: the deepest block's drop-path rate, rising linearly from 0 at the first
    head: str = "probe"
    epochs: int = 10
    steps: int = 0  # optimizer steps; 0: epochs x batches per epoch
    batch_size: int = 64
    lr: float = 1e-3  # peak
    warmup_init_lr: float = 1e-6
    warmup_frac: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    augment: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    seed: int = 0
    val_ratio: float = 0.2  # of the data held out when it has no val/ folder
    # Recompute each block's activations in the backward pass (`layers.Trunk.grad_checkpoint`): less memory, about
    # one more forward pass of time. A recipe field: with drop path or LoRA dropout it draws other (equally
    # distributed) masks than a run without it.
    grad_checkpoint: bool = False
    dtype: str = "float32"  # compute dtype of the trunk: "float32" or "bfloat16" (trained weights stay float32)
    image_size: Optional[int] = None  # native-resolution trunks: the side of the square training images (None: 224)

    eval_interval: int = 0  # steps between evaluations; 0: at the end only
    eval_batch_size: int = 64
    ckpt_interval: int = 0  # steps between checkpoints; 0: at the end only
    log_interval: int = 20
    num_workers: int = NUM_WORKERS
    compile: bool = True

    RUNTIME_FIELDS = ("eval_interval", "eval_batch_size", "ckpt_interval", "log_interval", "num_workers", "compile")
    WHAT = "fine-tune config"

    def __post_init__(self):
        if isinstance(self.lora_keys, str):
            self.lora_keys = tuple(k for k in self.lora_keys.split(",") if k)
        self.lora_keys = tuple(self.lora_keys)
        self.betas = tuple(float(b) for b in self.betas)
        self.crop_scale = tuple(float(s) for s in self.crop_scale)
        where = "fine-tune config"
        check_int_fields(self, ("epochs", "steps", "ckpt_interval", "eval_interval", "num_workers", "seed"), 0, where)
        check_int_fields(self, ("rank", "batch_size", "eval_batch_size", "log_interval"), 1, where)
        for name in ("num_layers", "image_size"):
            if getattr(self, name) is not None:
                check_int_fields(self, (name,), 1, where)
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            raise ValueError(f"{where} fine_tune_type={self.fine_tune_type!r}: expected 'lora' or 'full'")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"{where} layer_decay={self.layer_decay}: expected 0 < layer_decay <= 1")
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"{where} drop_path={self.drop_path}: expected 0 <= drop_path < 1")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"{where} dtype={self.dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
        if self.head != "probe":
            raise ValueError(f"{where} head={self.head!r}: only 'probe' (the attentive probe) is supported")
        if self.steps == 0 and self.epochs == 0:
            raise ValueError(f"{where}: epochs=0 and steps=0; expected a number of epochs or of steps")
        if not self.lr > 0 or self.warmup_init_lr < 0 or self.weight_decay < 0 or self.eps <= 0:
            raise ValueError(f"{where}: expected lr > 0, warmup_init_lr >= 0, weight_decay >= 0, eps > 0")
        if not 0 <= self.warmup_frac <= 1:
            raise ValueError(f"{where} warmup_frac={self.warmup_frac}: expected a fraction in [0, 1]")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"{where} label_smoothing={self.label_smoothing}: expected a value in [0, 1)")
        if not 0 <= self.val_ratio < 1:
            raise ValueError(f"{where} val_ratio={self.val_ratio}: expected a fraction in [0, 1)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"{where} dropout={self.dropout}: expected 0 <= dropout < 1")





@dataclass
class FinetuneResult:
    model: Probed  # the adapted trunk with its trained head, in eval mode
    classes: list[str]
    metrics: dict  # {"val": ...} of the last evaluation
    evaluations: list[dict]  # {"step", "top1", "top5", "loss"} of each evaluation in this call
    losses: list[float]  # the training loss of every step run in this call, in order
    steps: int  # the step reached
    total_steps: int
    trainable: int  # parameters trained (adapters + head)
    total: int  # parameters of the adapted model
    seconds: float
    out: Optional[Path] = None
    adapter_config: dict = field(default_factory=dict)
    processes: int = 1  # data-parallel processes (mlx.launch)
    skipped: Skipped = field(default_factory=Skipped)  # unreadable images met by the run (resumed slices included)

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "total_steps": self.total_steps,
            "classes": self.classes,
            "trainable_parameters": self.trainable,
            "total_parameters": self.total,
            "trainable_fraction": self.trainable / self.total if self.total else None,
            "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None,
            "evaluations": self.evaluations,
            "val": self.metrics.get("val"),
            "seconds": round(self.seconds, 3),
            "processes": self.processes,
            **skipped_record(self.skipped),
            "out": str(self.out) if self.out else None,
        }


class TrainedPart(nn.Module):
    """What a fine-tuning checkpoint holds of `model`: its LoRA factors and its head (running statistics included),
    under their model paths; `trainable_parameters` (what the optimizer state is shaped by) are the model's own.
    Lets `RunFolder.save`/`restore` checkpoint a few megabytes instead of the whole base."""

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "_adapted", model)  # not a child: the trunk stays out of this module's tree

    @staticmethod
    def kept(key: str) -> bool:
        return key.startswith("head.") or key.endswith((".lora_a", ".lora_b"))

    def parameters(self):
        return tree_unflatten([(k, v) for k, v in tree_flatten(self._adapted.parameters()) if self.kept(k)])

    def trainable_parameters(self):
        return self._adapted.trainable_parameters()

    def load_weights(self, file_or_weights, strict: bool = True):
        weights = list(file_or_weights)
        if strict:
            expected = {k for k, _ in tree_flatten(self.parameters())}
            found = {k for k, _ in weights}
            if found != expected:
                raise ValueError(f"checkpoint weights differ from the adapters and head: missing "
                                 f"{sorted(expected - found)[:4]}, unexpected {sorted(found - expected)[:4]}")
        self._adapted.load_weights(weights, strict=False)
        return self


def skipped_record(skipped: Skipped) -> dict:
    """How a run reports the images it could not read: their count and the first `SHOWN_SKIPPED` (path, reason)."""
    return {"num_skipped": len(skipped), "skipped": skipped.to_list()[:SHOWN_SKIPPED]}


def _add_new(skipped: Skipped, items) -> bool:
    """Adds the (path, reason) pairs of `items` not yet in `skipped` (without warning again); whether any was new."""
    known = {path for path, _ in skipped.items}
    new = [(str(path), reason) for path, reason in items if str(path) not in known]
    for path, reason in dict(new).items():
        skipped.add(path, reason, warn=False)
    return bool(new)


def parameter_count(model: nn.Module) -> int:
    """How many parameters `model` has, a quantized layer's weight counted as the float matrix it stands for (its
    packed words times 32 / bits; its scales and biases left out), so that a QLoRA run's trainable fraction reads as
    a float run's."""
    quantized = {path: m for path, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    total = 0
    for key, value in tree_flatten(model.parameters()):
        owner, _, name = key.rpartition(".")
        layer = quantized.get(owner)
        if layer is None or name == "bias":
            total += value.size
        elif name == "weight":
            total += value.size * 32 // layer.bits
    return total


def finetune_run(out: Union[str, os.PathLike], full: bool = False) -> RunFolder:
    """A fine-tuning output folder: one checkpoint, `checkpoint/`, replaced at each save (LoRA: the adapters and head
    in adapters.safetensors; full: the whole model in model.safetensors)."""
    return RunFolder(out, checkpoint_dir=CHECKPOINT_DIR, weights_file=FULL_WEIGHTS if full else ADAPTER_WEIGHTS,
                     numbered=False, can_force=True)


def adapted_model(trunk: nn.Module, num_classes: int, config: FinetuneConfig) -> Probed:
    """`trunk` (a loaded base, changed in place) with LoRA (`config`'s rank, alpha, dropout, keys and layers; the rest
    frozen) and a fresh probe of `num_classes`, both drawn from `config.seed` (trainable but for its BatchNorm's running
    statistics). At step 0 it gives what the base with that fresh head gives: each adapter's B is zero."""
    trunk.set_dtype(parse_dtype(config.dtype))  # the frozen base in the compute dtype, once; the adapters float32
    mx.random.seed(config.seed)  # the adapters' A factors, so that a run is a function of its settings
    apply_lora(trunk, config.rank, config.alpha, config.dropout, config.lora_keys, config.num_layers)
    return with_probe(trunk, new_head(trunk, num_classes, config.seed))


def full_model(trunk: nn.Module, num_classes: int, config: FinetuneConfig) -> Probed:
    """`trunk` (a loaded float base, changed in place: cast to float32, the master weights) with a fresh probe of
    `num_classes` drawn from `config.seed`, every parameter trainable but the BatchNorm's running statistics, and
    drop path rising linearly over the blocks from 0 to `config.drop_path` (timm's and MAE's `dpr`)."""
    if trunk.config.quantization:
        raise ValueError("full fine-tuning needs a float base, not a quantized one: fine-tune it with LoRA (QLoRA), "
                         "or load it in float")
    trunk.set_dtype(mx.float32)
    model = with_probe(trunk, new_head(trunk, num_classes, config.seed))
    model.unfreeze()
    for module in model.head.modules():
        if isinstance(module, nn.BatchNorm):
            module.freeze(keys=["running_mean", "running_var"], recurse=False)
    blocks = model.trunk.blocks
    for i, block in enumerate(blocks):
        block.drop_path = config.drop_path * i / max(len(blocks) - 1, 1)
    return model


def _group_sum(group: mx.distributed.Group) -> Callable[[mx.array], mx.array]:
    """`all_sum` over `group` whose backward pass sums the cotangents over the group too (MLX's passes each
    process's own through): the gradient of the sum of every process's loss, as synchronised statistics need."""

    @mx.custom_function
    def total(x):
        return mx.distributed.all_sum(x, group=group)

    @total.vjp
    def total_vjp(primals, cotangent, output):
        return mx.distributed.all_sum(cotangent, group=group)

    return total


class GroupBatchNorm(nn.BatchNorm):
    """The probe's BatchNorm with its training statistics over the whole data-parallel batch (all processes' shares,
    as PyTorch's SyncBatchNorm), so that several processes train what one process on the global batch trains; its
    running statistics, the same on every process, are what it evaluates with."""

    def __init__(self, bn: nn.BatchNorm, group: mx.distributed.Group):
        super().__init__(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine="weight" in bn,
                         track_running_stats=bn.track_running_stats)
        self.update(bn.parameters())
        self.train(bn.training)
        self._total, self._processes = _group_sum(group), group.size()

    def _calc_stats(self, x: mx.array, ddof: int = 0) -> tuple[mx.array, mx.array]:
        if not self.training:  # evaluation uses the running statistics: no collective needed
            return super()._calc_stats(x, ddof)
        axes = tuple(range(x.ndim - 1))
        count = x.size // x.shape[-1] * self._processes  # every process holds as many rows
        mean = self._total(x.sum(axis=axes)) / count
        var = self._total(mx.square(x - mean).sum(axis=axes)) / (count - ddof)
        return mean, var


def finetune_model(trunk: nn.Module, num_classes: int, config: FinetuneConfig) -> Probed:
    """The model a run trains: `full_model` or `adapted_model` as `config.fine_tune_type` says, its trunk recomputing
    block activations in the backward pass if `config.grad_checkpoint`."""
    build = full_model if config.fine_tune_type == "full" else adapted_model
    model = build(trunk, num_classes, config)
    model.trunk.grad_checkpoint = config.grad_checkpoint
    return model


def _check_splits(train_part: ImageFolder, val_part: Optional[ImageFolder]) -> list[str]:
    classes = list(train_part.classes)
    if len(classes) < 2:
        raise ValueError(f"fine-tuning data has {len(classes)} class(es) ({classes}): expected at least 2")
    counts = Counter(label for _, label in (val_part.samples if val_part is not None else []))
    missing = [name for i, name in enumerate(classes) if not counts[i]]
    if missing:
        raise ValueError(f"fine-tuning data: no validation images of {len(missing)} class(es) ({missing[:8]}); add "
                         "a val/ folder with every class, or raise val_ratio (--val-ratio)")
    return classes


def run_preprocessing(trunk: nn.Module, config: FinetuneConfig) -> Preprocessing:
    """How the run's images become trunk input: the checkpoint's preprocessing (`preprocessing_for`), which for a
    native-resolution trunk is taken to square images of `config.image_size` (module docstring)."""
    c = trunk.config
    preprocessing = preprocessing_for(c, getattr(getattr(trunk, "source", None), "folder", None))
    if not is_native(c):
        if config.image_size not in (None, c.image_size):
            raise ValueError(f"fine-tune config image_size={config.image_size}: {c.name or 'this trunk'} takes "
                             f"{c.image_size}x{c.image_size} images only (image_size is for native-resolution trunks)")
        return preprocessing
    size = config.image_size or NATIVE_IMAGE_SIZE
    patches = (size // c.patch_size) ** 2
    if size % c.patch_size or patches > c.max_patches:
        raise ValueError(f"fine-tune config image_size={size}: a native-resolution trunk trains on a multiple of its "
                         f"patch size {c.patch_size} of at most max_patches={c.max_patches} patches ({patches})")
    return preprocessing.at_size(size)


def _train_transform(preprocessing: Preprocessing, config: FinetuneConfig):
    if not config.augment:
        return preprocessing
    _check_augmentable(preprocessing)
    normalize = preprocessing.mean is not None
    return TrainTransform(preprocessing.crop_size[0], scale=config.crop_scale, hflip=config.hflip,
                          color_jitter=(0, 0, 0, 0), jitter_prob=0.0, normalize=normalize,
                          **({"mean": preprocessing.mean, "std": preprocessing.std} if normalize else {}))


def compute_copy(params: dict, dtype: mx.Dtype) -> dict:
    """The trainable parameters as the forward pass uses them: the trunk's (adapters, or every weight in full mode)
    in the compute `dtype`, the head's float32."""
    if dtype == mx.float32:
        return params
    return tree_map_with_path(lambda path, p: p if path.startswith("head.") else p.astype(dtype), params)


def make_step(model: Probed, optimizer, label_smoothing: float, compile: bool = True,
              dtype: mx.Dtype = mx.float32, group: Optional[mx.distributed.Group] = None) -> Callable:
    """One optimizer step of the adapters and head on a batch (images, labels) -> loss. Compiled with
    `[model.state, optimizer.state, mx.random.state]` as inputs and outputs (the probe's BatchNorm running
    statistics are part of model.state; LoRA dropout draws from the generator).

    Mixed precision, as pre-training does it: the trainable parameters stay float32 (the masters the optimizer
    updates and the checkpoints hold); the loss runs the trunk on a `dtype` copy of them (`compute_copy`), so the
    gradients flow back to the masters in float32. The probe's input is cast to float32, so its BatchNorm statistics,
    attention softmax and the cross-entropy are float32 whatever the trunk's dtype.

    With a `group` of several processes (data parallel), each process's batch is its share of the global batch;
    the gradients are averaged over the group and the loss returned is the global batch's."""
    world = group.size() if group is not None else 1

    def loss_fn(params, images, labels):
        model.update(compute_copy(params, dtype))
        logits, _ = model.head(model.probe_features(images).astype(mx.float32))
        return nn.losses.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="mean")

    loss_and_grad = mx.value_and_grad(loss_fn)

    def step(images, labels):
        params = model.trainable_parameters()
        loss, grads = loss_and_grad(params, images, labels)
        model.update(params)  # the float32 masters back in place of the compute copy
        if world > 1:
            grads = nn.average_gradients(grads, group=group)
            loss = mx.distributed.all_sum(loss, group=group) / world
        optimizer.update(model, grads)
        return loss

    if not compile:
        return step
    state = [model.state, optimizer.state, mx.random.state]
    return mx.compile(step, inputs=state, outputs=state)


def make_optimizer(model: Probed, config: FinetuneConfig, schedule: Schedule):
    """AdamW over what trains in `model`, initialised: in full mode with layer-wise learning-rate decay."""
    if config.fine_tune_type == "full":
        optimizer = layerwise_adamw(schedule, model.config.depth, config.layer_decay, config.betas, config.eps,
                                    config.weight_decay)
    else:
        optimizer = adamw(schedule, config.betas, config.eps, config.weight_decay)
    optimizer.init(model.trainable_parameters())
    return optimizer


def validate(model: Probed, val_part: ImageFolder, classes: list[str], preprocessing: Preprocessing,
             config: FinetuneConfig) -> tuple[dict, Skipped]:
    """`probe.evaluate`'s metrics (top-1, top-5, loss, per class) of the adapted model on the validation images, and
    the images it could not read (left out of the metrics)."""
    was_training = model.training
    model.eval()
    features = compute_features(model, val_part.samples, batch_size=config.eval_batch_size, dtype="float32",
                                num_workers=config.num_workers, progress=False, desc="val",
                                preprocessing=preprocessing)
    metrics = evaluate(model.head, features, classes, config.eval_batch_size)
    model.train(was_training)
    return metrics, features.skipped


def _write_full_model(out: Path, model: Probed, info: dict, preprocessing: Preprocessing) -> None:
    """Full mode's outputs: out/model/, the fine-tuned trunk with its head as an ordinary model folder (with the run's
    finetune.json and, where that format can hold the preprocessing, its preprocessor_config.json), and
    out/finetune.json."""
    note = (f"A trunk ({info.get('base')}) fine-tuned in full with an attentive probe by mlx-aim (mlx-aim finetune) on "
            f"{len(info['classes'])} classes.")
    folder = save_model(out / MODEL_DIR, dict(tree_flatten(model.parameters())), model.config, force=True,
                        source_note=note)
    write_json(folder / FINETUNE_INFO, info, indent=1, default=str)
    if preprocessing.crop_rounding == "floor":  # so that classifying with the folder preprocesses alike
        write_json(folder / PREPROCESSOR_CONFIG, preprocessing.processor_dict())
    write_json(out / FINETUNE_INFO, info, indent=1, default=str)


def finetune(
    base,
    data,
    out: Optional[Union[str, os.PathLike]] = None,
    config: Optional[FinetuneConfig] = None,
    *,
    quantize=None,
    resume: bool = False,
    force: bool = False,
    stop_at: Optional[int] = None,
    progress: bool = True,
    echo: Optional[Callable[[str], None]] = None,
    group: Optional[mx.distributed.Group] = None,
) -> FinetuneResult:
    """Fine-tunes `base` with LoRA (or, with `config.fine_tune_type` 'full', every weight) and a fresh attentive
    probe on an image folder; returns the result (its `model` the fine-tuned classifier). `base`: any source
    `mlx_aim.load` accepts, loaded with `quantize` (4 or 8 bits or a quantization dict: QLoRA) if given, or a loaded
    trunk, which is changed in place.

    `data`: a folder with class sub-folders (split by `config.val_ratio`), with `train/` and `val/` folders of them,
    or a (train, val) pair of `ImageFolder`s. `out` (optional): where the adapters, checkpoints and log go (see the
    module docstring). `resume` continues from out/checkpoint; `force` discards one. `stop_at` ends this call after
    that step with a checkpoint, the schedule left as for the full run. `echo` receives one line per evaluation.
    `group`: the `mx.distributed` group (default `mx.distributed.init()`: one process unless started by
    `mlx.launch`); with several processes each trains on its share of every batch and only rank 0 writes and echoes.

    Refuses before writing anything: one class, a class without validation images, a rank above a layer's width,
    an `image_size` the trunk cannot take, a batch that the processes cannot share. Raises `runs.TrainingDiverged`
    when the loss becomes NaN or infinite.
    """
    config = config or FinetuneConfig()
    start_time = time.perf_counter()
    group = group if group is not None else mx.distributed.init()
    rank, world = group.rank(), group.size()
    is_main = rank == 0
    echo = (echo or silent) if is_main else silent
    source = None if isinstance(base, nn.Module) else str(base)
    trunk = base if isinstance(base, nn.Module) else load(base, quantize=quantize)
    preprocessing = run_preprocessing(trunk, config)
    train_part, val_part = _splits(data, config.val_ratio, config.seed)
    classes = _check_splits(train_part, val_part)
    identity = base_identity(trunk.config)
    full = config.fine_tune_type == "full"
    model = finetune_model(trunk, len(classes), config)
    if world > 1:
        model.head.bn = GroupBatchNorm(model.head.bn, group)
    transform = _train_transform(preprocessing, config)
    num_train = len(train_part)
    if num_train < 2:
        raise NoUsableImages(f"fine-tuning data: {num_train} training image(s); expected at least 2")
    trained = trainable_parameters(model)
    total = parameter_count(model)

    batch_size = min(config.batch_size, num_train)
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {world} processes: each takes an equal "
                         "share of every batch")
    total_steps = config.steps or config.epochs * (num_train // batch_size)
    end_step = last_step(stop_at, total_steps)
    schedule = Schedule.warmup_cosine(total_steps, config.lr, config.warmup_init_lr, config.warmup_frac)
    optimizer = make_optimizer(model, config, schedule)
    # Process r takes entries r, r + world, ... of each global batch (BatchLoader's sharding).
    loader = BatchLoader(train_part, batch_size // world, transform, seed=config.seed, shuffle=True, drop_last=True,
                         num_workers=config.num_workers, loop=True, rank=rank, world_size=world)
    settings = {"recipe": config.recipe(), "base_digest": config_digest(identity), "quantization":
                trunk.config.quantization, "total_steps": total_steps,
                "data": {"classes": classes, "num_train": num_train, "train_sha256": _samples_key(train_part.samples)}}

    run = finetune_run(out, full) if out is not None else None  # after every refusal: nothing written before
    found = None
    if run is not None and (is_main or not force):  # rank 0 discards a checkpoint with `force`
        found = run.prepare(resume=resume, force=force, writer=is_main)
    part = model if full else TrainedPart(model)
    start_step, losses_before = 0, []
    skipped = Skipped()  # unreadable images: training ones are replaced by seeded draws, validation ones left out
    if found is not None:
        state = run.read_state(found)
        run.check_settings(found, {k: state.get(k) for k in settings}, settings)
        run.restore(found, part, optimizer)
        start_step, losses_before = int(state["step"]), list(state["losses"])
        loader.load_state_dict(state["loader"])
        _add_new(skipped, [(item["path"], item["reason"]) for item in state.get("skipped", [])])
        echo(f"resuming from {found} at step {start_step} of {total_steps}")
    check_same_start(start_step, group, out)

    model.train()
    step_fn = make_step(model, optimizer, config.label_smoothing, config.compile, parse_dtype(config.dtype), group)
    log = RunLog(run.path, start_step if found is not None else None, enabled=is_main) if run is not None else None
    losses: list[float] = []
    evaluations: list[dict] = []
    metrics: dict = {}
    last_checkpoint = found
    window = LossWindow()
    batches = iter(loader)
    with contextlib.closing(batches), tqdm(total=end_step, initial=start_step, desc="fine-tune", unit="step",
                                           disable=not (progress and is_main) or None, dynamic_ncols=True) as bar:
        for step in range(start_step + 1, end_step + 1):
            images, labels, _ = next(batches)
            mx.random.seed(config.seed * _SEED_STREAM + step)
            loss = step_fn(mx.array(images), mx.array(labels))
            mx.eval(loss, model.state, optimizer.state)
            loss = float(loss)
            check_finite(loss, step, last_checkpoint, config.lr)
            losses.append(loss)
            window.add(loss)
            if step % config.log_interval == 0 or step == end_step:
                lr = schedule(step - 1)
                if log is not None:
                    log.write({"step": step, "loss": window.mean_loss, "lr": lr})
                bar.set_postfix(loss=f"{window.mean_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                window = LossWindow()
            new_skips = _add_new(skipped, loader.skipped)
            if (config.eval_interval and step % config.eval_interval == 0) or step == total_steps:
                val_metrics, val_skipped = validate(model, val_part, classes, preprocessing, config)
                metrics = {"val": val_metrics}
                new_skips = _add_new(skipped, val_skipped.items) or new_skips
                record = {"step": step, "top1": metrics["val"]["top1"], "top5": metrics["val"]["top5"],
                          "top5_k": metrics["val"]["top5_k"], "loss": metrics["val"]["loss"]}
                evaluations.append(record)
                if log is not None:
                    log.write({"step": step, "val_top1": record["top1"], "val_top5": record["top5"],
                               "val_loss": record["loss"]})
                echo(f"step {step}: val top-1 {100 * record['top1']:.2f}%, top-{record['top5_k']} "
                     f"{100 * record['top5']:.2f}%, loss {record['loss']:.4f}")
            if new_skips:
                if log is not None:
                    log.write({"step": step, **skipped_record(skipped)})
                echo(f"step {step}: {len(skipped)} unreadable image(s) skipped so far")
            bar.update(1)
            if is_main and run is not None and ((config.ckpt_interval and step % config.ckpt_interval == 0)
                                                or step == end_step):
                state = dict(settings, losses=losses_before + losses, loader=loader.state_dict(),
                             skipped=skipped.to_list())
                last_checkpoint = run.save(step, part, optimizer, state)

    model.eval()
    adapter_config = {
        "fine_tune_type": config.fine_tune_type,
        "base": source,
        "classes": classes,
        "preprocessing": preprocessing.to_dict(),
        "recipe": config.recipe(),
        "steps": end_step,
        "total_steps": total_steps,
        "batch_size": batch_size,
        "num_train": num_train,
        "num_val": len(val_part),
        "metrics": metrics,
        **skipped_record(skipped),
    }
    if is_main and run is not None and end_step == total_steps:
        if full:
            _write_full_model(run.path, model, adapter_config, preprocessing)
        else:
            save_adapters(run.path, model, adapter_config)
    return FinetuneResult(model, classes, metrics, evaluations, losses, end_step, total_steps, trained, total,
                          time.perf_counter() - start_time, run.path if run is not None else None, adapter_config,
                          world, skipped)
