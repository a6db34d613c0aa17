"""Inference over image files: top-k classification and feature extraction, batched, with bad files skipped.

Used by the `classify`, `extract-features` and `probe` commands (`mlx_aim.cli`), which print the results:

- `open_model` loads what `mlx_aim.load` accepts, or (with `random_init`) the same architecture with fresh
  seeded weights (`build_model`), or with a head file a probe head on a trunk or a zero-shot head on an AIMv2-LiT
  (`zeroshot.ZeroShotClassifier`, which `classify` takes as it takes a model); `class_names` finds the label names
  that go with a model.
- The data layer's `gather_images` and `iter_image_batches` (`mlx_aim.data`) turn command-line inputs into
  batches of model input, preprocessed as the checkpoint says (`Preprocessing`, `preprocessing_for`); a file
  that cannot be used is recorded in a `Skipped` list with its reason, and the run goes on. A native-resolution
  model (config `image_size` None) gets batches of one patch grid each, and results in input order.
- `classify` and `extract_features` are the two jobs; they return `ClassifyResult` and `ExtractResult`.
- `peak_memory` reports the process's peak resident memory and MLX's peak allocation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..data import (
    NUM_WORKERS, Preprocessing, Skipped, gather_images, imagenet_classes, is_native, iter_image_batches,
    preprocessing_for,
)
from .. import platforms
from ..fileio import confined, read_json_object, remove_stale_temporaries, write_json
from ..checkpoints.loading import load, source_config
from ..models.model import (
    AIM, Probed, ProbedAIMv2, TrunkModel, UntrainedHeadError, build_model, dtype_name, untrained_head_message,
)
from .shards import (
    FEATURES_FORMAT, FILE_FORMATS, INDEX_NAME, RUN_NAME, SAVE_DTYPES, read_shard, read_shard_array, shard_stem,
    write_shard,
)
from .zeroshot import ZeroShotClassifier, is_zero_shot_head, open_zero_shot

PROBE_INFO = "probe.json"  # written by probe training next to a trained head (classes, probe layers, metrics)
# Defaults shared by the library functions and the command lines.
BATCH_SIZE = 32
TOP_K = 5
SHARD_SIZE = 1024


# ---------------------------------------------------------------------------------------------------
# Memory


def peak_memory() -> dict:
    """Peak resident memory of this process (ru_maxrss) and MLX's peak allocation, both in bytes."""
    return {"peak_rss_bytes": platforms.peak_rss_bytes(), "peak_mlx_bytes": int(mx.get_peak_memory())}


# ---------------------------------------------------------------------------------------------------
# Models


def open_model(
    model: str | os.PathLike,
    *,
    dtype=None,
    quantize=None,
    probe_layers=None,
    random_init: bool = False,
    seed: int = 0,
    max_patches: Optional[int] = None,
    head: Optional[str | os.PathLike] = None,
) -> TrunkModel | ZeroShotClassifier:
    """`mlx_aim.load(model, ...)`, or with `random_init` the same architecture (stored quantization aside) with
    the paper's initialisation drawn from `seed` (`build_model`): the random-init baseline, a trunk without a probe.

    `max_patches` replaces a native-resolution model's guard (config `max_patches`, which `preprocessing_for`
    reads too); a fixed-size model refuses it, having no use for it.

    `head`: a head file to classify with, told apart by its metadata: a probe head (Apple's `head.*` keys) for an
    AIM or AIMv2 trunk (`load(..., head=...)`), or a zero-shot head (`mlx-aim zero-shot --save-head`) for an
    AIMv2-LiT, which gives a `zeroshot.ZeroShotClassifier` on the LiT's image side (`open_zero_shot`)."""
    if head is not None and is_zero_shot_head(head):
        if random_init or probe_layers is not None or max_patches is not None:
            raise ValueError(f"{head}: a zero-shot head classifies with the AIMv2-LiT's own image side; random "
                             "weights, probe layers and max_patches do not apply to it")
        return open_zero_shot(model, head, dtype=dtype, quantize=quantize)
    if random_init and head is not None:
        raise ValueError(f"{head}: a head file goes on a loaded model, not on a random-init baseline")
    if random_init:
        config = source_config(model, probe_layers).replace(quantization=None)
        opened = build_model(config, dtype, quantize, seed=seed)
    else:
        opened = load(model, dtype=dtype, quantize=quantize, probe_layers=probe_layers, head=head)
    if max_patches is not None:
        if not is_native(opened.config):
            raise ValueError(f"max_patches={max_patches}: {model} takes {opened.config.image_size}x"
                             f"{opened.config.image_size} images; the limit applies to native-resolution models "
                             "(aimv2-large-patch14-native) only")
        opened.config = opened.config.replace(max_patches=max_patches)
    return opened


