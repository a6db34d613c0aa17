"""Attentive probing of a frozen trunk (AIM section 4): train and evaluate the probe head on an image folder.

    import mlx_aim
    from mlx_aim.training.probe import ProbeConfig, train_probe
    trunk = mlx_aim.load("runs/tiny/model")                 # any source `mlx_aim.load` accepts
    result = train_probe(trunk, "data/shapes", "runs/probe", ProbeConfig(epochs=10))
    print(result.metrics["val"]["top1"])
    model = mlx_aim.with_probe(trunk, result.head)         # trunk + trained head: model(images) gives logits
    model = mlx_aim.load("runs/probe/model")               # the same, from the folder the run writes

The probe reads the mean of the chosen blocks' raw outputs, normalises it with BatchNorm (no affine),
pools it with one learned query (multi-head attention) and classifies the pooled vector with a bias-free
linear layer (`layers.AttentionProbe`). The trunk is frozen and in eval mode throughout; the probe's
BatchNorm trains on batch statistics (updating its running statistics with MLX's momentum 0.1) and is
evaluated on its running statistics.

The output folder:

    out/head.safetensors   the trained head with Apple's keys (head.k.weight, head.v.weight, head.cls_token,
                           head.linear.weight, head.bn.running_mean, head.bn.running_var)
    out/probe.json         classes, probe layers, the trunk it was trained on, the settings, metrics
    out/model/             trunk + trained head (config num_classes = len(classes)), with probe.json (and
                           for AIMv2, the preprocessing as preprocessor_config.json), a folder
                           `mlx_aim.load` and the scripts read directly
    out/checkpoint/        the latest checkpoint: head, optimizer state, step, data position
    out/log.jsonl          the training loss and learning rate every `log_interval` steps
    out/cache/             cached trunk features (train.npy, val.npy and their .json), when not augmenting

Decisions where the paper is silent:
- Without augmentation the trunk runs once over the data and its probe features are cached (float16 by
  default, refused if a value does not fit); with `augment` the trunk runs on every augmented batch
  (random resized crop + horizontal flip, no colour jitter) and only the validation features are cached.
- Step-based: `steps` (or `epochs` x batches per epoch) optimizer steps on batches drawn without
  replacement from a per-epoch permutation seeded by (seed, epoch), the last incomplete batch dropped.
  The data order is a function of (seed, step), so resuming needs only the step (and, with augmentation,
  the loader position, which is checkpointed).
- Images are preprocessed as the trunk's checkpoint says (`data.preprocessing_for`). A native-resolution trunk
  keeps each image's own patch grid: its features are computed in batches of one grid; over images of several
  grids they are ragged (`shards.RaggedTokens`), and training batches then hold one grid each
  (`epoch_batches`); augmentation needs a fixed size and is refused there.
- The schedule (`optim.Schedule`: linear warm-up, cosine to 0) and the optimizer (`optim.adamw`, weight
  decay on matrices only) are the pre-training ones; so are the checkpoints, resume rules and divergence
  check (`runs`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from ..models.config import check_int_fields
from ..data import (
    NUM_WORKERS, PREPROCESSOR_CONFIG, BatchLoader, ImageFolder, NoUsableImages, Preprocessing, Skipped,
    TrainTransform, is_native, load_splits, preprocessing_for,
)
from ..fileio import atomic_file, read_json, remove_stale_temporaries, write_json
from ..tasks.encode import EncodedBatch, EncodeRun, probe_outputs
from ..tasks.shards import RaggedTokens
from ..models.layers import AttentionProbe
from ..models.model import (
    AIM, Probed, TrunkModel, UntrainedHeadError, build_probe, dtype_name, untrained_head_message, with_probe,
)
from ..models.model import probe_eps as family_probe_eps
from .optim import Schedule, adamw
from .runs import LossWindow, RecipeConfig, RunFolder, RunLog, check_finite, last_step, silent
from ..checkpoints.run_folders import MODEL_DIR, PROBE_CHECKPOINT_DIR, PROBE_INFO
from ..checkpoints.weights import read_safetensors, save_model

PROBE_FORMAT = "mlx-aim-probe"
HEAD_FILE = "head.safetensors"
HEAD_PREFIX = "head."  # Apple's head keys: head.k.weight, ...
CACHE_DIR = "cache"
HEAD_KEYS = ("k.weight", "v.weight", "cls_token", "linear.weight", "bn.running_mean", "bn.running_var")
_CACHE_DTYPES = {"float16": np.float16, "float32": np.float32}
_BATCH_ORDER_STREAM = 1  # third word of the seed that orders an epoch's batches of ragged features
_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass
class ProbeConfig(RecipeConfig):
    """The probe's optimisation recipe and the run's bookkeeping.

    The first group decides the numbers a run produces (a resumed run must keep them); the second
    (`RUNTIME_FIELDS`) changes only what is written and how fast.
    """

    epochs: int = 20
    steps: int = 0  # optimizer steps; 0: epochs x batches per epoch
    batch_size: int = 128
    lr: float = 1e-3  # peak
    warmup_init_lr: float = 1e-6
    warmup_frac: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    augment: bool = False
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    seed: int = 0
    val_ratio: float = 0.2  # of the data held out when it has no val/ folder
    cache_dtype: str = "float16"

    eval_batch_size: int = 128
    ckpt_interval: int = 0  # steps between checkpoints; 0: at the end only
    log_interval: int = 20
    num_workers: int = NUM_WORKERS
    cache: str = "disk"  # "disk": out/cache/ (reused on resume); "memory"

    RUNTIME_FIELDS = ("eval_batch_size", "ckpt_interval", "log_interval", "num_workers", "cache")
    WHAT = "probe config"

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        self.crop_scale = tuple(float(s) for s in self.crop_scale)
        check_int_fields(self, ("epochs", "steps", "ckpt_interval", "num_workers", "seed"), 0, "probe config")
        check_int_fields(self, ("batch_size", "eval_batch_size", "log_interval"), 1, "probe config")
        if self.steps == 0 and self.epochs == 0:
            raise ValueError("probe config: epochs=0 and steps=0; expected a number of epochs or of steps")
        if not self.lr > 0 or self.warmup_init_lr < 0 or self.weight_decay < 0 or self.eps <= 0:
            raise ValueError("probe config: expected lr > 0, warmup_init_lr >= 0, weight_decay >= 0, eps > 0")
        if not 0 <= self.warmup_frac <= 1:
            raise ValueError(f"probe config warmup_frac={self.warmup_frac}: expected a fraction in [0, 1]")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"probe config label_smoothing={self.label_smoothing}: expected a value in [0, 1)")
        if not 0 <= self.val_ratio < 1:
            raise ValueError(f"probe config val_ratio={self.val_ratio}: expected a fraction in [0, 1)")
        if self.cache_dtype not in _CACHE_DTYPES:
            raise ValueError(f"probe config cache_dtype={self.cache_dtype!r}: expected float16 or float32")
        if self.cache not in ("disk", "memory"):
            raise ValueError(f"probe config cache={self.cache!r}: expected 'disk' or 'memory'")





# ---------------------------------------------------------------------------------------------------
# Trunk features, cached


@dataclass
class FeatureSet:
    """The probe's inputs for a set of images: features (n, N, D) (a numpy array or a read-only memmap; for a
    native-resolution trunk over images of several patch grids, a `RaggedTokens`), labels (n,), each row's
    path, and the files that could not be used."""

    features: Union[np.ndarray, RaggedTokens]
    labels: np.ndarray
    paths: list[str]
    skipped: Skipped = field(default_factory=Skipped)

    def __len__(self) -> int:
        return len(self.labels)


def _samples_key(samples: Sequence) -> str:
    text = "\n".join(f"{path}\t{label}" for path, label in samples)
    return hashlib.sha256(text.encode()).hexdigest()


def compute_features(
    model: AIM,
    samples: Sequence[tuple],
    *,
    batch_size: int = 64,
    dtype: str = "float16",
    num_workers: int = NUM_WORKERS,
    cache_file: Optional[Union[str, os.PathLike]] = None,
    cache_key: Optional[dict] = None,
    progress: bool = True,
    desc: str = "features",
    preprocessing: Optional[Preprocessing] = None,
) -> FeatureSet:
    """`model.probe_features` of every (path, label) sample (`preprocessing`, default
    `preprocessing_for(model.config)`), in sample order.

    Files that fail to load are skipped and listed. With `cache_file` (a .npy path) the features are written
    there (under a temporary name, renamed when complete, with a `.json` beside it naming the samples, the
    trunk, the preprocessing and `cache_key`) and read back memory-mapped when a later call asks for the same.
    A native-resolution trunk runs on batches of one patch grid each (`_native_features`).
    """
    c = model.config
    np_dtype = _CACHE_DTYPES[dtype]
    samples = [(Path(p), int(label)) for p, label in samples]
    transform = preprocessing or preprocessing_for(c)
    meta = {"samples_sha256": _samples_key(samples), "num_samples": len(samples), "dtype": dtype,
            "image_size": c.image_size, "probe_layers": c.probe_layers, "preprocessing": transform.settings(),
            "trunk": cache_key or {}}
    if cache_file is not None:
        cache_file = Path(cache_file)
        found = _read_cached(cache_file, meta)
        if found is not None:
            return found
        cache_file.parent.mkdir(parents=True, exist_ok=True)
    run = EncodeRun(transform, batch_size=batch_size, num_workers=num_workers, group_by_shape=is_native(c),
                    progress=progress, desc=desc)
    if is_native(c):
        return _native_features(model, samples, run, np_dtype, cache_file, meta)
    shape = (len(samples), c.num_patches, c.width)
    writing = atomic_file(cache_file) if cache_file is not None else contextlib.nullcontext()
    with writing as tmp:
        if tmp is not None:  # written in place through a memory map, renamed when complete
            features = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=shape)
        else:
            features = np.empty(shape, np_dtype)
        rows = FeatureRows(features, np_dtype)
        run.encode(samples, probe_outputs(model), rows)
        if tmp is not None:
            features.flush()
            del features
            rows.features = None  # closes the map before the rename
    row, labels, paths = rows.count, rows.labels, rows.paths
    if cache_file is None:
        return FeatureSet(features[:row], np.asarray(labels, np.int64), paths, run.skipped)
    _write_json(cache_file.with_suffix(".json"),
                dict(meta, rows=row, labels=labels, paths=paths, skipped=run.skipped.to_list()))
    return _read_cached(cache_file, meta)


def _checked(feats: np.ndarray, np_dtype) -> np.ndarray:
    if np_dtype == np.float16 and np.abs(feats).max() > _FLOAT16_MAX:
        raise ValueError(
            f"trunk features reach {np.abs(feats).max():.3g}, past float16's range; cache them in "
            "float32 (cache_dtype='float32', --cache-dtype float32)"
        )
    return feats


class FeatureRows:
    """`compute_features`' sink for a fixed-size trunk: each batch's probe features written in place into
    `features` (an (n, N, D) array or memory map of the cache dtype) as they come, in sample order, with their
    labels and paths; `count` rows so far."""

    def __init__(self, features: np.ndarray, np_dtype):
        self.features, self.np_dtype = features, np_dtype
        self.count, self.labels, self.paths = 0, [], []

    def add(self, batch: EncodedBatch) -> None:
        feats = _checked(batch.outputs["tokens"].astype(np.float32, copy=False), self.np_dtype)
        self.features[self.count : self.count + len(feats)] = feats
        self.count += len(feats)
        self.labels += batch.labels
        self.paths += [str(p) for p in batch.paths]

    def close(self, skipped: Skipped) -> None:
        pass  # the run lists them


class GridRows:
    """`compute_features`' sink for a native-resolution trunk: each image's probe features (N_i, D) in the cache
    dtype with its patch grid, by sample index (batches of one grid come out of sample order)."""

    def __init__(self, np_dtype, patch_size: int):
        self.np_dtype, self.patch_size = np_dtype, patch_size
        self.rows: dict[int, tuple[np.ndarray, tuple[int, int]]] = {}  # sample index -> (features (N, D), grid)

    def add(self, batch: EncodedBatch) -> None:
        feats = _checked(batch.outputs["tokens"].astype(np.float32, copy=False), self.np_dtype)
        grid = batch.grid(self.patch_size)
        for index, row in zip(batch.indices, feats.astype(self.np_dtype)):
            self.rows[index] = (row, grid)

    def close(self, skipped: Skipped) -> None:
        pass  # the run lists them


def _native_features(model: AIM, samples: list[tuple[Path, int]], run: EncodeRun, np_dtype,
                     cache_file: Optional[Path], meta: dict) -> FeatureSet:
    """`compute_features` for a native-resolution trunk: batches of one patch grid each, gathered in memory (a
    row's token count is known only once its image is read) and put back in sample order. One grid gives an
    (n, N, D) array, as a fixed-size trunk does; several give a `RaggedTokens` (cached with the grids)."""
    found = GridRows(np_dtype, model.config.patch_size)
    run.encode(samples, probe_outputs(model), found)
    rows, skipped = found.rows, run.skipped
    order = sorted(rows)
    labels, paths = [samples[i][1] for i in order], [str(samples[i][0]) for i in order]
    grids = [rows[i][1] for i in order]
    ragged = len(set(grids)) > 1
    if ragged:
        array = np.concatenate([rows[i][0] for i in order])
        features = RaggedTokens(array, grids)
    else:
        array = np.stack([rows[i][0] for i in order]) if order else np.zeros((0, 0, model.config.width), np_dtype)
        features = array
    if cache_file is None:
        return FeatureSet(features, np.asarray(labels, np.int64), paths, skipped)
    with atomic_file(cache_file) as tmp:
        np.save(tmp, array)
    _write_json(cache_file.with_suffix(".json"),
                dict(meta, rows=len(order), labels=labels, paths=paths, skipped=skipped.to_list(),
                     grids=[list(g) for g in grids] if ragged else None))
    return _read_cached(cache_file, meta)


def _read_cached(cache_file: Path, meta: dict) -> Optional[FeatureSet]:
    info_path = cache_file.with_suffix(".json")
    if not (cache_file.exists() and info_path.exists()):
        return None
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if any(info.get(k) != v for k, v in meta.items()):
        return None
    features = np.load(cache_file, mmap_mode="r")
    skipped = Skipped()
    for item in info["skipped"]:
        skipped.add(item["path"], item["reason"], warn=False)
    grids = info.get("grids")
    features = RaggedTokens(features, grids) if grids is not None else features[: info["rows"]]
    return FeatureSet(features, np.asarray(info["labels"], np.int64), info["paths"], skipped)


def feature_batches(data: FeatureSet, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(features, labels) of `data` in batches of up to `batch_size` rows, in row order; ragged features in
    batches of one grid each, grid by grid."""
    if isinstance(data.features, RaggedTokens):
        for rows in data.features.by_grid().values():
            for lo in range(0, len(rows), batch_size):
                idx = rows[lo : lo + batch_size]
                yield data.features.take(idx), data.labels[idx]
        return
    for lo in range(0, len(data), batch_size):
        yield np.asarray(data.features[lo : lo + batch_size]), data.labels[lo : lo + batch_size]


def epoch_batches(data: FeatureSet, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The row indices of each training batch of `epoch`, in order. Rows are visited in the permutation
    seeded by (seed, epoch), cut into batches of `batch_size` with the last incomplete batch dropped. Ragged
    features (several patch grids) are cut grid by grid, in permutation order, each grid's last batch kept
    however short (a grid with fewer images than a batch would otherwise never be trained on); the batches
    are then put in the order of a permutation seeded by (seed, epoch, 1)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(data))
    if not isinstance(data.features, RaggedTokens):
        return [order[k * batch_size : (k + 1) * batch_size] for k in range(len(data) // batch_size)]
    members: dict[tuple[int, int], list[int]] = {}
    for i in order:
        members.setdefault(data.features.grids[i], []).append(int(i))
    batches = [np.asarray(rows[lo : lo + batch_size]) for rows in members.values()
               for lo in range(0, len(rows), batch_size)]
    shuffled = np.random.default_rng([seed, epoch, _BATCH_ORDER_STREAM]).permutation(len(batches))
    return [batches[k] for k in shuffled]


# ---------------------------------------------------------------------------------------------------
# The head, its evaluation, its files


def probe_eps(model: TrunkModel) -> float:
    """The probe BatchNorm's eps of `model`'s family (AIM: the trunk's LayerNorm eps, as Apple's heads; AIMv2: AIM's
    1e-6, not its RMSNorm's 1e-5), so that a head trained here and one loaded with a model agree."""
    return family_probe_eps(model.config)


def new_head(model: TrunkModel, num_classes: int, seed: int) -> AttentionProbe:
    """A freshly initialised float32 probe for `model`'s width and heads, drawn from `seed`."""
    mx.random.seed(seed)
    head = build_probe(model.config, num_classes)
    mx.eval(head.parameters())
    return head


def probe_forward(head: AttentionProbe, x: mx.array) -> tuple[mx.array, mx.array]:
    """`head(x)` -> (logits, pooled) computed without projecting every token to keys and values.

    The probe has a single query, so per head h the scores q_h . (W_k x_n)_h equal x_n . (W_k,h^T q_h),
    and the pooled value sum_n a_n (W_v x_n)_h equals W_v,h (sum_n a_n x_n): O(N D H + D^2) per image
    instead of O(N D^2). The same parameters and the same maths as `AttentionProbe` (equal to float
    rounding); for aim-600M's width a training step on cached features runs ~6x faster.
    """
    B, N, D = x.shape
    H = head.num_heads
    d = D // H
    x = head.bn(x)
    q = head.cls_token.reshape(H, d).astype(x.dtype)
    u = mx.einsum("hj,hjc->hc", q, head.k.weight.reshape(H, d, D)) * (d**-0.5)  # (H, D)
    weights = mx.softmax(x @ u.T, axis=1, precise=True)  # (B, N, H): attention of each head over tokens
    mixed = mx.einsum("bnh,bnc->bhc", weights, x)  # (B, H, D)
    pooled = mx.einsum("bhc,hjc->bhj", mixed, head.v.weight.reshape(H, d, D)).reshape(B, D)
    return head.linear(pooled), pooled


def head_weights(head: AttentionProbe) -> dict[str, mx.array]:
    """The head's tensors under Apple's key names (`head.k.weight`, ...)."""
    return {HEAD_PREFIX + k: v for k, v in tree_flatten(head.parameters())}


def save_head(
    path: Union[str, os.PathLike], head: AttentionProbe, probe_layers: Optional[Sequence[int]] = None
) -> Path:
    """Writes the head with Apple's keys; the metadata also names its class count and probe layers."""
    path = Path(path)
    metadata = {"format": "mlx", "num_classes": str(head.linear.weight.shape[0])}
    if probe_layers is not None:
        metadata["probe_layers"] = json.dumps(list(probe_layers))
    with atomic_file(path) as tmp:
        mx.save_safetensors(str(tmp), head_weights(head), metadata=metadata)
    return path


def load_head(path: Union[str, os.PathLike], model: TrunkModel) -> AttentionProbe:
    """A probe head file (Apple's `head.*` keys) as an eval-mode `AttentionProbe` for `model`'s trunk."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: probe head file not found")
    weights = read_safetensors(path)
    expected = {HEAD_PREFIX + k for k in HEAD_KEYS}
    if set(weights) != expected:
        raise ValueError(f"{path}: expected the keys {sorted(expected)}, found {sorted(weights)}")
    c = model.config
    rows, width = weights["head.linear.weight"].shape
    if width != c.width:
        raise ValueError(f"{path}: head width {width} does not match the trunk's width {c.width}")
    head = build_probe(c, rows)
    head.load_weights([(k.removeprefix(HEAD_PREFIX), v.astype(mx.float32)) for k, v in weights.items()], strict=True)
    mx.eval(head.parameters())
    head.eval()
    return head


def with_trained_head(model: TrunkModel, path: Union[str, os.PathLike]) -> Probed:
    """`model`'s trunk composed with the probe head file at `path` (`load_head`, `with_probe`): a probed model whose
    `model(images)` gives the probe's logits, as `mlx_aim.load(source, head=path)` gives from a source."""
    return with_probe(model, load_head(path, model))


def evaluate(
    head: AttentionProbe, data: FeatureSet, classes: Sequence[str], batch_size: int = 128
) -> dict:
    """Top-1, top-5 (top-min(5, classes)), per-class accuracy and mean loss of `head` (eval mode) on `data`."""
    was_training = head.training
    head.eval()
    num_classes = len(classes)
    k = min(5, num_classes)
    correct1 = np.zeros(num_classes, np.int64)
    count = np.zeros(num_classes, np.int64)
    correct5, loss_sum = 0, 0.0
    for x, y in feature_batches(data, batch_size):
        logits, _ = probe_forward(head, mx.array(x).astype(mx.float32))
        loss = nn.losses.cross_entropy(logits, mx.array(y), reduction="sum")
        top = mx.argsort(-logits, axis=-1)[:, :k]
        mx.eval(loss, top)
        top = np.asarray(top)
        loss_sum += float(loss)
        np.add.at(count, y, 1)
        np.add.at(correct1, y, top[:, 0] == y)
        correct5 += int((top == y[:, None]).any(axis=1).sum())
    if was_training:
        head.train()
    n = int(count.sum())
    per_class = {name: {"accuracy": (float(correct1[i] / count[i]) if count[i] else None), "count": int(count[i])}
                 for i, name in enumerate(classes)}
    present = [v["accuracy"] for v in per_class.values() if v["accuracy"] is not None]
    return {
        "num_images": n,
        "top1": float(correct1.sum() / n) if n else None,
        "top5": float(correct5 / n) if n else None,
        "top5_k": k,
        "loss": loss_sum / n if n else None,
        "mean_per_class_accuracy": float(np.mean(present)) if present else None,
        "per_class": per_class,
    }


# ---------------------------------------------------------------------------------------------------
# Training


@dataclass
class ProbeResult:
    head: AttentionProbe
    classes: list[str]
    metrics: dict  # {"train": ..., "val": ...}; train only when the features were cached
    losses: list[float]  # the training loss of every step run in this call, in order
    steps: int  # the step reached
    total_steps: int
    seconds: float
    skipped: Skipped
    out: Optional[Path] = None
    info: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "total_steps": self.total_steps,
            "classes": self.classes,
            "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None,
            "train": self.metrics.get("train"),
            "val": self.metrics.get("val"),
            "seconds": round(self.seconds, 3),
            "num_skipped": len(self.skipped),
            "skipped": self.skipped.to_list(),
            "out": str(self.out) if self.out else None,
        }


def _write_json(path: Path, obj: Any) -> None:
    write_json(path, obj, indent=1, default=str)  # the probe's files: compact, paths and the like as text


def _splits(data, val_ratio: float, seed: int) -> tuple[ImageFolder, Optional[ImageFolder]]:
    if isinstance(data, (str, os.PathLike)):
        return load_splits(data, val_ratio=val_ratio, seed=seed)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], ImageFolder):
        return data[0], data[1]
    raise ValueError("data: expected an image folder path or a (train ImageFolder, val ImageFolder) pair")


