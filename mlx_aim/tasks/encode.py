"""The image-encoding pipeline: images in, a model's outputs out as numpy, batch by batch, into a sink.

Every job that runs a model over image files goes through it: `classify` (top-k rows), `extract_features` (feature
shards), the probe's `compute_features` (its feature cache) and search's `build_index` (index shards). Each gives
an encode function (a batch of preprocessed images -> named MLX arrays) and a sink; the pipeline does the rest, in
one place:

- inputs: `EncodeRun.gather` finds the image files that command-line inputs name (files, folders, globs), an
  input that names none recorded as skipped; `EncodeRun.encode` takes paths or (path, label) samples;
- batching: `data.iter_image_batches` (threaded decoding, `batch_size` images a batch); with `group_by_shape` (a
  native-resolution model) a batch holds images of one patch grid, so batches come out of input order, and each
  row carries its input position (`EncodedBatch.indices`) for the sink to put results back in order;
- skipped files: a file that cannot be used is left out, logged once when met, and listed in the chunk's `Skipped`
  (handed to the sink when the chunk closes) and in the run's (`EncodeRun.skipped`), in the order met;
- timing: `EncodeRun.seconds` is wall time since the run began (finding files, decoding, writing: what the
  commands report as images/s), `EncodeRun.model_seconds` the time from a batch's pixels to its evaluated outputs
  (`mx.array`, the encode function, `mx.eval`: the "model images/s" figures);
- progress: one tqdm bar per run (`EncodeRun.progress_bar`), counting images encoded, skipped, and reused from an
  earlier run (`EncodeRun.advance`).

A sink has two methods: `add(batch)`, called once per batch with an `EncodedBatch`, and `close(skipped)`, called
once after a chunk's last batch with the files left out of it. A sharded job (`extract_features`, `build_index`)
calls `EncodeRun.encode` once per shard with a fresh sink, which writes the shard on `close`: a run killed midway
keeps the shards it finished.

The encode functions of the AIM and AIMv2 models are here (`top_k_classes`, `probe_outputs`): the jobs' only calls
into their model API. The LiT's is `lit.embed_images`, which search wraps. `peak_memory` is the third figure each
command reports beside the two timings.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .. import platforms
from ..data import NUM_WORKERS, Skipped, gather_images, iter_image_batches

BATCH_SIZE = 32  # the default of the library functions and the command lines

# A batch of preprocessed images (B, H, W, C) -> named outputs, each (B, ...), evaluated by the pipeline.
Encode = Callable[[mx.array], dict[str, mx.array]]


# ---------------------------------------------------------------------------------------------------
# Arrays and memory


def to_numpy(a: mx.array, dtype=np.float32) -> np.ndarray:
    """numpy copy of an MLX array, as `dtype` (None: its own); bfloat16 goes through float32 (numpy has no
    bfloat16)."""
    if a.dtype == mx.bfloat16:
        a = a.astype(mx.float32)
    return np.asarray(a) if dtype is None else np.asarray(a).astype(dtype, copy=False)


def peak_memory() -> dict:
    """Peak resident memory of this process (ru_maxrss) and MLX's peak allocation, both in bytes."""
    return {"peak_rss_bytes": platforms.peak_rss_bytes(), "peak_mlx_bytes": int(mx.get_peak_memory())}


# ---------------------------------------------------------------------------------------------------
# Encode functions: the model calls


def top_k_classes(model, top_k: int) -> Encode:
    """The `top_k` classes of `model(images)` (a classifier's logits) by softmax probability: "classes" (B, k)
    indices, best first, and their "probabilities" (B, k) float32."""

    def encode(images: mx.array) -> dict[str, mx.array]:
        probs = mx.softmax(model(images).astype(mx.float32), axis=-1)
        order = mx.argsort(-probs, axis=-1)[:, :top_k]
        return {"classes": order, "probabilities": mx.take_along_axis(probs, order, axis=-1)}

    return encode


def probe_outputs(model, kinds: Sequence[str] = ("tokens",)) -> Encode:
    """What the probe reads, per kind: "tokens", the probe layers' averaged patch tokens `model.probe_features`
    (B, N, D), and "embedding", the probe head's attention-pooled vector of them (B, D)."""

    def encode(images: mx.array) -> dict[str, mx.array]:
        tokens = model.probe_features(images)
        outputs = {"tokens": tokens}
        if "embedding" in kinds:
            outputs["embedding"] = model.head.pool(tokens)
        return {kind: outputs[kind] for kind in kinds}

    return encode


