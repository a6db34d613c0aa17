"""Photo search with an AIMv2-LiT: an index of a photo folder's image embeddings, kept up to date by re-runs, and
queries by text or by an example image, answered with the top-k photos and their cosine similarities.

    model, tokenizer = open_lit("aimv2-large-patch14-224-lit")
    build_index(model, ["~/Pictures"], "photos.index", model_name="aimv2-large-patch14-224-lit")
    index = SearchIndex.open("photos.index")
    hits = index.search(embed_texts(model, tokenizer, ["a red bicycle at night"])[0], top_k=10)
    hits = index.search(index.stored_embedding("~/Pictures/bike.jpg"), top_k=10)  # no model needed

Queries that add and subtract texts and images (`"2:dog + ./my_dog.jpg - people"`) are `mlx_aim.tasks.query`'s.

The index folder is a feature folder in `extract_features`'s shard format (`mlx_aim.tasks.shards`): finished
`shard-k.embedding.npy` + `shard-k.json` pairs, `run.json` (the model's identity, written first) and
`index.json` (written last: the shards, in order, with each row's path). Rows are unit-length image embeddings
(`lit.embed_images`), so a dot product is the cosine similarity; `load_features(INDEX)` reads them as features.

Kept up to date. A file is known by its absolute path, size in bytes and modification time in nanoseconds
(`os.stat`'s `st_size`, `st_mtime_ns`): a re-run embeds only files whose triple is new, drops rows whose file is
gone or changed, and keeps every other row where it is. A shard that lost rows is rewritten with the rest (no model
call); shards only ever get new numbers, so a run killed at any point leaves finished shards that the next run
reuses (for a file in two shards, the newer shard's row). Files that cannot be read are listed in the index with
their triple and are not retried until they change.

Moved, renamed and copied files. Each row also holds its file's content fingerprint (sha256 of its bytes,
`content_fingerprint`), computed only for a file whose (size, mtime) stamp is new. A new stamp whose fingerprint
is a row's (a file moved or renamed, a copy, a file touched) takes that row's embedding without a model call; so
does a second copy met in the same run. Rows written before fingerprints existed have none: they are never
matched by content (a moved old file is embedded once more, and has a fingerprint from then on). Rows sharing a
fingerprint are exact duplicates, listed in the result.

What is walked. Folders are walked by `data.WalkRules`: hidden names are skipped unless `include_hidden`, and
`exclude_dirs` (folder names at any depth, or folder paths) are left out; the index records both with its
inputs, so a re-run with the recorded inputs walks the same files.

One writer at a time. A writer holds an OS lock on the folder's `writer.lock` (`platforms.lock_file`: flock on
Linux and macOS) from before it reads the folder until it has written index.json. A second writer stops with
`IndexBusy` naming the holder's pid, or waits for it (`wait=True`); the kernel drops a killed writer's lock.

One model per index. `run.json` records the model's config, dtype, preprocessing and a hash of its image side's
small tensors (`weights_fingerprint`: the rows are image embeddings, so the image side is what identifies the
model; an image-only load, `load(..., text_tower=False)`, gives the same); an index is not updated nor queried with
a model that differs in any of them.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .. import platforms
from ..data import NUM_WORKERS, Preprocessing, Skipped, WalkRules, gather_images, preprocessing_for
from ..fileio import read_json, remove_stale_temporaries, write_json
from .encode import BATCH_SIZE, EncodedBatch, EncodeRun, to_numpy
from .lit import check_lit, embed_images
from ..models.model import AIMv2LiT, dtype_name
from .shards import (
    INDEX_NAME, RUN_NAME, SAVE_DTYPES, SHARD_SIZE, read_shard, read_shard_array, remove_shard, shard_number,
    shard_stem, write_shard,
)

SEARCH_FORMAT = "mlx-aim-search"
KIND = "embedding"
FILE_FORMAT = "npy"  # memory-mapped by queries
TOP_K = 10
# What makes two models give the same embeddings; the model's name is recorded too, but only to be shown.
IDENTITY_KEYS = ("model_config", "model_dtype", "preprocessing", "image_weights_sha256")
LOCK_NAME = "writer.lock"  # flock-ed by the one writer; holds its pid

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Files and models


Stamp = tuple[int, int]  # (size in bytes, modification time in ns)


def file_stamp(path: str | os.PathLike) -> Stamp:
    """A file's (size, st_mtime_ns): what tells an indexed file has changed."""
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def content_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, hex: what tells a moved, renamed or copied file is one already embedded. sha256
    rather than blake2b: CPUs with SHA extensions (Apple silicon, recent x86) hash it faster through OpenSSL than
    blake2b's software loop, and `shasum -a 256 FILE` prints the same value."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def index_key(path: str | os.PathLike) -> str:
    """How the index names a file: its absolute path, symbolic links kept as the user named them."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def weights_fingerprint(model: AIMv2LiT) -> str:
    """sha256 of the image side's tensors outside its trunk blocks (patch embedding, position embedding, pooling
    head, image projection: a few MB at full size), in float32: tells two image sides of one config apart cheaply,
    whether or not the text tower was loaded."""
    digest = hashlib.sha256()
    for key, value in sorted(tree_flatten(model.parameters())):
        if not key.startswith(("image_encoder.", "image_projector.")) or ".trunk.blocks." in key:
            continue
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(to_numpy(value)).tobytes())
    return digest.hexdigest()


def model_identity(model: AIMv2LiT, model_name: str = "", preprocessing: Optional[Preprocessing] = None) -> dict:
    """What an index records of the model that fills it: its name (shown, not compared) and `IDENTITY_KEYS`."""
    model = check_lit(model, model_name)
    preprocessing = preprocessing or preprocessing_for(model.config.image)
    return {"model": model_name, "model_config": model.config.to_dict(), "model_dtype": dtype_name(model.dtype),
            "preprocessing": preprocessing.settings(), "image_weights_sha256": weights_fingerprint(model)}


def check_identity(folder: Path, recorded: Mapping, identity: Mapping, keys: Sequence[str] = IDENTITY_KEYS) -> None:
    """A ValueError naming both models when `identity` differs from the index's `recorded` one in any of `keys`."""
    differ = [k for k in keys if recorded.get(k) != identity.get(k)]
    if differ:
        raise ValueError(
            f"{folder}: the index was built with {recorded.get('model') or 'another model'}, and "
            f"{identity.get('model') or 'the model given'} differs from it in {', '.join(differ)}; use the model "
            "the index was built with, or build a new index (another --out) with this one")


