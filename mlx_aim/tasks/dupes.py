"""Near-duplicate photos of a search index (bursts, edits, re-saves), from its stored embeddings: no model.

Two photos are linked when the cosine similarity of their rows is at least `threshold`; a group is a connected
set of links (single linkage), so a burst whose neighbouring shots are linked forms one group even where its first
and last shots are less alike than `threshold` (each group reports its least link). The pairs are scored in
`BLOCK` x `BLOCK` tiles of the upper triangle on MLX's default device (a Mac's GPU), so memory holds the rows
(N x D float32), one tile and the links, never an N x N matrix; the work is N^2 D / 2 multiply-adds.

    groups = near_duplicates(SearchIndex.open("photos.index"), threshold=0.97)
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .search import KIND, SearchIndex
from .shards import read_shard_array

DUPES_THRESHOLD = 0.97
BLOCK = 2048  # rows a tile side: a 2048 x 2048 float32 tile is 16 MiB
MAX_LINKS_PER_PHOTO = 64  # more links than this per photo, on average, means the threshold groups everything


@dataclass(frozen=True)
class DupeGroup:
    paths: list[str]  # sorted
    scores: list[float]  # each photo's best link to another in the group
    min_score: float  # the group's least link

    def to_dict(self) -> dict:
        return {"paths": self.paths, "scores": self.scores, "min_score": self.min_score}


def index_rows(index: SearchIndex) -> tuple[np.ndarray, list[str]]:
    """Every row of `index` as float32 (N, D), with its path."""
    width = index.index["embedding_shape"][0]
    rows = [np.asarray(read_shard_array(index.folder, shard, KIND, index.index["file_format"], mmap=True),
                       np.float32) for shard in index.shards]
    paths = [path for shard in index.shards for path in shard["paths"]]
    return (np.concatenate(rows) if rows else np.zeros((0, width), np.float32)), paths


def similar_pairs(rows: np.ndarray, threshold: float, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair i < j with rows[i] . rows[j] >= `threshold` (> 0): (i, j, score) arrays, scored tile by tile on
    MLX's default device (a Mac's GPU), a tile read back only when it holds a link. ValueError when there are more
    than `MAX_LINKS_PER_PHOTO` per row on average (the threshold is too low to mean "near-duplicate", and the links
    would fill memory)."""
    if not threshold > 0:
        raise ValueError(f"threshold={threshold}: expected a positive cosine similarity")
    n = len(rows)
    everything = mx.array(np.asarray(rows, np.float32))
    found_i, found_j, found_s, total = [], [], [], 0
    for lo in range(0, n, block):
        a = everything[lo : lo + block]
        for start in range(lo, n, block):
            scores = a @ everything[start : start + block].T
            if start == lo:
                scores = mx.triu(scores, k=1)  # each pair once, no self-pairs (zeros are below any threshold)
            links = scores >= threshold
            count = mx.sum(links).item()
            if not count:
                continue
            total += count
            if total > MAX_LINKS_PER_PHOTO * max(n, 1):
                raise ValueError(f"threshold={threshold}: more than {MAX_LINKS_PER_PHOTO} links per photo on "
                                 "average; near-duplicates are far more alike than that (try 0.95 or higher)")
            i, j = np.nonzero(np.array(links))
            found_i.append(i + lo)
            found_j.append(j + start)
            found_s.append(np.array(scores)[i, j])
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s).astype(np.float32)


def connected_components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """A label per node 0..n-1, the smallest node of its component, for the undirected edges (i, j): labels are
    lowered along edges and through each other (pointer jumping) until nothing changes."""
    labels = np.arange(n)
    while True:
        before = labels.copy()
        low = np.minimum(labels[i], labels[j])
        np.minimum.at(labels, i, low)
        np.minimum.at(labels, j, low)
        labels = labels[labels]
        if np.array_equal(labels, before):
            return labels


def near_duplicates(index: SearchIndex, threshold: float = DUPES_THRESHOLD, block: int = BLOCK) -> list[DupeGroup]:
    """Groups of photos of `index` linked by cosine similarity >= `threshold` (module docstring), largest first
    (then by first path), each of 2 photos or more."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold}: expected a cosine similarity in (0, 1]")
    rows, paths = index_rows(index)
    i, j, scores = similar_pairs(rows, threshold, block)
    if not len(i):
        return []
    labels = connected_components(len(rows), i, j)
    best = np.full(len(rows), -np.inf, np.float32)
    np.maximum.at(best, i, scores)
    np.maximum.at(best, j, scores)
    least = np.full(len(rows), np.inf, np.float32)
    np.minimum.at(least, labels[i], scores)
    linked = np.unique(np.concatenate([i, j]))
    linked = linked[np.argsort(labels[linked], kind="stable")]
    groups = []
    for members in np.split(linked, np.flatnonzero(np.diff(labels[linked])) + 1):
        members = sorted(members.tolist(), key=lambda k: paths[k])
        groups.append(DupeGroup([paths[k] for k in members], [round(float(best[k]), 6) for k in members],
                                round(float(least[labels[members[0]]]), 6)))
    return sorted(groups, key=lambda g: (-len(g.paths), g.paths[0]))
