"""Finding images on disk: listing, the inputs that could not be used, labelled image folders, their splits and
class names. No image is decoded here (that is `images.py`).

- `list_images`: the image files named by files, folders and glob patterns, sorted.
- `gather_images`: the same over command-line inputs, recording an input that yields no image, and a file whose
  format this installation cannot read (RAW without the `raw` extra), in `Skipped` instead of raising, so a run
  goes on with the rest. A skip is also logged (logger `mlx_aim.data.datasets`, level WARNING); the command lines
  print those records, the library prints nothing.
- Which extensions are images (`IMAGE_EXTENSIONS`) is decided in `formats.py`.
- `NoUsableImages`: raised where a job needs images and too few of its inputs could be used.
- `ImageFolder`, `split_image_folder`, `load_splits`: labelled images laid out one sub-folder per class, and
  their (train, val) splits; `split_images` and `load_splits(labelled=False)` split unlabelled images.
- `imagenet_classes`: the 1000 ImageNet-1k class names.
"""

from __future__ import annotations

import copy
import functools
import glob
import logging
import os
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from .formats import IMAGE_EXTENSIONS, missing_support

UNLABELLED_SPLIT_STREAM = 103  # first word of the seed that picks the held-out images of `split_images`

PathInput = Union[str, os.PathLike]

log = logging.getLogger(__name__)


class NoUsableImages(ValueError):
    """A job found too few usable images among its inputs (every one skipped, say): it ran and produced
    nothing. A ValueError, so code that catches bad input catches it; the command lines exit 1 on it."""


# ----------------------------------------------------------------------------------------------------
# Finding images on disk


def _has_glob_magic(text: str) -> bool:
    return any(char in text for char in "*?[")


@dataclass(frozen=True)
class WalkRules:
    """What a folder walk leaves out. Hidden names (starting with ".") unless `include_hidden`; macOS's "._name"
    metadata files always (they are not images). `exclude_dirs`: a bare name (no "/") leaves out every folder of
    that name at any depth below the walked folder ("@eaDir", "Thumbs"); a value with a "/" is a path and leaves
    out that one folder (made absolute: "./raw", "~/Pictures/raw"). The walked folder itself is the user's and is
    always walked."""

    exclude_dirs: tuple[str, ...] = ()
    include_hidden: bool = False

    def __post_init__(self):
        if isinstance(self.exclude_dirs, (str, os.PathLike)):
            raise TypeError("WalkRules.exclude_dirs: expected a sequence of folder names or paths, not one string")
        for item in self.exclude_dirs:
            if not os.fspath(item).strip() or os.path.basename(os.fspath(item).rstrip("/")) in (".", ".."):
                raise ValueError(f"exclude_dirs: {os.fspath(item)!r} is not a folder name or path")
        object.__setattr__(self, "exclude_dirs", tuple(self.normalized(os.fspath(d)) for d in self.exclude_dirs))

    @staticmethod
    def normalized(item: str) -> str:
        """A name as given; a path made absolute (home expanded), as an index records it."""
        return os.path.abspath(os.path.expanduser(item)) if "/" in item or os.sep in item else item

    @functools.cached_property
    def _names(self) -> frozenset:
        return frozenset(d for d in self.exclude_dirs if "/" not in d and os.sep not in d)

    @functools.cached_property
    def _paths(self) -> frozenset:
        paths = {d for d in self.exclude_dirs if d not in self._names}
        return frozenset(paths | {os.path.realpath(d) for d in paths})

    def walks_into(self, parent: str, name: str) -> bool:
        """Whether a walk goes into the sub-folder `name` of `parent`."""
        if (name.startswith(".") and not self.include_hidden) or name in self._names:
            return False
        if self._paths:
            path = os.path.abspath(os.path.join(parent, name))
            return path not in self._paths and os.path.realpath(path) not in self._paths
        return True

    def takes(self, name: str) -> bool:
        """Whether a walk takes the file `name` (its extension aside)."""
        return not name.startswith("._") and (self.include_hidden or not name.startswith("."))