def class_names(model_source, num_classes: int) -> list[str]:
    """Label names for a model: a trained probe's classes (its folder's probe.json), else ImageNet's for
    1000 classes, else the class indices as text."""
    if isinstance(model_source, (str, os.PathLike)):
        info_path = confined(model_source, PROBE_INFO)
        if info_path.is_file():
            classes = read_json_object(info_path).get("classes")
            if isinstance(classes, list) and len(classes) == num_classes:
                return [str(c) for c in classes]
            raise ValueError(f"{info_path}: 'classes' should list {num_classes} names, the model's class count")
    if num_classes == 1000:
        return imagenet_classes()
    return [str(i) for i in range(num_classes)]


def to_numpy(a: mx.array, dtype=np.float32) -> np.ndarray:
    """numpy copy of an MLX array; bfloat16 goes through float32 (numpy has no bfloat16)."""
    if a.dtype == mx.bfloat16:
        a = a.astype(mx.float32)
    return np.asarray(a).astype(dtype, copy=False)


# ---------------------------------------------------------------------------------------------------
# Classification


def check_classifier(model, model_name: str = "", wanted: str = "classes", hint: str = "") -> None:
    """A model that answers with a trained head's output: a probed trunk (`AIM`, `ProbedAIMv2`) or a zero-shot
    classifier. A trunk without one (an AIMv2 encoder, an AIM trunk export, a random init) raises
    `UntrainedHeadError`, naming the command that trains a probe: its classes would be noise."""
    if not isinstance(model, (Probed, ZeroShotClassifier)):
        raise UntrainedHeadError(untrained_head_message(model.config, model_name, wanted, hint))


@dataclass
class ClassifyResult:
    predictions: list[dict]  # {"path", "top_k": [{"index", "label", "probability"}]}
    skipped: Skipped
    seconds: float
    model_seconds: float

    @property
    def num_images(self) -> int:
        return len(self.predictions)

    def to_dict(self) -> dict:
        return {
            "num_images": self.num_images,
            "num_skipped": len(self.skipped),
            "seconds": round(self.seconds, 4),
            "images_per_second": round(self.num_images / self.seconds, 3) if self.seconds > 0 else None,
            "model_images_per_second": (round(self.num_images / self.model_seconds, 3)
                                        if self.model_seconds > 0 else None),
            "predictions": self.predictions,
            "skipped": self.skipped.to_list(),
        }


def classify(
    model: AIM | ProbedAIMv2 | ZeroShotClassifier,
    inputs: Sequence,
    *,
    top_k: int = TOP_K,
    batch_size: int = BATCH_SIZE,
    labels: Optional[Sequence[str]] = None,
    num_workers: int = NUM_WORKERS,
    model_name: str = "",
    progress: bool = True,
    preprocessing: Optional[Preprocessing] = None,
) -> ClassifyResult:
    """Top-k classes with softmax probabilities for every image named by `inputs` (files, folders, globs), in
    input order. `preprocessing`: default `preprocessing_for(model.config)` (the family's default; the command
    line passes the checkpoint folder's file). A model without a trained head is refused (`check_classifier`)."""
    check_classifier(model, model_name)
    num_classes = model.config.num_classes
    labels = list(labels) if labels is not None else [str(i) for i in range(num_classes)]
    if len(labels) != num_classes:
        raise ValueError(f"labels: {len(labels)} names for a model with {num_classes} classes")
    if not 1 <= top_k:
        raise ValueError(f"top_k={top_k}: expected a positive integer")
    top_k = min(top_k, num_classes)
    start = time.perf_counter()
    skipped = Skipped()
    paths = gather_images(inputs, skipped)
    transform = preprocessing or preprocessing_for(model.config)
    found, model_seconds = {}, 0.0  # input index -> prediction
    with tqdm(total=len(paths), desc="classify", unit="img", disable=not progress or None) as bar:
        batches = iter_image_batches(paths, transform, batch_size, skipped, num_workers=num_workers,
                                     labels=range(len(paths)), group_by_shape=is_native(model.config))
        for images, batch_paths, indices in batches:
            tick = time.perf_counter()
            probs = mx.softmax(model(mx.array(images)).astype(mx.float32), axis=-1)
            order = mx.argsort(-probs, axis=-1)[:, :top_k]
            top = mx.take_along_axis(probs, order, axis=-1)
            mx.eval(order, top)
            model_seconds += time.perf_counter() - tick
            for index, path, idx, p in zip(indices, batch_paths, np.asarray(order).tolist(), np.asarray(top).tolist()):
                found[index] = {
                    "path": str(path),
                    "top_k": [{"index": i, "label": labels[i], "probability": q} for i, q in zip(idx, p)],
                }
            bar.update(len(batch_paths))
        bar.update(len(paths) - bar.n)
    predictions = [found[index] for index in sorted(found)]
    return ClassifyResult(predictions, skipped, time.perf_counter() - start, model_seconds)


