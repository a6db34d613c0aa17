"""Feature extraction: the probe's features of every image under the inputs, written to a folder in shards
(`mlx-aim extract-features`), resumable, and read back by `load_features`.

`extract_features` runs the encoding pipeline (`encode.EncodeRun`) with `encode.probe_outputs` once per shard, into
a `ShardRows` sink that writes the shard (`shards.write_shard`) when it closes; a shard finished by an earlier run
with the same settings is reused. The folder's format is that of `mlx_aim.tasks.shards`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..data import NUM_WORKERS, Preprocessing, Skipped, is_native, preprocessing_for
from ..fileio import remove_stale_temporaries, write_json
from ..models.model import TrunkModel, dtype_name
from .classify import check_classifier
from .encode import BATCH_SIZE, EncodedBatch, EncodeRun, input_order, probe_outputs
from .shards import (
    FEATURES_FORMAT, FILE_FORMATS, INDEX_NAME, RUN_NAME, SAVE_DTYPES, SHARD_SIZE, RaggedTokens, read_shard,
    read_shard_array, shard_stem, write_shard,
)

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

    `features`: "embedding" (the probe's attention-pooled vector, (D,)), "tokens" (the probe layers'
    averaged patch tokens, (N, D)) or "both". Shard k holds the images k * shard_size ... in sorted path
    order (fewer rows where files were skipped); `file_format` "npy" writes `shard-k.embedding.npy` /
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
    c = model.config
    native = is_native(c)
    transform = preprocessing or preprocessing_for(c)
    run = EncodeRun(transform, batch_size=batch_size, num_workers=num_workers, group_by_shape=native,
                    progress=progress, desc="features")
    out = Path(out)
    paths = run.gather(inputs)
    roots = [Path(i).resolve() for i in inputs if Path(i).is_dir()]
    relative = [_relative(p, roots) for p in paths]
    record = {
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
    _prepare_output(out, record, overwrite)
    shards, shards_reused = [], 0
    encode = probe_outputs(model, kinds)
    with run.progress_bar(len(paths)):
        for lo in range(0, len(paths), shard_size):
            hi = min(lo + shard_size, len(paths))
            stem = shard_stem(lo // shard_size)
            done = read_shard(out, stem)
            if done is not None:
                for item in done["skipped"]:
                    run.skipped.add(item["path"], item["reason"], warn=False)
                shards.append(done)
                shards_reused += 1
                run.advance(hi - lo)
                continue
            sink = ShardRows(out, stem, kinds, file_format, SAVE_DTYPES[save_dtype], relative[lo:hi],
                             c.patch_size if native else None)
            run.encode(paths[lo:hi], encode, sink)
            shards.append(sink.shard)
    row = 0
    for shard in shards:
        shard["start"] = row
        row += shard["rows"]
    index = dict(record, num_rows=row, num_skipped=len(run.skipped), shards=shards, skipped=run.skipped.to_list(),
                 roots=[str(r) for r in roots])
    if "embedding" in kinds:
        index["embedding_shape"] = [c.width]
    if "tokens" in kinds:
        index["tokens_shape"] = [None if native else c.num_patches, c.width]
        if native:
            index["tokens_layout"] = "ragged"
    write_json(out / INDEX_NAME, index, indent=1)
    return ExtractResult(out, index, run.skipped, run.seconds, run.model_seconds, run.num_encoded, shards_reused)


class ShardRows:
    """`extract_features`' sink for one shard: each kind's rows in the save dtype as they come, written in input
    order as shard `stem` when the shard closes (`shards.write_shard`; `names`: the shard's inputs' paths as the
    index records them). With `patch_size` (a native-resolution model) each row's patch grid is recorded too, and
    its tokens are stored ragged."""

    def __init__(self, out: Path, stem: str, kinds: Sequence[str], file_format: str, dtype, names: Sequence[str],
                 patch_size: Optional[int] = None):
        self.out, self.stem, self.kinds, self.file_format, self.dtype = out, stem, kinds, file_format, dtype
        self.names, self.patch_size = names, patch_size
        self.rows: dict[str, list[np.ndarray]] = {kind: [] for kind in kinds}  # one (N, ...) array per image
        self.indices: list[int] = []
        self.grids: list[tuple[int, int]] = []
        self.shard: Optional[dict] = None  # its record, once written

    def add(self, batch: EncodedBatch) -> None:
        for kind in self.kinds:
            self.rows[kind] += list(batch.outputs[kind].astype(self.dtype, copy=False))
        self.indices += batch.indices
        if self.patch_size is not None:
            self.grids += [batch.grid(self.patch_size)] * len(batch)

    def close(self, skipped: Skipped) -> None:
        order = input_order(self.indices)  # grouped batches come out of input order
        arrays = {kind: [self.rows[kind][i] for i in order] for kind in self.kinds}
        record = {"paths": [self.names[self.indices[i]] for i in order]}
        if self.patch_size is not None:
            record["grids"] = [list(self.grids[i]) for i in order]
        self.shard = write_shard(self.out, self.stem, self.kinds, self.file_format, arrays, record, skipped.to_list())


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
