"""Threaded batching: images decoded and transformed by worker threads (Pillow releases the GIL), handed out in
a fixed order, with bounded look-ahead.

One engine (`_in_order`) runs the threads; two batchers use it, because their contracts differ:
- `BatchLoader` (training): shuffled, sharded over ranks, resumable at any batch, a fixed batch size (a broken
  file is replaced by a seeded draw), random numbers from (seed, epoch, sample).
- `iter_image_batches` (inference, features): every input once, in input order; a broken file is left out and
  recorded in `Skipped`, so the last batch may be short; labels of any kind ride along. For images of different
  sizes (native resolution) it groups equal shapes: a batch never mixes them.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from .. import platforms
from .datasets import NoUsableImages, Skipped
from .images import ImageLoadError

# Decoding threads: the default of both batchers and of the command lines (2 on Linux; a Mac's performance cores).
NUM_WORKERS = platforms.loader_threads(platforms.current(), platforms.probe_compute_threads())


def _in_order(fn: Callable, items: Iterable, num_workers: int, ahead: int) -> Iterator[tuple[Any, Any]]:
    """`(item, fn(item))` for each of `items`, in order. `num_workers` threads run `fn` on up to `ahead` items
    past the one being handed out; with 0 workers `fn` runs in the caller's thread. Closing the generator
    cancels what is queued and waits for what is running."""
    if num_workers == 0:
        for item in items:
            yield item, fn(item)
        return
    executor = ThreadPoolExecutor(num_workers, thread_name_prefix="mlx_aim-data")
    pending: deque[tuple[Any, Future]] = deque()
    try:
        for item in items:
            pending.append((item, executor.submit(fn, item)))
            if len(pending) > ahead:
                item, future = pending.popleft()
                yield item, future.result()
        while pending:
            item, future = pending.popleft()
            yield item, future.result()
    finally:
        for _, future in pending:
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------------
# Training batches: shuffled, sharded, resumable


# Streams of random numbers: a distinct first word keeps the permutation and the per-sample streams apart
# (numpy's SeedSequence treats [a, b] and [a, b, 0] alike, so keys are not only told apart by length).
_PERMUTATION_STREAM = 1
_SAMPLE_STREAM = 2


def _as_samples(samples: Any) -> list[tuple[Path, int]]:
    if hasattr(samples, "samples"):
        samples = samples.samples
    result = []
    for item in samples:
        if isinstance(item, (str, os.PathLike)):
            result.append((Path(item), -1))
        else:
            path, label = item
            result.append((Path(path), int(label)))
    return result


class BatchLoader:
    """Batches of `(images, labels, paths)`: float32 NHWC images, int32 labels (-1 for unlabelled samples)
    and the list of paths, decoded and transformed by `num_workers` threads (0: in the caller's thread) with
    up to `prefetch` batches in flight.

    `samples` is a list of (path, label) pairs, a list of paths, or an `ImageFolder`. `transform(path, rng)`
    returns one float32 HWC array (`TrainTransform`, `EvalTransform`); it should load with `load_image`, so
    that broken files raise `ImageLoadError`.

    Determinism. Epoch e visits `np.random.default_rng([1, seed, e]).permutation(len(samples))` (or the
    identity without `shuffle`); its first `len(samples) - len(samples) % world_size` entries are dealt to
    the ranks in turn (rank r takes entries r, r + world_size, ...), so every rank sees as many samples
    and the shards are disjoint. The sample at dataset index i in epoch e is transformed with
    `np.random.default_rng([2, seed, e, i, 0])`. Nothing depends on thread timing or `num_workers`.

    Broken files. A sample whose transform raises `ImageLoadError` is replaced, so batch shapes stay fixed:
    attempt k = 1, 2, ... uses `rng = np.random.default_rng([2, seed, e, i, k])`, draws a replacement index
    with `rng.integers(len(samples))` and transforms that sample with the same `rng`. Each failure warns
    once per file, counts in `num_skipped`, and lists (path, reason) in `skipped`. After `max_attempts`
    failures in a row for one slot, NoUsableImages.

    Position. `state_dict()` is (epoch, position): the epoch and the number of this rank's samples of it
    already yielded; it counts only batches handed out, not those being prefetched. `load_state_dict`
    resumes exactly there. Iterating yields the rest of the current epoch and moves to the next epoch; with
    `loop=True` it rolls over epochs forever (for step-based training). Without `drop_last` an epoch may
    end with a smaller batch. One iteration at a time per loader.
    """

    def __init__(
        self,
        samples: Any,
        batch_size: int,
        transform: Callable[[Any, np.random.Generator], np.ndarray],
        *,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int = NUM_WORKERS,
        prefetch: int = 4,
        epoch: int = 0,
        position: int = 0,
        rank: int = 0,
        world_size: int = 1,
        loop: bool = False,
        max_attempts: int = 10,
    ):
        self.samples = _as_samples(samples)
        if not self.samples:
            raise ValueError("BatchLoader: no samples")
        minimums = {"batch_size": (batch_size, 1), "seed": (seed, 0), "num_workers": (num_workers, 0),
                    "prefetch": (prefetch, 1), "epoch": (epoch, 0), "position": (position, 0),
                    "world_size": (world_size, 1), "max_attempts": (max_attempts, 1)}
        for name, (value, low) in minimums.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"BatchLoader {name}={value!r}: expected an integer >= {low}")
        if not 0 <= rank < world_size:
            raise ValueError(f"BatchLoader rank={rank!r}: expected an integer in [0, {world_size})")
        self.batch_size, self.transform, self.seed = int(batch_size), transform, int(seed)
        self.shuffle, self.drop_last, self.loop = shuffle, drop_last, loop
        self.num_workers, self.prefetch = int(num_workers), int(prefetch)
        self.max_attempts = int(max_attempts)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shard_size = len(self.samples) // self.world_size
        if len(self) == 0:
            raise ValueError(
                f"BatchLoader: {len(self.samples)} samples over {self.world_size} rank(s) give "
                f"{self.shard_size} per rank, fewer than one batch of {self.batch_size} (drop_last=True)"
            )
        self.skipped: list[tuple[Path, str]] = []
        self.num_skipped = 0
        self._bad: dict[Path, str] = {}  # written by workers: a cache only, results do not depend on it
        self.epoch, self.position = self._normalized(int(epoch), int(position))

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.drop_last:
            return self.shard_size // self.batch_size
        return -(-self.shard_size // self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Dataset indices this rank visits in `epoch`, in order."""
        count = len(self.samples)
        if self.shuffle:
            order = np.random.default_rng([_PERMUTATION_STREAM, self.seed, epoch]).permutation(count)
        else:
            order = np.arange(count)
        return order[self.rank : self.shard_size * self.world_size : self.world_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples": len(self.samples), "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("num_samples", len(self.samples)),
                          ("world_size", self.world_size)):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"BatchLoader state has {key}={state[key]}, this loader {mine}: "
                                 "the sequence would not continue exactly")
        self.epoch, self.position = self._normalized(int(state["epoch"]), int(state["position"]))

    def _normalized(self, epoch: int, position: int) -> tuple[int, int]:
        """Move a position with no batch left in its epoch to the start of the next epoch."""
        remaining = self.shard_size - position
        if remaining <= 0 or (self.drop_last and remaining < self.batch_size):
            return epoch + 1, 0
        return epoch, position

    def _plans(self) -> Iterator[tuple[int, np.ndarray, tuple[int, int]]]:
        """(epoch, dataset indices, state after the batch) for the batches to come."""
        epoch, position = self.epoch, self.position
        order, order_epoch = None, None
        while True:
            if order_epoch != epoch:
                order, order_epoch = self.epoch_order(epoch), epoch
            indices = order[position : position + self.batch_size]
            after = self._normalized(epoch, position + len(indices))
            yield epoch, indices, after
            if after[0] != epoch and not self.loop:
                return
            epoch, position = after

    def _load_sample(self, epoch: int, index: int) -> tuple[np.ndarray, int, Path, list]:
        failures = []
        for attempt in range(self.max_attempts):
            rng = np.random.default_rng([_SAMPLE_STREAM, self.seed, epoch, int(index), attempt])
            chosen = int(index) if attempt == 0 else int(rng.integers(len(self.samples)))
            path, label = self.samples[chosen]
            reason = self._bad.get(path)
            if reason is None:
                try:
                    return np.asarray(self.transform(path, rng), dtype=np.float32), label, path, failures
                except ImageLoadError as error:
                    reason = self._bad[path] = error.reason
            failures.append((path, reason))
        listed = "; ".join(f"{p}: {r}" for p, r in failures[:3])
        raise NoUsableImages(
            f"BatchLoader: {self.max_attempts} samples in a row failed to load ({listed}, ...)"
        )

    def _collate(self, results: list) -> tuple[np.ndarray, np.ndarray, list[Path]]:
        known = {path for path, _ in self.skipped}
        for _, _, used, failures in results:
            for path, reason in failures:
                self.num_skipped += 1
                if path not in known:
                    known.add(path)
                    self.skipped.append((path, reason))
                    warnings.warn(f"BatchLoader: skipping {path} ({reason}); replaced by {used}")
        images = np.stack([r[0] for r in results])
        labels = np.asarray([r[1] for r in results], dtype=np.int32)
        return images, labels, [r[2] for r in results]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, list[Path]]]:
        # One task per sample; a batch's last sample carries the loader's state after that batch.
        tasks = ((epoch, int(index), after if k == len(indices) - 1 else None)
                 for epoch, indices, after in self._plans() for k, index in enumerate(indices))
        loads = _in_order(lambda task: self._load_sample(task[0], task[1]), tasks, self.num_workers,
                          self.prefetch * self.batch_size)  # `prefetch` batches in flight while one is used
        results = []
        with closing(loads):
            for (_, _, after), result in loads:
                results.append(result)
                if after is not None:
                    self.epoch, self.position = after
                    yield self._collate(results)
                    results = []