def trunk_description(model: TrunkModel, source: Any = None, random_init: bool = False, seed: int = 0) -> dict:
    """What identifies a trunk's features: its source, weights' origin, dtype and architecture."""
    return {"source": None if source is None else str(source), "random_init": bool(random_init),
            "seed": int(seed) if random_init else None, "dtype": dtype_name(model.dtype),
            "quantization": model.config.quantization, "probe_layers": model.config.probe_layers,
            "config": model.config.to_dict()}


def probe_run(out: Union[str, os.PathLike]) -> RunFolder:
    """A probe output folder: one checkpoint, `checkpoint/`, with the head (Apple's keys), the optimizer
    state and state.json, replaced at each save."""
    return RunFolder(out, checkpoint_dir=PROBE_CHECKPOINT_DIR, weights_file=HEAD_FILE, numbered=False, can_force=True)


def _check_augmentable(preprocessing: Preprocessing) -> None:
    """Augmentation crops and resizes to a fixed image size and scales pixels by 1/255: refuses preprocessing
    it cannot honour (native resolution, another scale)."""
    if preprocessing.native:
        raise ValueError("augment: random resized crops need a fixed image size; a native-resolution trunk trains "
                         "on its cached features (leave out augment, --augment)")
    if preprocessing.rescale_factor != 1 / 255:
        raise ValueError(f"augment scales pixels by 1/255; this preprocessing ({preprocessing.source}) scales by "
                         f"{preprocessing.rescale_factor}")


