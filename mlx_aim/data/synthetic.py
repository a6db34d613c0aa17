"""A procedural image dataset built in, so pre-training can be tried with no download.

Each image is one shape or pattern (a disc, a ring, a star, stripes, ...) in a random foreground colour on
a random background colour, at a random position, scale and rotation, over a smooth shading field, with
pixel noise. Foreground and background colours come from one distribution for every class, so an image's
mean colour says (almost) nothing about its class: the label lies in the geometry, which is what a
pre-trained trunk should learn to see and a randomly initialised one does not.

Decisions:
- Stripes, checkerboard and dots fill the whole image at a random angle, period and phase; each is one
  class whatever its angle (not one class per angle), so the class is the pattern, not its orientation.
- The plus keeps within 15 degrees of upright and the x within 15 degrees of diagonal: they are separate
  classes that differ by orientation, a harder pair kept out of the first ten.
- Labels are `index % num_classes` (balanced, and the first n samples are balanced too), and
  `num_classes` takes the first classes of `SHAPE_CLASSES`.
- Sample i of split "train" is drawn from `np.random.SeedSequence([seed, i])`, of split "val" from
  `SeedSequence([seed, i, 1])`: the two never share a stream, and the validation set does not depend on
  how many training images there are.

    ds = SyntheticShapes(1000, image_size=64, seed=0)
    image, label = ds[3]  # a 64x64 RGB PIL image and its class index; ds.classes[label] is its name
    root = write_image_folder("data/shapes", num_train=10_000, num_val=2_000)  # root/train/<class>/<i>.png
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import operator
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..fileio import remove_stale_temporaries, temporary_glob, write_json

# The first ten are the default task; the rest add harder pairs (plus/x, disc/hexagon/ellipse, square/frame).
SHAPE_CLASSES: tuple[str, ...] = (
    "disc",
    "ring",
    "square",
    "triangle",
    "plus",
    "star",
    "stripes",
    "checkerboard",
    "dots",
    "arrow",
    "hexagon",
    "ellipse",
    "frame",
    "x",
    "crescent",
    "semicircle",
)

# Bump when the renderer changes, so a cached image folder from an older renderer is rebuilt.
GENERATOR_VERSION = 1
MANIFEST_NAME = "synthetic_shapes.json"
SPLITS = ("train", "val")

_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges
_MIN_COLOUR_DISTANCE = 0.4  # in RGB units of [0, 1]: keeps the shape visible against its background
_MAX_INDEX = 2**32  # seeds and indices are single 32-bit SeedSequence words, so streams never collide


# Geometry helpers. Coordinates are in output pixels; `_Canvas` scales them to the supersampled mask.


def _placement(rng: np.random.Generator, size: int, radius=(0.2, 0.36)) -> tuple[float, float, float]:
    """A centre and a radius such that the shape's bounding circle stays inside the image."""
    r = rng.uniform(*radius) * size
    cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
    return float(cx), float(cy), float(r)


def _star_points(cx, cy, radii, angle) -> list[tuple[float, float]]:
    """Vertices at evenly spaced angles with the given radii, in turn (a regular polygon if all equal)."""
    n = len(radii)
    theta = angle + 2 * np.pi * np.arange(n) / n
    radii = np.asarray(radii, dtype=np.float64)
    return list(zip(cx + radii * np.cos(theta), cy + radii * np.sin(theta)))


def _rotated(points, angle, cx, cy) -> list[tuple[float, float]]:
    """`points` given around the origin, rotated by `angle` and moved to (cx, cy)."""
    p = np.asarray(points, dtype=np.float64)
    c, s = math.cos(angle), math.sin(angle)
    x = cx + p[:, 0] * c - p[:, 1] * s
    y = cy + p[:, 0] * s + p[:, 1] * c
    return list(zip(x, y))