def recorded_run(folder: str | os.PathLike) -> Optional[dict]:
    """What an index folder records of its last run (index.json; run.json when its first run did not finish):
    its model's name and identity, and (index.json) its inputs. None for a folder that is no search index."""
    for name in (INDEX_NAME, RUN_NAME):
        path = Path(folder) / name
        if path.is_file():
            record = read_json(path)
            return record if isinstance(record, dict) and record.get("format") == SEARCH_FORMAT else None
    return None


# ---------------------------------------------------------------------------------------------------
# One writer at a time


class IndexBusy(BlockingIOError):
    """Another process is writing the index (its pid in the message); raised instead of waiting for it."""


class WriterLock:
    """The one-writer lock of an index folder: `platforms.lock_file` on `writer.lock`, which records the holder's
    pid for the message a second writer gets. Released by `release`, or by the kernel when the holder dies."""

    def __init__(self, folder: str | os.PathLike, wait: bool = False):
        self.path = Path(folder) / LOCK_NAME
        self.fd: Optional[int] = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not platforms.lock_file(self.fd, wait=False):
                holder = self.holder()
                if not wait:
                    raise IndexBusy(f"{Path(folder)}: another indexer (pid {holder}) is updating this index; "
                                    "let it finish, or run with --wait to start after it")
                log.warning("%s: waiting for the indexer with pid %s to finish", Path(folder), holder)
                platforms.lock_file(self.fd, wait=True)
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            self.release()
            raise

    def holder(self) -> str:
        """The pid the lock file records ("unknown" before its holder wrote it)."""
        try:
            text = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            text = ""
        return text if text.isdigit() else "unknown"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the lock; the file stays, for the next writer
            self.fd = None