def _make_step(head: AttentionProbe, optimizer, label_smoothing: float):
    """One optimizer step on a batch of probe features. Not `mx.compile`d: on the CPU backend compiling
    this step costs ~25 s (MLX builds its fused kernels with the system compiler) to save ~1 ms a step."""

    def loss_fn(head, x, y):
        logits, _ = probe_forward(head, x)
        return nn.losses.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction="mean")

    loss_and_grad = nn.value_and_grad(head, loss_fn)

    def step(x, y):
        # In train mode the BatchNorm updates its running statistics, part of head.state, as a side effect.
        loss, grads = loss_and_grad(head, x.astype(mx.float32), y)
        optimizer.update(head, grads)
        return loss

    return step


def _features(model: TrunkModel, train_part: ImageFolder, val_part: Optional[ImageFolder], config: ProbeConfig,
              cache_dir: Optional[Path], trunk: dict, progress: bool, preprocessing: Preprocessing
              ) -> tuple[Optional[FeatureSet], Optional[FeatureSet], Skipped]:
    """The trunk features of the training images (None with `augment`: the trunk then runs on every
    augmented batch) and of the validation images, cached in `cache_dir` when given; the unusable files."""

    def features_of(part, name):
        cache_file = cache_dir / f"{name}.npy" if cache_dir is not None else None
        return compute_features(model, part.samples, batch_size=config.eval_batch_size, dtype=config.cache_dtype,
                                num_workers=config.num_workers, cache_file=cache_file, cache_key=trunk,
                                progress=progress, desc=f"{name} features", preprocessing=preprocessing)

    train_set = None if config.augment else features_of(train_part, "train")
    val_set = features_of(val_part, "val") if val_part is not None and len(val_part) else None
    skipped = Skipped()
    for part in (train_set, val_set):
        if part is not None:
            skipped.items += part.skipped.items
    return train_set, val_set, skipped