def _walk_images(folder: Path, extensions: frozenset, rules: WalkRules = WalkRules()) -> Iterator[Path]:
    """Image files under `folder`, recursively, following symbolic links once; what `rules` leaves out skipped."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link loop, or two links to one folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if rules.walks_into(dirpath, d)]
        for name in filenames:
            if rules.takes(name) and os.path.splitext(name)[1].lower() in extensions:
                yield Path(dirpath) / name


def list_images(
    inputs: Union[PathInput, Iterable[PathInput]], extensions: Iterable[str] = IMAGE_EXTENSIONS,
    rules: WalkRules = WalkRules(),
) -> list[Path]:
    """Image files named by `inputs`: sorted, without duplicates.

    Each input is a file (kept whatever its extension), a folder (searched recursively, following
    symbolic links, skipping hidden files and folders and what else `rules` leaves out), or a glob pattern
    (`**` spans folders; matched folders are searched, matched files are kept when their extension is an image
    one). A file named, or matched by a glob, is taken as named. Extensions are
    compared case-insensitively. A path that does not exist raises FileNotFoundError naming it; an input
    that yields no image raises ValueError naming it.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    extensions = frozenset(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    found: set[Path] = set()
    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.exists():
            if path.is_dir():
                images = set(_walk_images(path, extensions, rules))
            else:
                images = {path}
        elif _has_glob_magic(text):
            matches = glob.glob(text, recursive=True)
            if not matches:
                raise FileNotFoundError(f"no file or folder matches the pattern {text!r}")
            images = set()
            for match in map(Path, matches):
                if match.is_dir():
                    images.update(_walk_images(match, extensions, rules))
                elif match.suffix.lower() in extensions:
                    images.add(match)
        else:
            raise FileNotFoundError(f"no such file or folder: {text!r}")
        if not images:
            raise ValueError(f"{text!r} holds no image files (extensions: {', '.join(sorted(extensions))})")
        found.update(images)
    if not found:
        raise ValueError("list_images: no inputs given")
    return sorted(found)


@dataclass
class Skipped:
    """Inputs that could not be used, with the reason for each, in the order they were met."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, source, reason: str, warn: bool = True) -> None:
        """Records `source` as skipped; with `warn` (an input met now, not one read back from a record of an
        earlier run) also logs it, as the command lines show each skip when it happens."""
        self.items.append((str(source), reason))
        if warn:
            log.warning("skipping %s: %s", source, reason)

    def __len__(self) -> int:
        return len(self.items)

    def to_list(self) -> list[dict]:
        return [{"path": path, "reason": reason} for path, reason in self.items]

    def report(self) -> str:
        if not self.items:
            return "skipped: none"
        lines = [f"skipped {len(self.items)} input(s):"]
        lines += [f"  {path}: {reason}" for path, reason in self.items]
        return "\n".join(lines)


def gather_images(inputs: Sequence, skipped: Skipped, rules: WalkRules = WalkRules()) -> list[Path]:
    """Image files named by `inputs` (files, folders, globs; folders walked by `rules`); an input that yields none
    goes to `skipped`, and so does a file whose format this installation cannot read (`formats.missing_support`),
    with the reason. Such a file is left out here, before any job records it as unreadable, so that it is read
    once the support is installed."""
    found: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        try:
            for path in list_images(item, rules=rules):
                if path in seen:
                    continue
                seen.add(path)
                reason = missing_support(path)
                if reason is None:
                    found.append(path)
                else:
                    skipped.add(path, reason)
        except (FileNotFoundError, ValueError) as e:
            skipped.add(item, str(e))
    return found


# ----------------------------------------------------------------------------------------------------
# Labelled image folders and their splits


class ImageFolder:
    """A labelled image set laid out as one sub-folder per class: `root/<class name>/**/<image>`.

    `classes` are the sub-folder names, sorted (hidden folders skipped), and a class's label is its index
    there. Pass `classes` to impose another list (a validation folder takes the training folder's list):
    every sub-folder must then be in it, and a class may lack a folder. `samples` is a list of
    (path, label) sorted by class, then path. An empty class folder raises ValueError naming it.
    """

    def __init__(
        self,
        root: PathInput,
        classes: Optional[Sequence[str]] = None,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist or is not a folder")
        folders = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not folders:
            raise ValueError(f"image folder {str(self.root)!r} has no class sub-folders")
        if classes is None:
            classes = folders
        unknown = sorted(set(folders) - set(classes))
        if unknown:
            raise ValueError(f"image folder {str(self.root)!r}: sub-folders {unknown} are not known classes")
        self.classes = list(classes)
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for name in folders:
            try:
                files = list_images(self.root / name, extensions)
            except ValueError:
                raise ValueError(f"class folder {str(self.root / name)!r} holds no images") from None
            self.samples += [(path, self.class_to_idx[name]) for path in files]

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Path, int]:
        return self.samples[index]

    def subset(self, indices: Iterable[int]) -> "ImageFolder":
        """The same classes with only the samples at `indices` (in that order)."""
        part = copy.copy(self)
        part.samples = [self.samples[i] for i in indices]
        return part

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, {len(self.classes)} classes, {len(self.samples)} images)"


def split_image_folder(
    root: Union[PathInput, ImageFolder], val_ratio: float = 0.2, seed: int = 0
) -> tuple[ImageFolder, ImageFolder]:
    """Stratified seeded split of an image folder into (train, val).

    Each class's samples are shuffled by a generator seeded from (seed, CRC-32 of the class name), so one
    class's split does not change when other classes are added; `round(n * val_ratio)` of them go to val,
    but at least one stays in train. Both parts keep the folder's order (class, then path).
    """
    if not 0 <= val_ratio < 1:
        raise ValueError(f"val_ratio={val_ratio}: expected a value in [0, 1)")
    folder = root if isinstance(root, ImageFolder) else ImageFolder(root)
    labels = np.asarray(folder.labels, dtype=np.int64)
    train, val = [], []
    for label, name in enumerate(folder.classes):
        members = np.flatnonzero(labels == label)
        if members.size == 0:
            continue
        rng = np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])
        members = members[rng.permutation(members.size)]
        num_val = min(int(round(members.size * val_ratio)), members.size - 1)
        val += members[:num_val].tolist()
        train += members[num_val:].tolist()
    return folder.subset(sorted(train)), folder.subset(sorted(val))


def split_images(paths: Sequence[Path], val_ratio: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Seeded split of unlabelled images into (train, val): `round(n * val_ratio)` of them, drawn by a
    generator seeded from (UNLABELLED_SPLIT_STREAM, seed), are held out, but at least one stays in train. Both
    parts keep the list's order."""
    if not 0 <= val_ratio < 1:
        raise ValueError(f"val_ratio={val_ratio}: expected a value in [0, 1)")
    order = np.random.default_rng([UNLABELLED_SPLIT_STREAM, int(seed)]).permutation(len(paths))
    num_val = min(int(round(len(paths) * val_ratio)), len(paths) - 1)
    held_out = set(order[:num_val].tolist())
    return [p for i, p in enumerate(paths) if i not in held_out], [paths[i] for i in sorted(held_out)]


def load_splits(
    root: PathInput, val_ratio: float = 0.2, seed: int = 0, *, labelled: bool = True
) -> Union[tuple[ImageFolder, ImageFolder], tuple[list[Path], list[Path]]]:
    """(train, val) from `root`: image folders, or with `labelled=False` sorted lists of image paths (for
    pre-training, where labels play no part).

    If `root/train/` and `root/val/` both exist they are the splits (val takes train's class list);
    if only `root/train/` exists it is split; otherwise `root` itself is. Labelled, the folder split holds
    class folders and is split by `split_image_folder` (stratified); unlabelled, every image under it
    counts (searched recursively) and `split_images` splits them. A `root/val/` without `root/train/`
    raises ValueError.
    """
    root = Path(root)
    if not root.is_dir():
        expected = "class sub-folders, or train/ and val/ folders of them" if labelled else "images"
        raise FileNotFoundError(f"data {str(root)!r} is not a folder (expected {expected})")
    train_dir, val_dir = root / "train", root / "val"
    if val_dir.is_dir() and not train_dir.is_dir():
        raise ValueError(f"{str(root)!r} has a val/ folder but no train/ folder")
    source = train_dir if train_dir.is_dir() else root
    if labelled:
        if val_dir.is_dir():
            train = ImageFolder(train_dir)
            return train, ImageFolder(val_dir, classes=train.classes)
        return split_image_folder(source, val_ratio, seed)
    if val_dir.is_dir():
        return list_images(train_dir), list_images(val_dir)
    return split_images(list_images(source), val_ratio, seed)


# ----------------------------------------------------------------------------------------------------
# Class names


@functools.lru_cache(maxsize=1)
def _imagenet_class_names() -> tuple[str, ...]:
    text = resources.files("mlx_aim").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(text.splitlines())
    if len(names) != 1000:
        raise RuntimeError(f"mlx_aim/imagenet_classes.txt has {len(names)} lines: expected 1000")
    return names


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names, in label order (torchvision's names)."""
    return list(_imagenet_class_names())