# ---------------------------------------------------------------------------------------------------
# Writing an index


@dataclass
class Plan:
    """What an update does: the finished shards kept as they are, the rows to carry into new shards (shard record,
    row indices), the files to embed (key -> stamp), and the counts of rows reused and dropped."""

    keep: list[dict] = field(default_factory=list)
    carry: list[tuple[dict, list[int], list[dict]]] = field(default_factory=list)  # shard, rows, skipped entries
    embed: dict[str, Stamp] = field(default_factory=dict)
    dead: list[str] = field(default_factory=list)  # shard stems to delete once the new index is written
    num_reused: int = 0
    num_dropped: int = 0
    known_bad: list[dict] = field(default_factory=list)  # unreadable files of earlier runs, unchanged since
    by_fingerprint: dict[str, tuple[dict, int]] = field(default_factory=dict)  # every fingerprinted row: shard, row


class IndexFolder:
    """A search index folder being written: created or reopened for the model `identity` (`model_identity`) under
    its writer lock (`WriterLock`; `wait` for another writer, else `IndexBusy`), it reconciles its finished shards
    with the files there are now (`plan`), takes new shards (`add_shard`, `copy_rows`) and ends with `finish`,
    which writes index.json and deletes the shards it no longer lists; `close` (or leaving a `with`) unlocks it."""

    def __init__(self, folder: str | os.PathLike, identity: Mapping, save_dtype: Optional[str] = None,
                 wait: bool = False):
        self.folder = Path(folder)
        if save_dtype is not None and save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype={save_dtype!r}: expected one of {', '.join(SAVE_DTYPES)}")
        self._check_is_index()  # before the lock file is made in someone's photo folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = WriterLock(self.folder, wait)
        try:
            self._open(identity, save_dtype)  # read under the lock: the last writer's folder, whole
        except BaseException:
            self.close()
            raise

    def _check_is_index(self) -> None:
        if self.folder.exists() and any(p.name != LOCK_NAME for p in self.folder.iterdir()):
            if not (self.folder / RUN_NAME).is_file():
                raise ValueError(f"{self.folder}: exists and is not a search index (no {RUN_NAME}); choose an empty "
                                 "or new folder")

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> "IndexFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self, identity: Mapping, save_dtype: Optional[str]) -> None:
        folder = self.folder
        run_path = folder / RUN_NAME
        self._check_is_index()
        if run_path.is_file():
            run = read_json(run_path)
            if not isinstance(run, dict) or run.get("format") != SEARCH_FORMAT:
                raise ValueError(f"{run_path}: not a search index's record (format {SEARCH_FORMAT!r} expected)")
            check_identity(folder, run, identity)
            if save_dtype is not None and save_dtype != run["dtype"]:
                raise ValueError(f"{folder}: stores {run['dtype']} embeddings, not {save_dtype}; keep its dtype or "
                                 "build a new index")
            remove_stale_temporaries(folder)  # shard files of an earlier run killed mid-write
        else:
            run = {"format": SEARCH_FORMAT, "version": 1, **identity, "features": [KIND], "file_format": FILE_FORMAT,
                   "dtype": save_dtype or "float32"}
            write_json(run_path, run, indent=1)
        self.run = run
        self.identity = dict(identity)
        self.dtype = SAVE_DTYPES[run["dtype"]]
        self.shards: list[dict] = []
        self.next_number = max(self._shard_numbers(), default=-1) + 1  # new shards never reuse a number

    def _shard_numbers(self) -> list[int]:
        stems = {path.name.split(".")[0] for path in self.folder.glob("shard-*")}
        return [n for n in map(shard_number, stems) if n is not None]

    def _finished_shards(self) -> list[dict]:
        """Finished shards, newest first; the remains of unfinished ones are deleted."""
        finished = []
        for number in sorted(self._shard_numbers(), reverse=True):
            shard = read_shard(self.folder, shard_stem(number))
            if shard is None:
                remove_shard(self.folder, shard_stem(number))
            else:
                finished.append(shard)
        return finished

    def plan(self, files: Mapping[str, Stamp]) -> Plan:
        """Matches the finished shards' rows and known-bad files against `files` (index key -> stamp, the files
        there are now): rows of unchanged files are kept (each file once, from the newest shard holding it), the
        others dropped; files in no shard are to embed."""
        plan, claimed = Plan(), set()
        for shard in self._finished_shards():
            rows = [i for i, (path, size, mtime) in enumerate(zip(shard["paths"], shard["sizes"], shard["mtimes_ns"]))
                    if files.get(path) == (size, mtime) and path not in claimed]
            bad = [item for item in shard["skipped"]
                   if files.get(item["path"]) == (item.get("size"), item.get("mtime_ns"))
                   and item["path"] not in claimed]
            claimed.update(shard["paths"][i] for i in rows)
            for i, fingerprint in enumerate(shard.get("fingerprints") or ()):
                if fingerprint:  # rows of files gone or changed too: a moved file finds its old row here
                    plan.by_fingerprint.setdefault(fingerprint, (shard, i))
            claimed.update(item["path"] for item in bad)
            plan.num_reused += len(rows)
            plan.num_dropped += shard["rows"] - len(rows)
            plan.known_bad += bad
            if len(rows) == shard["rows"] and len(bad) == len(shard["skipped"]):
                plan.keep.append(shard)
            else:
                plan.dead.append(shard["name"])
                if rows or bad:
                    plan.carry.append((shard, rows, bad))
        plan.keep.reverse()  # oldest first, as they were written
        plan.embed = {path: stamp for path, stamp in files.items() if path not in claimed}
        return plan

    def add_shard(self, paths: Sequence[str], stamps: Sequence[Stamp], embeddings: Sequence[np.ndarray] | np.ndarray,
                  skipped: Sequence[dict] = (), fingerprints: Optional[Sequence[Optional[str]]] = None) -> dict:
        """Writes a finished shard of rows (`paths` by index key, their stamps, unit-length embeddings and content
        fingerprints, None where unknown) and the unreadable files met (dicts with "path", "reason", "size",
        "mtime_ns"); returns its record."""
        stem = shard_stem(self.next_number)
        self.next_number += 1
        rows = [np.asarray(e, dtype=self.dtype) for e in embeddings]
        fingerprints = list(fingerprints) if fingerprints is not None else [None] * len(paths)
        record = {"paths": list(paths), "sizes": [s for s, _ in stamps], "mtimes_ns": [m for _, m in stamps],
                  "fingerprints": fingerprints}
        shard = write_shard(self.folder, stem, [KIND], FILE_FORMAT, {KIND: rows}, record, skipped)
        self.shards.append(shard)
        return shard

    def copy_rows(self, sources: Sequence[tuple[dict, int]], paths: Sequence[str], stamps: Sequence[Stamp],
                  fingerprints: Sequence[Optional[str]], skipped: Sequence[dict] = ()) -> dict:
        """A new shard whose row i is row `sources[i]` = (shard, row) of a finished shard, read back (not recomputed),
        under `paths[i]`, `stamps[i]` and `fingerprints[i]`; with the `skipped` entries."""
        arrays: dict[str, np.ndarray] = {}
        embeddings = []
        for shard, row in sources:
            if shard["name"] not in arrays:
                arrays[shard["name"]] = read_shard_array(self.folder, shard, KIND, FILE_FORMAT, mmap=True)
            embeddings.append(np.array(arrays[shard["name"]][row]))
        return self.add_shard(paths, stamps, embeddings, skipped, fingerprints)

    def carry(self, shard: dict, rows: Sequence[int], skipped: Sequence[dict]) -> dict:
        """A new shard holding `rows` of an earlier `shard` (read back, not recomputed) and its `skipped` entries."""
        fingerprints = shard.get("fingerprints") or [None] * shard["rows"]
        return self.copy_rows([(shard, i) for i in rows], [shard["paths"][i] for i in rows],
                              [(shard["sizes"][i], shard["mtimes_ns"][i]) for i in rows],
                              [fingerprints[i] for i in rows], skipped)

    def finish(self, kept: Sequence[dict], dead: Iterable[str], extra: Mapping) -> dict:
        """Writes index.json over the `kept` shards then the ones added, deletes the `dead` shards, and returns
        the index; `extra` (inputs, skipped inputs) goes into it as well."""
        shards = list(kept) + self.shards
        row = 0
        for shard in shards:
            shard["start"] = row
            row += shard["rows"]
        bad = [item for shard in shards for item in shard["skipped"]]
        width = self.identity["model_config"]["projection_dim"]
        index = {**self.run, **self.identity, **extra, "num_rows": row, "embedding_shape": [width],
                 "num_skipped": len(bad) + len(extra.get("skipped_inputs", [])), "skipped": bad, "shards": shards}
        write_json(self.folder / INDEX_NAME, index, indent=1)
        for stem in dead:
            remove_shard(self.folder, stem)
        return index