def _batches(model: TrunkModel, train_set: Optional[FeatureSet], loader: Optional[BatchLoader], batch_size: int,
             seed: int, start_step: int) -> Iterator[tuple[mx.array, mx.array]]:
    """(probe features, labels) of the steps after `start_step`: augmented images through the frozen trunk
    (no gradient reaches it), or cached features in the batches `epoch_batches` gives."""
    if loader is not None:
        for images, labels, _ in loader:
            yield model.probe_features(mx.array(images)), mx.array(labels)
        return
    steps_per_epoch = len(epoch_batches(train_set, batch_size, seed, 0))
    batches, batches_epoch = None, None
    for step in itertools.count(start_step):
        epoch, position = divmod(step, steps_per_epoch)
        if batches_epoch != epoch:
            batches, batches_epoch = epoch_batches(train_set, batch_size, seed, epoch), epoch
        idx = batches[position]
        features = train_set.features
        x = features.take(idx) if isinstance(features, RaggedTokens) else np.asarray(features[idx])
        yield mx.array(x), mx.array(train_set.labels[idx])


def train_probe(
    model: TrunkModel,
    data,
    out: Optional[Union[str, os.PathLike]] = None,
    config: Optional[ProbeConfig] = None,
    *,
    trunk: Optional[dict] = None,
    resume: bool = False,
    force: bool = False,
    stop_at: Optional[int] = None,
    save_model_folder: bool = True,
    progress: bool = True,
    echo: Optional[Callable[[str], None]] = None,
    preprocessing: Optional[Preprocessing] = None,
) -> ProbeResult:
    """Trains an attentive probe on `model`'s frozen trunk over an image folder; returns the result.

    `data`: a folder with class sub-folders (split by `config.val_ratio`), or with `train/` and `val/`
    folders of them, or a (train, val) pair of `ImageFolder`s. `out` (optional): where the head, probe.json,
    the model folder, checkpoints, the log and the feature cache go (see the module docstring). `trunk`:
    what identifies the trunk (`trunk_description`), stored in probe.json and checked on resume. `resume`
    continues from out/checkpoint; `force` discards an existing one. `stop_at` ends this call after that
    step with a checkpoint, leaving the schedule as for the full run (to train in slices). `preprocessing`
    (default `preprocessing_for(model.config)`) is recorded in probe.json, and written to the model folder as
    its `preprocessor_config.json` where that format can hold it (everything but AIM v1's torchvision rounding).

    Raises `runs.TrainingDiverged` when the loss becomes NaN or infinite.
    """
    echo = echo or silent
    config = config or ProbeConfig()
    trunk = trunk or trunk_description(model)
    start_time = time.perf_counter()
    run = probe_run(out) if out is not None else None
    found = run.prepare(resume=resume, force=force) if run is not None else None
    if run is not None:
        remove_stale_temporaries(run.path / CACHE_DIR)

    # The data: trunk features, cached unless augmenting.
    model.eval()
    preprocessing = preprocessing or preprocessing_for(model.config)
    if config.augment:
        _check_augmentable(preprocessing)
    train_part, val_part = _splits(data, config.val_ratio, config.seed)
    classes = list(train_part.classes)
    if len(classes) < 2:
        raise ValueError(f"probe data has {len(classes)} class(es) ({classes}): expected at least 2")
    cache_dir = run.path / CACHE_DIR if run is not None and config.cache == "disk" else None
    train_set, val_set, skipped = _features(model, train_part, val_part, config, cache_dir, trunk, progress,
                                            preprocessing)
    num_train = len(train_part) if config.augment else len(train_set)
    if num_train < 2:
        raise NoUsableImages(f"probe data: {num_train} usable training image(s); expected at least 2"
                             + (f" ({len(skipped)} skipped)" if len(skipped) else ""))

    # The run: head, optimizer, schedule over this data's step count, then the checkpoint's state over them.
    batch_size = min(config.batch_size, num_train)
    steps_per_epoch = (num_train // batch_size if train_set is None
                       else len(epoch_batches(train_set, batch_size, config.seed, 0)))
    total_steps = config.steps or config.epochs * steps_per_epoch
    end_step = last_step(stop_at, total_steps)
    schedule = Schedule.warmup_cosine(total_steps, config.lr, config.warmup_init_lr, config.warmup_frac)
    head = new_head(model, len(classes), config.seed)
    head.train()
    optimizer = adamw(schedule, config.betas, config.eps, config.weight_decay)
    optimizer.init(head.trainable_parameters())
    loader = None
    if config.augment:
        normalize = preprocessing.mean is not None
        transform = TrainTransform(model.config.image_size, scale=config.crop_scale, hflip=config.hflip,
                                   color_jitter=(0, 0, 0, 0), jitter_prob=0.0, normalize=normalize,
                                   **({"mean": preprocessing.mean, "std": preprocessing.std} if normalize else {}))
        loader = BatchLoader(train_part, batch_size, transform, seed=config.seed, shuffle=True, drop_last=True,
                             num_workers=config.num_workers, loop=True)
    settings = {"recipe": config.recipe(), "trunk": trunk, "total_steps": total_steps,
                "data": {"classes": classes, "num_train": num_train, "train_sha256": _samples_key(train_part.samples)}}
    start_step, losses_before = 0, []
    if found is not None:
        state = run.read_state(found)
        run.check_settings(found, {k: state.get(k) for k in settings}, settings)  # before shapes can clash
        run.restore(found, head, optimizer, prefix=HEAD_PREFIX)
        start_step, losses_before = int(state["step"]), list(state["losses"])
        if loader is not None:
            loader.load_state_dict(state["loader"])
        echo(f"resuming from {found} at step {start_step} of {total_steps}")

    # The loop.
    step_fn = _make_step(head, optimizer, config.label_smoothing)
    log = RunLog(run.path, start_step if found is not None else None) if run is not None else None
    losses: list[float] = []
    last_checkpoint = found
    window = LossWindow()  # since the last log record
    batches = _batches(model, train_set, loader, batch_size, config.seed, start_step)
    with contextlib.closing(batches), tqdm(total=end_step, initial=start_step, desc="probe", unit="step",
                                           disable=not progress or None, dynamic_ncols=True) as bar:
        for step in range(start_step + 1, end_step + 1):
            x, y = next(batches)
            loss = step_fn(x, y)
            mx.eval(loss, head.state, optimizer.state)
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
            bar.update(1)
            if run is not None and ((config.ckpt_interval and step % config.ckpt_interval == 0) or step == end_step):
                state = dict(settings, losses=losses_before + losses,
                             loader=loader.state_dict() if loader is not None else None)
                last_checkpoint = run.save(step, head, optimizer, state, prefix=HEAD_PREFIX)
        if loader is not None:
            for path, reason in loader.skipped:
                skipped.add(path, reason, warn=False)

    # The outcome: metrics, probe.json, the head and model folder once the run is complete.
    head.eval()
    metrics = {}
    if train_set is not None:
        metrics["train"] = evaluate(head, train_set, classes, config.eval_batch_size)
    if val_set is not None:
        metrics["val"] = evaluate(head, val_set, classes, config.eval_batch_size)
    all_losses = losses_before + losses
    info = {
        "format": PROBE_FORMAT,
        "classes": classes,
        "num_classes": len(classes),
        "probe_layers": model.config.probe_layers,
        "trunk": trunk,
        "config": config.to_dict(),
        "steps": end_step,
        "total_steps": total_steps,
        "batch_size": batch_size,
        "num_train": num_train,
        "num_val": len(val_set) if val_set is not None else 0,
        "metrics": metrics,
        "loss_curve": [{"step": s, "loss": float(np.mean(all_losses[max(0, s - config.log_interval):s]))}
                       for s in range(config.log_interval, len(all_losses) + 1, config.log_interval)],
        "skipped": skipped.to_list(),
        "preprocessing": preprocessing.to_dict(),
    }
    if run is not None and end_step == total_steps:
        _write_outputs(run.path, model, head, info, save_model_folder, preprocessing)
    return ProbeResult(head, classes, metrics, losses, end_step, total_steps, time.perf_counter() - start_time,
                       skipped, run.path if run is not None else None, info)