# ---------------------------------------------------------------------------------------------------
# Feature extraction: shards + index, resumable


FEATURE_KINDS = ("embedding", "tokens", "both")


@dataclass
class ExtractResult:
    out: Path
    index: dict
    skipped: Skipped
    seconds: float
    model_seconds: float
    num_new: int  # images processed in this run (finished shards of an earlier run excluded)
    shards_reused: int

    def to_dict(self) -> dict:
        n = self.num_new
        return {
            "out": str(self.out),
            "index": str(self.out / INDEX_NAME),
            "num_images": self.index["num_rows"],
            "num_processed_now": n,
            "num_skipped": len(self.skipped),
            "num_shards": len(self.index["shards"]),
            "shards_reused": self.shards_reused,
            "seconds": round(self.seconds, 4),
            "images_per_second": round(n / self.seconds, 3) if n and self.seconds > 0 else None,
            "model_images_per_second": round(n / self.model_seconds, 3) if n and self.model_seconds > 0 else None,
            "skipped": self.skipped.to_list(),
        }


def _relative(path: Path, roots: list[Path]) -> str:
    for root in roots:
        try:
            return path.resolve().relative_to(root).as_posix()
        except ValueError:
            continue
    return str(path)


def extract_features(
    model: TrunkModel,
    inputs: Sequence,
    out: str | os.PathLike,
    *,
    features: str = "embedding",
    shard_size: int = SHARD_SIZE,
    file_format: str = "npy",
    save_dtype: str = "float32",
    batch_size: int = BATCH_SIZE,
    num_workers: int = NUM_WORKERS,
    model_name: str = "",
    overwrite: bool = False,
    progress: bool = True,
    preprocessing: Optional[Preprocessing] = None,
) -> ExtractResult:
    """Features of every image under `inputs` (folders, files, globs), written to `out` in shards.

    `features`: "embedding" (the probe's attention-pooled vector, (D,): a probed model's only), "tokens" (the
    probe layers' averaged patch tokens, (N, D): the probe's input, any trunk's) or "both". Shard k holds the
    images k * shard_size ... in sorted path order (fewer rows where files were skipped); `file_format` "npy" writes `shard-k.embedding.npy` /
    `shard-k.tokens.npy`, "safetensors" one `shard-k.safetensors` with keys "embedding" / "tokens". Each
    shard's `shard-k.json` (paths of its rows, skipped files) is written last and marks it finished, so a
    re-run with the same settings skips finished shards. `index.json`, written at the end, lists every shard
    with its first global row and its rows' paths (relative to the input folder). `preprocessing`: default
    `preprocessing_for(model.config)`; recorded in run.json and index.json.

    A native-resolution model's images keep their own grids, so their token counts differ: a shard's tokens
    are then stored ragged, the rows' (N_i, D) tokens one after another in one (sum of N_i, D) array, and
    `shard-k.json` lists each row's patch grid (rows, cols) under "grids" (N_i = rows * cols, tokens row by
    row); index.json says `"tokens_layout": "ragged"` and `load_features` returns a `RaggedTokens`.
    """
    if features not in FEATURE_KINDS:
        raise ValueError(f"features={features!r}: expected one of {', '.join(FEATURE_KINDS)}")
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format={file_format!r}: expected 'npy' or 'safetensors'")
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype={save_dtype!r}: expected one of {', '.join(SAVE_DTYPES)}")
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: expected a positive integer")
    if features != "tokens":
        check_classifier(model, model_name, "pooled embedding", "extract the probe-layer tokens, which need no "
                         "head, with features='tokens', --features tokens")
    kinds = ("embedding", "tokens") if features == "both" else (features,)
    start = time.perf_counter()
    out = Path(out)
    skipped = Skipped()
    paths = gather_images(inputs, skipped)
    roots = [Path(i).resolve() for i in inputs if Path(i).is_dir()]
    relative = [_relative(p, roots) for p in paths]
    c = model.config
    native = is_native(c)
    transform = preprocessing or preprocessing_for(c)
    run = {
        "format": FEATURES_FORMAT,
        "version": 1,
        "model": model_name,
        "model_config": c.to_dict(),
        "model_dtype": dtype_name(model.dtype),
        "features": list(kinds),
        "file_format": file_format,
        "dtype": save_dtype,
        "shard_size": shard_size,
        "image_size": c.image_size,
        "preprocessing": transform.settings(),
        "num_files": len(paths),
        "files_sha256": hashlib.sha256("\n".join(relative).encode()).hexdigest(),
    }
    _prepare_output(out, run, overwrite)
    num_shards = math.ceil(len(paths) / shard_size)
    shards, shards_reused, num_new, model_seconds = [], 0, 0, 0.0
    dtype = SAVE_DTYPES[save_dtype]
    with tqdm(total=len(paths), desc="features", unit="img", disable=not progress or None) as bar:
        for k in range(num_shards):
            lo, hi = k * shard_size, min((k + 1) * shard_size, len(paths))
            stem = shard_stem(k)
            done = read_shard(out, stem)
            if done is not None:
                for item in done["skipped"]:
                    skipped.add(item["path"], item["reason"], warn=False)
                shards.append(done)
                shards_reused += 1
                bar.update(hi - lo)
                continue
            shard_skipped = Skipped()
            rows: dict[str, list[np.ndarray]] = {kind: [] for kind in kinds}  # one (N, ...) array per image
            rows_index, grids = [], []
            batches = iter_image_batches(paths[lo:hi], transform, batch_size, shard_skipped, num_workers=num_workers,
                                         labels=range(lo, hi), group_by_shape=native)
            for images, batch_paths, indices in batches:
                tick = time.perf_counter()
                tokens = model.probe_features(mx.array(images))
                outputs = {"tokens": tokens}
                if "embedding" in kinds:
                    outputs["embedding"] = model.head.pool(tokens)
                outputs = {kind: outputs[kind] for kind in kinds}
                mx.eval(outputs)
                model_seconds += time.perf_counter() - tick
                for kind in kinds:
                    rows[kind] += list(to_numpy(outputs[kind], dtype))
                rows_index += indices
                grids += [(images.shape[1] // c.patch_size, images.shape[2] // c.patch_size)] * len(indices)
                num_new += len(batch_paths)
                bar.update(len(batch_paths))
            bar.update(len(shard_skipped))
            order = np.argsort(rows_index, kind="stable")  # grouped batches come out of input order
            arrays = {kind: [rows[kind][i] for i in order] for kind in kinds}
            record = {"paths": [relative[rows_index[i]] for i in order]}
            if native:
                record["grids"] = [list(grids[i]) for i in order]
            shard = write_shard(out, stem, kinds, file_format, arrays, record, shard_skipped.to_list())
            for path, reason in shard_skipped.items:
                skipped.add(path, reason, warn=False)
            shards.append(shard)
    row = 0
    for shard in shards:
        shard["start"] = row
        row += shard["rows"]
    index = dict(run, num_rows=row, num_skipped=len(skipped), shards=shards, skipped=skipped.to_list(),
                 roots=[str(r) for r in roots])
    if "embedding" in kinds:
        index["embedding_shape"] = [c.width]
    if "tokens" in kinds:
        index["tokens_shape"] = [None if native else c.num_patches, c.width]
        if native:
            index["tokens_layout"] = "ragged"
    write_json(out / INDEX_NAME, index, indent=1)
    return ExtractResult(out, index, skipped, time.perf_counter() - start, model_seconds, num_new, shards_reused)


def _prepare_output(out: Path, run: dict, overwrite: bool) -> None:
    run_path = out / RUN_NAME
    if out.exists() and overwrite:
        if run_path.exists() or not any(out.iterdir()):
            shutil.rmtree(out)
        else:
            raise ValueError(f"{out}: not a feature folder written by mlx-aim (no {RUN_NAME}); refusing to delete it")
    if out.exists() and any(out.iterdir()):
        if not run_path.exists():
            raise ValueError(
                f"{out}: exists and is not a feature folder (no {RUN_NAME}); choose an empty or new folder"
            )
        try:
            previous = json.loads(run_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{run_path}: unreadable ({e}); pass --overwrite to start again") from None
        changed = sorted(k for k in set(run) | set(previous) if run.get(k) != previous.get(k))
        if changed:
            raise ValueError(
                f"{out}: holds features written with other settings or inputs (differs in {', '.join(changed)}); "
                "pass --overwrite to replace them, or choose another --out"
            )
        remove_stale_temporaries(out)  # shard files of an earlier run that was killed mid-write
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(run_path, run, indent=1)


class RaggedTokens:
    """Token rows of different lengths, as a native-resolution model gives them: row i is the (N_i, D) tokens
    of a `grids[i]` = (rows, cols) patch grid (N_i = rows * cols, row by row), stored one after another in
    `tokens` (sum of N_i, D), a numpy array or a memory map. `ragged[i]` is row i; `len` counts rows."""

    def __init__(self, tokens: np.ndarray, grids: Sequence[Sequence[int]]):
        self.tokens = tokens
        self.grids = [(int(h), int(w)) for h, w in grids]
        self.offsets = np.concatenate([[0], np.cumsum([h * w for h, w in self.grids], dtype=np.int64)])
        if tokens.ndim != 2 or tokens.shape[0] != self.offsets[-1]:
            raise ValueError(f"ragged tokens: {tuple(tokens.shape)} does not hold the {self.offsets[-1]} tokens "
                             f"of {len(self.grids)} grids")

    def __len__(self) -> int:
        return len(self.grids)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def take(self, indices: Sequence[int]) -> np.ndarray:
        """Rows `indices`, all of one grid, stacked: (len(indices), N, D)."""
        grids = {self.grids[i] for i in indices}
        if len(grids) > 1:
            raise ValueError(f"ragged tokens: rows of different grids {sorted(grids)} cannot be stacked")
        return np.stack([self[i] for i in indices])

    def by_grid(self) -> dict[tuple[int, int], np.ndarray]:
        """Row indices per grid, in row order; grids in order of first appearance."""
        found: dict[tuple[int, int], list[int]] = {}
        for i, grid in enumerate(self.grids):
            found.setdefault(grid, []).append(i)
        return {grid: np.asarray(rows, np.int64) for grid, rows in found.items()}


def load_features(folder: str | os.PathLike, kind: str = "embedding") -> tuple[np.ndarray | RaggedTokens, list[str]]:
    """All rows of one feature kind from an `extract_features` folder, with each row's path: an (n, ...) array,
    or for a native-resolution model's tokens a `RaggedTokens` (rows of different grids)."""
    folder = Path(folder)
    index_path = folder / INDEX_NAME
    if not index_path.exists():
        raise FileNotFoundError(f"{index_path}: no feature index (is the extraction finished?)")
    index = json.loads(index_path.read_text())
    if kind not in index["features"]:
        raise ValueError(f"{folder}: holds {index['features']}, not {kind!r}")
    ragged = kind == "tokens" and index.get("tokens_layout") == "ragged"
    parts, paths, grids = [], [], []
    for shard in index["shards"]:
        if not shard["rows"]:
            continue
        parts.append(read_shard_array(folder, shard, kind, index["file_format"]))
        paths += shard["paths"]
        grids += shard.get("grids", [])
    if ragged:
        width = index["tokens_shape"][-1]
        return RaggedTokens(np.concatenate(parts) if parts else np.zeros((0, width), np.float32), grids), paths
    if not parts:
        shape = index.get(f"{kind}_shape", [0])
        return np.zeros((0, *shape), np.float32), []
    return np.concatenate(parts), paths