@dataclass
class IndexResult:
    out: Path
    index: dict
    skipped: Skipped  # every input not in the index now: unreadable files (known before or met now), bad inputs
    seconds: float
    model_seconds: float
    num_embedded: int  # files embedded by this run
    num_reused: int  # rows of earlier runs kept
    num_dropped: int  # rows of earlier runs dropped: their file was deleted or changed
    num_by_content: int = 0  # files with a new stamp whose embedding came from a row of equal content
    duplicates: list[list[str]] = field(default_factory=list)  # exact duplicates: paths of equal content

    def to_dict(self) -> dict:
        n = self.num_embedded
        return {
            "out": str(self.out),
            "index": str(self.out / INDEX_NAME),
            "num_images": self.index["num_rows"],
            "num_embedded": n,
            "num_reused": self.num_reused,
            "num_by_content": self.num_by_content,
            "num_dropped": self.num_dropped,
            "num_skipped": len(self.skipped),
            "num_shards": len(self.index["shards"]),
            "seconds": round(self.seconds, 4),
            "images_per_second": round(n / self.seconds, 3) if n and self.seconds > 0 else None,
            "model_images_per_second": round(n / self.model_seconds, 3) if n and self.model_seconds > 0 else None,
            "num_duplicate_groups": len(self.duplicates),
            "num_duplicate_copies": sum(len(group) - 1 for group in self.duplicates),
            "duplicates": self.duplicates,
            "exclude_dirs": self.index.get("exclude_dirs", []),
            "include_hidden": self.index.get("include_hidden", False),
            "skipped": self.skipped.to_list(),
        }