def _write_outputs(out: Path, model: TrunkModel, head: AttentionProbe, info: dict, save_model_folder: bool,
                   preprocessing: Preprocessing) -> None:
    save_head(out / HEAD_FILE, head, info["probe_layers"])
    if save_model_folder:
        weights = {k: v for k, v in tree_flatten(model.parameters()) if not k.startswith("head.")}
        weights.update(head_weights(head))
        config = model.config.replace(num_classes=len(info["classes"]))
        note = (f"A trunk ({info['trunk'].get('source')}) with an attentive probe trained by mlx-aim "
                f"(scripts/probe.py) on {info['num_classes']} classes.")
        folder = save_model(out / MODEL_DIR, weights, config, force=True, source_note=note)
        _write_json(folder / PROBE_INFO, info)
        if preprocessing.crop_rounding == "floor":  # so that classifying with the folder preprocesses alike
            write_json(folder / PREPROCESSOR_CONFIG, preprocessing.processor_dict())
    _write_json(out / PROBE_INFO, info)


# ---------------------------------------------------------------------------------------------------
# Evaluating a saved probe


def load_probe_info(head_dir: Union[str, os.PathLike]) -> dict:
    """probe.json of a probe output folder (or of its model/ folder)."""
    path = Path(head_dir) / PROBE_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; expected a folder written by probe training "
                                "(scripts/probe.py train --out DIR)")
    info = read_json(path)
    if info.get("format") != PROBE_FORMAT:
        raise ValueError(f"{path}: not a probe description (format {info.get('format')!r}, expected {PROBE_FORMAT!r})")
    return info