# ----------------------------------------------------------------------------------------------------
# Inference batches: every input once, in order, broken files left out


def _try_transform(transform: Callable, item: tuple) -> tuple[Optional[np.ndarray], Optional[str]]:
    try:
        return transform(item[0]), None
    except ImageLoadError as e:
        return None, e.reason


def iter_image_batches(
    paths: Sequence[Path],
    transform: Callable,
    batch_size: int,
    skipped: Skipped,
    *,
    num_workers: int = NUM_WORKERS,
    prefetch: int = 2,
    labels: Optional[Sequence] = None,
    group_by_shape: bool = False,
    max_pending: Optional[int] = None,
) -> Iterator[tuple[np.ndarray, list, list]]:
    """(images NHWC float32, paths, labels), `transform(path)` run by `num_workers` threads (0: in the
    caller's thread) on up to `(prefetch + 1) * batch_size` files past the one being handed out; files that
    fail to load are recorded in `skipped` and left out, so batches may be short. `labels` (one per path, of
    any kind) ride along; None gives None labels.

    Without `group_by_shape` the batches follow the input order. With it (images of different sizes, as at
    native resolution) a batch holds images of one shape only, in input order; a shape's batch is handed out
    when it is full, or when more than `max_pending` images (default `4 * batch_size`) wait in unfilled
    batches: then the batch holding the longest-waiting image goes out short, which bounds the memory held.
    The rest go out at the end, oldest first. Batches of different shapes thus interleave out of input order:
    pass the input index in `labels` to put results back in order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive integer")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers}: expected an integer >= 0")
    max_pending = 4 * batch_size if max_pending is None else max_pending
    if max_pending < batch_size:
        raise ValueError(f"max_pending={max_pending}: expected at least batch_size={batch_size}")
    labels = list(labels) if labels is not None else [None] * len(paths)
    loads = _in_order(lambda item: _try_transform(transform, item), zip(paths, labels), num_workers,
                      batch_size * (prefetch + 1))
    # Unfilled batches by shape, oldest first: a dict keeps insertion order, and a shape's batch is re-inserted
    # at the end when it starts again after going out.
    batches: dict[Any, list[tuple[np.ndarray, Path, Any]]] = {}
    pending = 0
    with closing(loads):
        for (path, label), (image, reason) in loads:
            if image is None:
                skipped.add(path, reason)
                continue
            key = image.shape if group_by_shape else None
            batches.setdefault(key, []).append((image, path, label))
            pending += 1
            if len(batches[key]) == batch_size:
                key_out = key
            elif pending > max_pending:
                key_out = next(iter(batches))
            else:
                continue
            batch = batches.pop(key_out)
            pending -= len(batch)
            yield _stack(batch)
    for batch in batches.values():
        yield _stack(batch)


def _stack(batch: list[tuple[np.ndarray, Path, Any]]) -> tuple[np.ndarray, list, list]:
    images, paths, labels = zip(*batch)
    return np.stack(images), list(paths), list(labels)