def exact_duplicates(shards: Iterable[dict]) -> list[list[str]]:
    """Paths of equal content (rows sharing a fingerprint), each group sorted, groups by their first path; rows
    without a fingerprint are in none."""
    groups: dict[str, list[str]] = {}
    for shard in shards:
        for path, fingerprint in zip(shard["paths"], shard.get("fingerprints") or ()):
            if fingerprint:
                groups.setdefault(fingerprint, []).append(path)
    return sorted(sorted(paths) for paths in groups.values() if len(paths) > 1)


def build_index(
    model: AIMv2LiT,
    inputs: Sequence,
    out: str | os.PathLike,
    *,
    model_name: str = "",
    preprocessing: Optional[Preprocessing] = None,
    batch_size: int = BATCH_SIZE,
    num_workers: int = NUM_WORKERS,
    shard_size: int = SHARD_SIZE,
    save_dtype: Optional[str] = None,
    exclude_dirs: Sequence[str] = (),
    include_hidden: bool = False,
    wait: bool = False,
    progress: bool = True,
) -> IndexResult:
    """Creates or updates the search index `out` of every image under `inputs` (folders, files, globs): embeds the
    files that are new or changed since the last run unless a row holds their content, drops the rows of files
    gone or changed, keeps the rest (module docstring). `preprocessing`: default
    `preprocessing_for(model.config.image)` (the command line passes the checkpoint folder's file). `save_dtype`:
    "float32" or "float16" on disk, fixed when the index is created (default float32, or the index's).
    `exclude_dirs`, `include_hidden`: how folders are walked (`data.WalkRules`), recorded in the index. `wait`:
    for another writer of `out` to finish, instead of raising `IndexBusy`. A model other than the index's is
    refused (`check_identity`)."""
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size={batch_size}, shard_size={shard_size}: expected positive integers")
    model = check_lit(model, model_name)
    rules = WalkRules(tuple(exclude_dirs), include_hidden)
    transform = preprocessing or preprocessing_for(model.config.image)
    run = EncodeRun(transform, batch_size=batch_size, num_workers=num_workers, progress=progress, desc="index")
    with IndexFolder(out, model_identity(model, model_name, transform), save_dtype, wait=wait) as folder:
        bad_inputs = Skipped()
        files: dict[str, Stamp] = {}
        for path in gather_images(inputs, bad_inputs, rules):
            try:
                files[index_key(path)] = file_stamp(path)
            except OSError as e:
                bad_inputs.add(path, f"cannot stat ({e.strerror or e})")
        plan = folder.plan(files)
        for shard, rows, bad in plan.carry:
            folder.carry(shard, rows, bad)
        for item in plan.known_bad:
            run.skipped.add(item["path"], item["reason"], warn=False)
        num_by_content = _add_new_files(folder, plan, run, model, shard_size, num_workers)
        for path, reason in bad_inputs.items:
            run.skipped.add(path, reason, warn=False)
        extra = {"model": model_name, "inputs": [index_key(i) for i in inputs], "skipped_inputs": bad_inputs.to_list(),
                 "exclude_dirs": list(rules.exclude_dirs), "include_hidden": rules.include_hidden}
        index = folder.finish(plan.keep, plan.dead, extra)
    return IndexResult(folder.folder, index, run.skipped, run.seconds, run.model_seconds, run.num_encoded,
                       plan.num_reused, plan.num_dropped, num_by_content, exact_duplicates(index["shards"]))