def eval_split(data, split: str, classes: Sequence[str], val_ratio: float, seed: int) -> ImageFolder:
    """The images of `split` ("val" or "train") of an image folder, labelled in the probe's class order."""
    if split not in ("val", "train"):
        raise ValueError(f"split={split!r}: expected 'val' or 'train'")
    train_part, val_part = _splits(data, val_ratio, seed)
    part = val_part if split == "val" else train_part
    if part is None or not len(part):
        raise ValueError(f"{data}: the {split} split holds no images")
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({part.classes[label] for _, label in part.samples} - set(index))
    if unknown:
        raise ValueError(f"{data}: classes {unknown[:8]} are not among the probe's {len(classes)} classes")
    relabelled = copy.copy(part)
    relabelled.classes = list(classes)
    relabelled.class_to_idx = dict(index)
    relabelled.samples = [(path, index[part.classes[label]]) for path, label in part.samples]
    return relabelled


def evaluate_probe(
    model: Probed,
    data,
    classes: Sequence[str],
    *,
    split: str = "val",
    val_ratio: float = 0.2,
    seed: int = 0,
    batch_size: int = 128,
    num_workers: int = NUM_WORKERS,
    progress: bool = True,
    preprocessing: Optional[Preprocessing] = None,
) -> tuple[dict, Skipped]:
    """Metrics of the probed `model` (a trunk with its trained head: `with_trained_head`) on a split of an image
    folder, preprocessed by `preprocessing` (default `preprocessing_for(model.config)`)."""
    if not isinstance(model, Probed):
        raise UntrainedHeadError(untrained_head_message(model.config, wanted="probe metrics"))
    part = eval_split(data, split, classes, val_ratio, seed)
    features = compute_features(model, part.samples, batch_size=batch_size, dtype="float32",
                                num_workers=num_workers, progress=progress, desc=f"{split} features",
                                preprocessing=preprocessing)
    return evaluate(model.head, features, classes, batch_size), features.skipped
