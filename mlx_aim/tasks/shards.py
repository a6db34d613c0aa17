"""Feature shards on disk: the one writer and reader of `extract_features` folders and search indexes.

A shard is rows of one or more feature kinds ("embedding", "tokens") plus its record `shard-k.json`:

    shard-00003.embedding.npy   (rows, ...)   or one shard-00003.safetensors with a key per kind
    shard-00003.json            {"name", "rows", "files": {kind: file name}, "paths", ..., "skipped"}

The arrays are written first, each atomically (`fileio.atomic_file`), and the record last: a shard whose record
is there is finished, so a killed run keeps every shard it finished. What a record holds besides the name, row
count, files and skipped inputs is the writer's (`extract_features`: the rows' paths and grids; search: the
rows' paths, sizes and modification times). A native-resolution model's tokens are stored ragged, read back as
`RaggedTokens`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from ..fileio import atomic_file, write_json
from ..checkpoints.weights import read_safetensors

FEATURES_FORMAT = "mlx-aim-features"
INDEX_NAME = "index.json"  # written at the end of a run: every shard, in order
RUN_NAME = "run.json"  # written at the start of a run: its settings, which a resumed run must share
SAVE_DTYPES = {"float32": np.float32, "float16": np.float16}
FILE_FORMATS = ("npy", "safetensors")
SHARD_SIZE = 1024  # rows a shard, the default of the writers and their command lines


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


def shard_stem(index: int) -> str:
    """The name shard `index`'s files start with: shard-00007."""
    return f"shard-{index:05d}"


def shard_number(stem: str) -> Optional[int]:
    """`shard_stem`'s inverse: 7 for "shard-00007", None for any other name."""
    prefix, _, digits = stem.partition("-")
    return int(digits) if prefix == "shard" and digits.isdigit() else None


def shard_files(stem: str, kinds: Sequence[str], file_format: str) -> dict[str, str]:
    """File name per feature kind: one .npy each, or one .safetensors holding them all."""
    if file_format == "npy":
        return {kind: f"{stem}.{kind}.npy" for kind in kinds}
    return {kind: f"{stem}.safetensors" for kind in kinds}


def read_shard(folder: str | os.PathLike, stem: str) -> Optional[dict]:
    """A finished shard's record, or None when it is not finished (no record, an unreadable one, or a missing
    array file) and has to be (re)computed."""
    folder = Path(folder)
    marker = folder / f"{stem}.json"
    if not marker.exists():
        return None
    try:
        shard = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(shard, dict) or not isinstance(shard.get("files"), dict):
        return None
    if shard.get("rows", 0) and not all((folder / name).exists() for name in shard["files"].values()):
        return None
    return shard


def write_shard(folder: str | os.PathLike, stem: str, kinds: Sequence[str], file_format: str,
                arrays: dict[str, list[np.ndarray]], record: dict, skipped: Sequence[dict]) -> dict:
    """Writes one shard's rows (`arrays`: kind -> one array per row; stacked, or for ragged tokens, a record
    with "grids", laid one after another) and then its record (`record`, which must hold "paths", one per row,
    plus the writer's own fields; `skipped`: the inputs it left out, as dicts), which marks it finished."""
    folder = Path(folder)
    rows = len(record["paths"])
    files = shard_files(stem, kinds, file_format) if rows else {}
    if rows:
        ragged = "grids" in record
        stacked = {kind: np.concatenate(arrays[kind]) if ragged and kind == "tokens" else np.stack(arrays[kind])
                   for kind in kinds}
        if file_format == "npy":
            for kind in kinds:
                with atomic_file(folder / files[kind]) as tmp:
                    np.save(tmp, stacked[kind])
        else:
            with atomic_file(folder / files[kinds[0]]) as tmp:
                mx.save_safetensors(str(tmp), {k: mx.array(v) for k, v in stacked.items()},
                                    metadata={"format": FEATURES_FORMAT})
    shard = {"name": stem, "rows": rows, "files": files, **record, "skipped": list(skipped)}
    write_json(folder / f"{stem}.json", shard, indent=1)  # last: marks it finished
    return shard


def read_shard_array(folder: str | os.PathLike, shard: dict, kind: str, file_format: str,
                     mmap: bool = False) -> np.ndarray:
    """One feature kind's rows of a finished shard; with `mmap` (.npy only) a read-only memory map, so a reader
    that scans many shards pages them in instead of copying them."""
    file = Path(folder) / shard["files"][kind]
    if file_format == "npy":
        return np.load(file, mmap_mode="r" if mmap else None)
    return np.asarray(read_safetensors(file)[kind])


def remove_shard(folder: str | os.PathLike, stem: str) -> None:
    """Deletes a shard: its record first (so a kill midway leaves an unfinished shard, never a record without
    its rows), then its array files."""
    folder = Path(folder)
    (folder / f"{stem}.json").unlink(missing_ok=True)
    for path in folder.glob(f"{stem}.*"):
        path.unlink(missing_ok=True)