def _fingerprint_or_none(path: str) -> Optional[str]:
    try:
        return content_fingerprint(path)
    except OSError:
        return None  # unreadable: the loader reports why, when it tries to embed it


def _add_new_files(folder: IndexFolder, plan: Plan, run: EncodeRun, model: AIMv2LiT, shard_size: int,
                   num_workers: int) -> int:
    """Adds `plan.embed`'s files (new stamps) shard by shard: each one's fingerprint, hashed by `num_workers`
    threads while the model runs (in order, so a shard waits only for its own files), finds its embedding in a
    row of equal content, or the model embeds it (the first of several equal files met now; the others copy its
    row). Returns the files found by content."""
    todo = sorted(plan.embed)
    known = dict(plan.by_fingerprint)
    num_by_content = 0

    def encode(images):
        return {KIND: embed_images(model, images)}

    with ThreadPoolExecutor(max(1, num_workers)) as pool, run.progress_bar(len(todo)):
        try:
            hashes = [pool.submit(_fingerprint_or_none, path) for path in todo]
            for lo in range(0, len(todo), shard_size):
                chunk = todo[lo : lo + shard_size]
                fingerprints = {path: future.result() for path, future in zip(chunk, hashes[lo : lo + shard_size])}
                embed, copies, first = [], [], {}
                for path in chunk:
                    fingerprint = fingerprints[path]
                    if fingerprint in known or fingerprint in first:
                        copies.append(path)
                    else:
                        embed.append(path)
                        if fingerprint:
                            first[fingerprint] = path
                sink = IndexShard(folder, plan.embed, fingerprints)
                if embed:
                    run.encode(embed, encode, sink)
                    known.update({f: (sink.shard, i) for i, f in enumerate(sink.shard["fingerprints"]) if f})
                if copies:
                    found = [p for p in copies if fingerprints[p] in known]
                    bad = [{"path": p, "reason": sink.bad.get(first[fingerprints[p]], "unreadable"),
                            "size": plan.embed[p][0], "mtime_ns": plan.embed[p][1]}
                           for p in copies if fingerprints[p] not in known]  # equal to a file that failed
                    folder.copy_rows([known[fingerprints[p]] for p in found], found, [plan.embed[p] for p in found],
                                     [fingerprints[p] for p in found], bad)
                    for item in bad:
                        run.skipped.add(item["path"], item["reason"], warn=False)
                    num_by_content += len(found)
                    run.advance(len(copies))
        finally:
            pool.shutdown(cancel_futures=True)
    return num_by_content