class _Canvas:
    """A supersampled greyscale mask to draw on; `mask()` returns it at the output size in [0, 1]."""

    def __init__(self, size: int):
        self.size = size
        self.image = Image.new("L", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), 0)
        self.draw = ImageDraw.Draw(self.image)

    def polygon(self, points, fill=255):
        self.draw.polygon([(x * _SUPERSAMPLE, y * _SUPERSAMPLE) for x, y in points], fill=fill)

    def disc(self, cx, cy, r, fill=255):
        s = _SUPERSAMPLE
        self.draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=fill)

    def half_disc(self, cx, cy, r, start_degrees, fill=255):
        s = _SUPERSAMPLE
        box = [(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s]
        self.draw.pieslice(box, start_degrees, start_degrees + 180, fill=fill)

    def mask(self) -> np.ndarray:
        return np.asarray(self.image.reduce(_SUPERSAMPLE), dtype=np.float32) / 255.0


# One function per class: (rng, size) -> float32 mask (size, size), 1 where the foreground colour goes.


def _disc(rng, size):
    cx, cy, r = _placement(rng, size)
    canvas = _Canvas(size)
    canvas.disc(cx, cy, r)
    return canvas.mask()


def _ring(rng, size):
    cx, cy, r = _placement(rng, size)
    canvas = _Canvas(size)
    canvas.disc(cx, cy, r)
    canvas.disc(cx, cy, r * rng.uniform(0.45, 0.7), fill=0)
    return canvas.mask()


def _regular_polygon(sides: int, radius=(0.2, 0.36)):
    def draw(rng, size):
        cx, cy, r = _placement(rng, size, radius)
        canvas = _Canvas(size)
        canvas.polygon(_star_points(cx, cy, [r] * sides, rng.uniform(0, 2 * np.pi)))
        return canvas.mask()

    return draw


def _star(rng, size):
    cx, cy, r = _placement(rng, size, (0.24, 0.4))
    inner = r * rng.uniform(0.38, 0.5)
    canvas = _Canvas(size)
    canvas.polygon(_star_points(cx, cy, [r, inner] * 5, rng.uniform(0, 2 * np.pi)))
    return canvas.mask()


def _cross(base_angle: float):
    """Two perpendicular bars, within 15 degrees of `base_angle` (0: a plus, pi/4: an x)."""

    def draw(rng, size):
        cx, cy, r = _placement(rng, size, (0.24, 0.4))
        half_width = r * rng.uniform(0.17, 0.25)
        angle = base_angle + rng.uniform(-1, 1) * np.pi / 12
        length = math.sqrt(r**2 - half_width**2)  # the bar's corners on the bounding circle
        bar = [(-length, -half_width), (length, -half_width), (length, half_width), (-length, half_width)]
        canvas = _Canvas(size)
        canvas.polygon(_rotated(bar, angle, cx, cy))
        canvas.polygon(_rotated(bar, angle + np.pi / 2, cx, cy))
        return canvas.mask()

    return draw


def _arrow(rng, size):
    cx, cy, r = _placement(rng, size, (0.24, 0.4))
    shaft, head = r * rng.uniform(0.14, 0.22), r * rng.uniform(0.5, 0.65)
    neck = r * rng.uniform(-0.1, 0.2)  # where the shaft meets the head, along the arrow
    tail = -math.sqrt(r**2 - shaft**2)  # the tail's corners on the bounding circle
    points = [(tail, -shaft), (neck, -shaft), (neck, -head), (r, 0), (neck, head), (neck, shaft), (tail, shaft)]
    canvas = _Canvas(size)
    canvas.polygon(_rotated(points, rng.uniform(0, 2 * np.pi), cx, cy))
    return canvas.mask()


def _ellipse(rng, size):
    cx, cy, r = _placement(rng, size, (0.24, 0.4))
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    points = np.stack([r * np.cos(theta), r * rng.uniform(0.4, 0.6) * np.sin(theta)], axis=1)
    canvas = _Canvas(size)
    canvas.polygon(_rotated(points, rng.uniform(0, np.pi), cx, cy))
    return canvas.mask()


def _frame(rng, size):
    cx, cy, r = _placement(rng, size, (0.24, 0.4))
    angle = rng.uniform(0, 2 * np.pi)
    canvas = _Canvas(size)
    canvas.polygon(_star_points(cx, cy, [r] * 4, angle))
    canvas.polygon(_star_points(cx, cy, [r * rng.uniform(0.5, 0.68)] * 4, angle), fill=0)
    return canvas.mask()


def _crescent(rng, size):
    cx, cy, r = _placement(rng, size)
    angle = rng.uniform(0, 2 * np.pi)
    shift = r * rng.uniform(0.4, 0.6)
    canvas = _Canvas(size)
    canvas.disc(cx, cy, r)
    canvas.disc(cx + shift * math.cos(angle), cy + shift * math.sin(angle), r * rng.uniform(0.85, 0.95), fill=0)
    return canvas.mask()


def _semicircle(rng, size):
    cx, cy, r = _placement(rng, size, (0.24, 0.4))
    canvas = _Canvas(size)
    canvas.half_disc(cx, cy, r, rng.uniform(0, 360))
    return canvas.mask()


# Whole-image periodic patterns, drawn directly at the output size with soft (anti-aliased) edges.


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> np.ndarray:
    centres = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    centres.flags.writeable = False
    return centres


def _pattern_coordinates(rng, size, period):
    """Pixel centres in a randomly rotated and shifted frame, in units of `period`."""
    angle = rng.uniform(0, np.pi)
    y, x = _pixel_centres(size)
    u = (x * math.cos(angle) + y * math.sin(angle)) / period + rng.uniform(0, 1)
    v = (-x * math.sin(angle) + y * math.cos(angle)) / period + rng.uniform(0, 1)
    return u, v


def _band(t, duty, period):
    """Soft indicator of the band of width `duty` (fraction of a period) centred in each period."""
    distance = np.abs(t - np.floor(t) - 0.5) * period  # pixels from the band's centre line
    return np.clip(duty * period / 2 - distance + 0.5, 0.0, 1.0)


def _stripes(rng, size):
    period = size * rng.uniform(0.11, 0.22)
    u, _ = _pattern_coordinates(rng, size, period)
    return _band(u, rng.uniform(0.4, 0.6), period)


def _checkerboard(rng, size):
    period = 2 * size * rng.uniform(0.09, 0.16)  # two cells per period
    u, v = _pattern_coordinates(rng, size, period)
    a, b = _band(u, 0.5, period), _band(v, 0.5, period)
    return a * (1 - b) + (1 - a) * b  # soft XOR


def _dots(rng, size):
    spacing = size * rng.uniform(0.14, 0.22)
    u, v = _pattern_coordinates(rng, size, spacing)
    distance = np.hypot(u - np.floor(u) - 0.5, v - np.floor(v) - 0.5) * spacing
    return np.clip(spacing * rng.uniform(0.22, 0.32) - distance + 0.5, 0.0, 1.0)


_DRAW: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "disc": _disc,
    "ring": _ring,
    "square": _regular_polygon(4, (0.24, 0.4)),
    "triangle": _regular_polygon(3, (0.26, 0.42)),
    "plus": _cross(0.0),
    "star": _star,
    "stripes": _stripes,
    "checkerboard": _checkerboard,
    "dots": _dots,
    "arrow": _arrow,
    "hexagon": _regular_polygon(6),
    "ellipse": _ellipse,
    "frame": _frame,
    "x": _cross(np.pi / 4),
    "crescent": _crescent,
    "semicircle": _semicircle,
}
assert tuple(_DRAW) == SHAPE_CLASSES