# ---------------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class EncodedBatch:
    """One batch through the encode function: `outputs` by name, as numpy (B, ...) arrays of their own dtype
    (bfloat16 as float32); each row's path, label (None for a bare path) and position in the chunk's inputs; and
    the batch's image size (height, width) after preprocessing, one for the whole batch."""

    outputs: dict[str, np.ndarray]
    paths: list[Path]
    labels: list
    indices: list[int]
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.paths)

    def grid(self, patch_size: int) -> tuple[int, int]:
        """The batch's patch grid (rows, cols) for `patch_size`-pixel patches."""
        return self.image_size[0] // patch_size, self.image_size[1] // patch_size


class Sink(Protocol):
    """Where a chunk's outputs go (module docstring)."""

    def add(self, batch: EncodedBatch) -> None: ...

    def close(self, skipped: Skipped) -> None: ...


def _as_sample(item: Any) -> tuple[Path, Any]:
    if isinstance(item, (str, os.PathLike)):
        return Path(item), None
    path, label = item
    return Path(path), label


class EncodeRun:
    """One run of the pipeline: its clock, its skipped inputs, its progress bar, and the settings every chunk
    shares. `preprocessing(path)` gives one image's float32 (H, W, C) model input (`data.Preprocessing`);
    `group_by_shape` batches images of one size together (native resolution); `progress` shows a tqdm bar named
    `desc`. The clock starts when the run is made."""

    def __init__(self, preprocessing: Callable, *, batch_size: int = BATCH_SIZE, num_workers: int = NUM_WORKERS,
                 group_by_shape: bool = False, progress: bool = True, desc: str = "encode"):
        self.started = time.perf_counter()
        self.preprocessing = preprocessing
        self.batch_size, self.num_workers, self.group_by_shape = batch_size, num_workers, group_by_shape
        self.show_progress, self.desc = progress, desc
        self.skipped = Skipped()
        self.model_seconds = 0.0
        self.num_encoded = 0  # images through the encode function
        self._bar: Optional[tqdm] = None

    @property
    def seconds(self) -> float:
        """Wall seconds since the run was made."""
        return time.perf_counter() - self.started

    def gather(self, inputs: Sequence) -> list[Path]:
        """The image files `inputs` (files, folders, globs) name, each once, in order; an input that names none is
        recorded in `skipped`."""
        return gather_images(inputs, self.skipped)

    @contextlib.contextmanager
    def progress_bar(self, total: int) -> Iterator[None]:
        """Shows one bar over `total` images for the `encode` calls inside (a bar per call otherwise)."""
        with tqdm(total=total, desc=self.desc, unit="img", disable=not self.show_progress or None) as bar:
            self._bar, outer = bar, self._bar
            try:
                yield
            finally:
                self._bar = outer

    def advance(self, count: int) -> None:
        """Counts `count` images on the bar that need no encoding (a finished shard of an earlier run)."""
        if self._bar is not None:
            self._bar.update(count)

    def encode(self, images: Sequence, encode: Encode, sink: Sink) -> Skipped:
        """Runs `images` (paths, or (path, label) samples) through the preprocessing and `encode`, batch by batch,
        into `sink` (`add` each batch, then `close` with the files left out); returns those files, also added to
        the run's `skipped`."""
        if self._bar is None:
            with self.progress_bar(len(images)):
                return self.encode(images, encode, sink)
        samples = [_as_sample(item) for item in images]
        skipped = Skipped()
        batches = iter_image_batches([path for path, _ in samples], self.preprocessing, self.batch_size, skipped,
                                     num_workers=self.num_workers, labels=range(len(samples)),
                                     group_by_shape=self.group_by_shape)
        with contextlib.closing(batches):
            for pixels, paths, indices in batches:
                tick = time.perf_counter()
                outputs = encode(mx.array(pixels))
                mx.eval(outputs)
                self.model_seconds += time.perf_counter() - tick
                outputs = {name: to_numpy(value, None) for name, value in outputs.items()}
                sink.add(EncodedBatch(outputs, paths, [samples[i][1] for i in indices], indices,
                                      (pixels.shape[1], pixels.shape[2])))
                self.num_encoded += len(paths)
                self.advance(len(paths))
        self.advance(len(skipped))
        sink.close(skipped)
        for path, reason in skipped.items:
            self.skipped.add(path, reason, warn=False)  # logged when met
        return skipped


def input_order(indices: Sequence[int]) -> np.ndarray:
    """The permutation that puts rows received with input positions `indices` back in input order."""
    return np.argsort(np.asarray(indices, np.int64), kind="stable")