class IndexShard:
    """`build_index`'s sink for one shard: the rows' index keys and embeddings as they come (in input order: a LiT
    takes one image size), added to the index folder as a finished shard (`shard`) when it closes, with their
    `fingerprints` (index key -> sha256), the unreadable files (`bad`: path -> reason) and their `stamps` (index
    key -> stamp)."""

    def __init__(self, folder: IndexFolder, stamps: Mapping[str, Stamp], fingerprints: Mapping[str, Optional[str]]):
        self.folder, self.stamps, self.fingerprints = folder, stamps, fingerprints
        self.paths: list[str] = []
        self.embeddings: list[np.ndarray] = []
        self.bad: dict[str, str] = {}
        self.shard: Optional[dict] = None

    def add(self, batch: EncodedBatch) -> None:
        self.paths += [str(p) for p in batch.paths]
        self.embeddings += list(batch.outputs[KIND])

    def close(self, skipped: Skipped) -> None:
        self.bad = dict(skipped.items)
        bad = [{"path": p, "reason": r, "size": self.stamps[p][0], "mtime_ns": self.stamps[p][1]}
               for p, r in skipped.items]
        self.shard = self.folder.add_shard(self.paths, [self.stamps[p] for p in self.paths], self.embeddings, bad,
                                           [self.fingerprints.get(p) for p in self.paths])


# ---------------------------------------------------------------------------------------------------
# Querying an index


@dataclass(frozen=True)
class Hit:
    rank: int  # 1 for the best
    path: str
    score: float  # cosine similarity
    row: int = -1  # its row in the index (`SearchIndex.row_embedding`), valid until the index is updated

    def to_dict(self) -> dict:
        return {"rank": self.rank, "path": self.path, "score": self.score, "row": self.row}