# Colours and the background texture, the same distributions for every class.


def _colours(rng) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background, uniform in the RGB cube, kept if they differ enough (symmetric in the two)."""
    while True:
        pairs = rng.uniform(0, 1, size=(8, 2, 3)).astype(np.float32)
        ok = ((pairs[:, 0] - pairs[:, 1]) ** 2).sum(axis=1) >= _MIN_COLOUR_DISTANCE**2
        if ok.any():
            fg, bg = pairs[np.argmax(ok)]
            return fg, bg


_SHADING_KNOTS = 4  # the shading field is a 4x4 grid of values per channel, interpolated to the image
_KNOT_POSITIONS = np.linspace(-0.5, 0.5, _SHADING_KNOTS)  # across the image, from edge to edge


@functools.lru_cache(maxsize=8)
def _upsampler(size: int) -> np.ndarray:
    """(size, knots) weights that linearly interpolate evenly spaced knot values to pixel centres."""
    position = (np.arange(size) + 0.5) / size * (_SHADING_KNOTS - 1)
    weights = np.maximum(0.0, 1.0 - np.abs(position[:, None] - np.arange(_SHADING_KNOTS)[None, :]))
    return weights.astype(np.float32)


def _shading(rng, size) -> np.ndarray:
    """(3, size, size): a linear brightness gradient plus smooth coloured blotches, added to the image."""
    angle, slope = rng.uniform(0, 2 * np.pi), rng.uniform(-0.15, 0.15)
    t = _KNOT_POSITIONS
    gradient = slope * (t[None, :] * math.cos(angle) + t[:, None] * math.sin(angle))
    knots = (gradient + rng.normal(0, 0.04, size=(3, _SHADING_KNOTS, _SHADING_KNOTS))).astype(np.float32)
    up = _upsampler(size)  # linear interpolation reproduces the gradient exactly
    return up @ knots @ up.T


def render(label: int, rng: np.random.Generator, image_size: int = 64) -> np.ndarray:
    """One image of class `SHAPE_CLASSES[label]` drawn with `rng`: uint8 (image_size, image_size, 3)."""
    if not 0 <= label < len(SHAPE_CLASSES):
        raise ValueError(f"label={label}: expected a class index in [0, {len(SHAPE_CLASSES)})")
    mask = _DRAW[SHAPE_CLASSES[label]](rng, image_size)
    fg, bg = _colours(rng)
    # Composed channels-first: numpy broadcasts over a trailing axis of 3 several times slower.
    image = _shading(rng, image_size)
    image += bg[:, None, None]
    image += mask[None] * (fg - bg)[:, None, None]
    # Uniform pixel noise (standard deviation 0.01-0.05): several times cheaper to draw than Gaussian.
    amplitude = np.float32(rng.uniform(0.01, 0.05) * math.sqrt(12))
    image += (rng.random(size=image.shape, dtype=np.float32) - np.float32(0.5)) * amplitude
    pixels = (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(pixels.transpose(1, 2, 0))


def _check_int(name: str, value, low: int, high: int) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}={value!r}: expected an integer") from None
    if not low <= value < high:
        raise ValueError(f"{name}={value}: expected an integer in [{low}, {high})")
    return value


class SyntheticShapes:
    """A deterministic random-access dataset: `ds[i]` is `(PIL RGB image, label)`, a function of (seed, i).

    `split` picks one of two disjoint streams of samples, "train" or "val", for the same seed.
    """

    def __init__(
        self,
        num_samples: int,
        image_size: int = 64,
        seed: int = 0,
        num_classes: int = 10,
        split: str = "train",
    ):
        self.num_samples = _check_int("num_samples", num_samples, 0, _MAX_INDEX)
        self.image_size = _check_int("image_size", image_size, 16, 4097)
        self.seed = _check_int("seed", seed, 0, _MAX_INDEX)
        self.num_classes = _check_int("num_classes", num_classes, 2, len(SHAPE_CLASSES) + 1)
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
        self.split = split
        self.classes: list[str] = list(SHAPE_CLASSES[: self.num_classes])

    def __len__(self) -> int:
        return self.num_samples

    def label(self, index: int) -> int:
        """The class of sample `index`, without drawing it."""
        return self._index(index) % self.num_classes

    def rng(self, index: int) -> np.random.Generator:
        """The generator that draws sample `index`."""
        entropy = [self.seed, self._index(index)] + ([1] if self.split == "val" else [])
        return np.random.default_rng(np.random.SeedSequence(entropy))

    def array(self, index: int) -> np.ndarray:
        """Sample `index` as uint8 (image_size, image_size, 3)."""
        return render(self.label(index), self.rng(index), self.image_size)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.array(index)), self.label(index)  # uint8 (H, W, 3) is RGB

    def _index(self, index) -> int:
        index = operator.index(index)
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a dataset of {self.num_samples} samples")
        return index

    def __repr__(self) -> str:
        return (
            f"SyntheticShapes(num_samples={self.num_samples}, image_size={self.image_size}, seed={self.seed}, "
            f"num_classes={self.num_classes}, split={self.split!r})"
        )


# The image folder: root/{train,val}/<class>/<index>.png, complete when the manifest exists.


def _manifest(num_train, num_val, image_size, seed, num_classes) -> dict:
    return {
        "format": "mlx-aim-synthetic-shapes",
        "generator_version": GENERATOR_VERSION,
        "image_size": image_size,
        "seed": seed,
        "classes": list(SHAPE_CLASSES[:num_classes]),
        "num_train": num_train,
        "num_val": num_val,
    }


def _read_manifest(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _check_only_ours(root: Path) -> None:
    """Refuses to delete a folder unless it holds nothing but what `write_image_folder` writes."""
    if not root.is_dir():
        raise ValueError(f"{root}: exists and is not a folder; expected a folder for the synthetic images")
    allowed_top = {*SPLITS, MANIFEST_NAME, MANIFEST_NAME + ".tmp"}  # ".tmp": the manifest's old temporary name
    for entry in root.iterdir():
        if entry.name not in allowed_top and not fnmatch.fnmatch(entry.name, temporary_glob(MANIFEST_NAME)):
            raise ValueError(
                f"{root}: holds {entry.name!r}, which is not part of a synthetic-shapes folder; refusing to "
                f"overwrite it (pick an empty or new folder)"
            )
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.exists():
            continue
        for class_dir in split_dir.iterdir():
            if not (class_dir.is_dir() and class_dir.name in SHAPE_CLASSES):
                raise ValueError(f"{class_dir}: not a synthetic-shapes class folder; refusing to overwrite {root}")
            for file in class_dir.iterdir():
                if not (file.suffix == ".png" and file.stem.isdigit()):
                    raise ValueError(f"{file}: not a synthetic-shapes image; refusing to overwrite {root}")


def write_image_folder(
    root: str | os.PathLike,
    num_train: int,
    num_val: int,
    image_size: int = 64,
    seed: int = 0,
    num_classes: int = 10,
) -> Path:
    """Writes `root/train/<class>/<i>.png` and `root/val/<class>/<i>.png`; returns `root`.

    Training images are `SyntheticShapes(num_train, ..., split="train")`, validation images the
    disjoint `split="val"` stream. A folder already complete for the same parameters is left untouched.
    The manifest `root/synthetic_shapes.json` is written last (under a temporary name, then renamed), so a
    folder without it is a partial write, and is rebuilt; so is one written with other parameters.
    """
    num_train = _check_int("num_train", num_train, 1, _MAX_INDEX)
    num_val = _check_int("num_val", num_val, 0, _MAX_INDEX)
    splits = {
        "train": SyntheticShapes(num_train, image_size, seed, num_classes, split="train"),
        "val": SyntheticShapes(num_val, image_size, seed, num_classes, split="val"),
    }
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    manifest = _manifest(num_train, num_val, splits["train"].image_size, splits["train"].seed, num_classes)
    if _read_manifest(manifest_path) == manifest:
        return root

    if root.exists():
        _check_only_ours(root)
        manifest_path.unlink(missing_ok=True)  # the folder is incomplete from here until the end
        remove_stale_temporaries(root, MANIFEST_NAME)
        (root / (MANIFEST_NAME + ".tmp")).unlink(missing_ok=True)
        for split in SPLITS:
            shutil.rmtree(root / split, ignore_errors=True)
    for split, dataset in splits.items():
        for name in dataset.classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
    total = num_train + num_val
    with tqdm(total=total, desc=f"synthetic shapes -> {root}", unit="img", disable=None) as progress:
        for split, dataset in splits.items():
            for i in range(len(dataset)):
                image, label = dataset[i]
                # Level 1: the pixel noise leaves little to compress, and higher levels only cost time.
                image.save(root / split / dataset.classes[label] / f"{i}.png", format="PNG", compress_level=1)
                progress.update()

    write_json(manifest_path, manifest)
    return root