class SearchIndex:
    """A finished search index, read from its index.json: `search` scans its memory-mapped shards,
    `stored_embedding` finds an indexed file's row, `check_model` refuses a model other than its own."""

    def __init__(self, folder: str | os.PathLike, index: dict):
        self.folder = Path(folder)
        self.index = index
        self.shards = [s for s in index["shards"] if s["rows"]]
        self.starts = [s["start"] for s in self.shards]
        self._rows: Optional[dict[str, tuple[int, int]]] = None
        self._kept: Optional[dict[str, np.ndarray]] = None  # shard name -> its rows, once `keep_in_memory` ran

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "SearchIndex":
        folder = Path(folder)
        path = folder / INDEX_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no search index ({INDEX_NAME} missing; build one with "
                                    "`mlx-aim search index --model M --out INDEX PHOTOS...`, or finish that run)")
        index = read_json(path)
        if not isinstance(index, dict) or index.get("format") != SEARCH_FORMAT:
            raise ValueError(f"{path}: not a search index (format {SEARCH_FORMAT!r} expected; an extract-features "
                             "folder cannot be searched)")
        return cls(folder, index)

    def __len__(self) -> int:
        return self.index["num_rows"]

    @property
    def model_name(self) -> str:
        """The model source the index was last updated with, as given (a local path made absolute)."""
        return self.index.get("model", "")

    @property
    def identity(self) -> dict:
        return {k: self.index.get(k) for k in ("model", *IDENTITY_KEYS)}

    def check_model(self, model: AIMv2LiT, model_name: str = "", preprocessing: Optional[Preprocessing] = None):
        """ValueError naming both models unless `model` is the index's (the preprocessing only when given: a text
        query does not use it)."""
        model = check_lit(model, model_name)
        identity = {"model": model_name, "model_config": model.config.to_dict(),
                    "model_dtype": dtype_name(model.dtype), "image_weights_sha256": weights_fingerprint(model)}
        keys = [k for k in IDENTITY_KEYS if k != "preprocessing"]
        if preprocessing is not None:
            identity["preprocessing"] = preprocessing.settings()
            keys.append("preprocessing")
        check_identity(self.folder, self.index, identity, keys)

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.index["preprocessing"])

    def keep_in_memory(self) -> "SearchIndex":
        """Reads every shard's rows into memory now, for a reader that searches many times (`search serve`): a
        search then maps no file (mapping each shard anew took 0.08 of a 100k-row search's 0.13 s on a 2-core AMD
        EPYC VM). Costs the rows' size in memory: 3 KB a photo in float32."""
        self._kept = {s["name"]: read_shard_array(self.folder, s, KIND, self.index["file_format"])
                      for s in self.shards}
        return self

    def _shard_embeddings(self, shard: dict) -> np.ndarray:
        if self._kept is not None:
            return self._kept[shard["name"]]
        return read_shard_array(self.folder, shard, KIND, self.index["file_format"], mmap=True)

    def _row(self, position: int) -> tuple[dict, int]:
        k = bisect.bisect_right(self.starts, position) - 1
        return self.shards[k], position - self.starts[k]

    def search(self, query: np.ndarray, top_k: Optional[int] = TOP_K,
               threshold: Optional[float] = None) -> list[Hit]:
        """The `top_k` rows (None: all) most similar to `query` (a unit-length embedding), only those scoring at least
        `threshold` when given: rank, path, cosine similarity and row, best first (ties in row order)."""
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k}: expected a positive integer")
        query = np.asarray(query, np.float32).reshape(-1)
        width = self.index["embedding_shape"][0]
        if query.shape != (width,):
            raise ValueError(f"query of shape {query.shape}: the index holds ({width},) embeddings")
        scores = np.empty(len(self), np.float32)
        for shard in self.shards:
            rows = self._shard_embeddings(shard)
            # einsum, not BLAS: one small matrix-vector product per shard pays BLAS's thread start-up each time.
            scores[shard["start"] : shard["start"] + shard["rows"]] = np.einsum("ij,j->i", rows, query)
        k = len(scores) if top_k is None else min(top_k, len(scores))
        if threshold is not None:
            k = min(k, int(np.count_nonzero(scores >= np.float32(threshold))))
        if k == 0:
            return []
        best = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        best = best[np.lexsort((best, -scores[best]))]
        hits = []
        for rank, position in enumerate(best.tolist(), 1):
            shard, row = self._row(position)
            hits.append(Hit(rank, shard["paths"][row], float(scores[position]), position))
        return hits

    def row_path(self, position: int) -> str:
        """The index key (absolute path) of row `position`; IndexError outside 0..len-1."""
        shard, row = self._checked_row(position)
        return shard["paths"][row]

    def row_stamp(self, position: int) -> Stamp:
        """The (size, mtime_ns) the file of row `position` had when it was embedded."""
        shard, row = self._checked_row(position)
        return shard["sizes"][row], shard["mtimes_ns"][row]

    def row_embedding(self, position: int) -> np.ndarray:
        """Row `position`'s stored embedding (float32), whether or not its file has changed since."""
        shard, row = self._checked_row(position)
        return np.asarray(self._shard_embeddings(shard)[row], np.float32)

    def _checked_row(self, position: int) -> tuple[dict, int]:
        if not 0 <= position < len(self):
            raise IndexError(f"row {position}: the index has rows 0 to {len(self) - 1}")
        return self._row(position)

    def stored_embedding(self, path: str | os.PathLike) -> Optional[np.ndarray]:
        """The indexed embedding of the file `path` (float32), when the index holds it and the file has not changed
        since (same size and modification time); None otherwise."""
        if self._rows is None:
            self._rows = {p: (k, i) for k, shard in enumerate(self.shards) for i, p in enumerate(shard["paths"])}
        key = index_key(path)
        found = self._rows.get(key)
        if found is None:
            return None
        shard = self.shards[found[0]]
        row = found[1]
        try:
            if file_stamp(key) != (shard["sizes"][row], shard["mtimes_ns"][row]):
                return None
        except OSError:
            return None
        return np.asarray(self._shard_embeddings(shard)[row], np.float32)


def image_embedding(model: AIMv2LiT, image, preprocessing: Preprocessing) -> np.ndarray:
    """One image's unit-length embedding (float32): a file, as `preprocessing` reads it (ImageLoadError when it
    cannot be used)."""
    pixels = preprocessing(image)
    return to_numpy(embed_images(model, mx.array(pixels[None])))[0]

