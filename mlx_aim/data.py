"""Images in, float32 NHWC arrays out: loading, the evaluation and training transforms, image folders and
a background batch loader. numpy + Pillow only.

- `load_image` turns a path, a PIL image or a uint8 array into an upright 8-bit RGB PIL image, or raises
  `ImageLoadError` naming the file and the reason.
- `eval_transform` / `EvalTransform`: Apple's evaluation preprocessing (short side to 256 with bicubic,
  center crop 224, ImageNet normalisation), generalised to other sizes, with torchvision's rounding rules.
- `TrainTransform`: AIM's pre-training augmentation (random resized crop, horizontal flip, color jitter),
  driven by an explicit `np.random.Generator` so results follow from a seed.
- `list_images`, `ImageFolder`, `split_image_folder`, `split_images`, `load_splits`: finding images (and
  labels) on disk and holding some out.
- `BatchLoader`: decodes and augments in worker threads (Pillow releases the GIL), in an order and with
  random numbers that depend only on (seed, epoch, sample), so runs resume exactly and shard over ranks.
"""

from __future__ import annotations

import copy
import functools
import glob
import math
import os
import struct
import warnings
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Smaller images carry no usable content (and break the crop arithmetic): they are rejected.
MIN_IMAGE_SIDE = 2
UNLABELLED_SPLIT_STREAM = 103  # first word of the seed that picks the held-out images of `split_images`

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]
PathInput = Union[str, os.PathLike]

_BICUBIC = Image.Resampling.BICUBIC
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_WIDE_GRAY_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


class ImageLoadError(ValueError):
    """An image that cannot be used. `source` names the file (or describes the array), `reason` says why."""

    def __init__(self, source: Any, reason: str):
        super().__init__(source, reason)  # both in args, so the exception pickles and copies
        self.source = source
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot load image {self.source}: {self.reason}"


# ----------------------------------------------------------------------------------------------------
# Loading


def load_image(image: ImageInput) -> Image.Image:
    """Return `image` as an upright 8-bit RGB PIL image.

    `image` is a path, a PIL image, or a uint8 numpy array (HxW gray, HxWx1, HxWx3 RGB or HxWx4 RGBA).
    The EXIF orientation tag is honoured (`ImageOps.exif_transpose`); multi-frame files give their first
    frame. Modes become RGB this way:

    - alpha (LA, La, PA, RGBA, RGBa, and P/L/RGB images with a transparency key) is composited onto a
      white background: `round(c * a / 255 + 255 * (1 - a / 255))`, so transparent pixels are white
      whatever colour the file stores under them;
    - 16-bit gray (I;16, I;16B, ...) uses the full 16-bit range: `round(v / 257)`;
    - 32-bit integer (I) and float (F) gray, whose range the file does not state, are read in the
      smallest nominal range that holds every finite value: [0, 1] (F only), [0, 255], [0, 65535];
      values outside all of them (negative, or larger) are stretched linearly from their minimum to their
      maximum. NaN counts as the range's low end, +-inf as its ends;
    - every other mode (1, L, P, CMYK, YCbCr, HSV, ...) uses Pillow's `convert("RGB")` (for CMYK that is
      the plain formula, without ICC colour management).

    Raises `ImageLoadError` (a ValueError) naming the file and the reason for a missing file, a file Pillow
    cannot identify, a truncated or corrupt file, an image with a side under `MIN_IMAGE_SIDE` pixels, and
    a file with more pixels than Pillow's decompression-bomb limit `PIL.Image.MAX_IMAGE_PIXELS` (raise or
    clear that limit to load such files; Pillow also warns about them).
    """
    if isinstance(image, np.ndarray):
        source = f"<array shape={image.shape} dtype={image.dtype}>"
        return _finish(_array_to_pil(image, source), source)
    if isinstance(image, Image.Image):
        source = getattr(image, "filename", "") or f"<PIL image mode={image.mode} size={image.size}>"
        return _decode(lambda: image, source, check_pixels=False)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise ImageLoadError(path, "no such file")
        if path.is_dir():
            raise ImageLoadError(path, "is a directory, not an image file")
        return _decode(lambda: Image.open(path), path, check_pixels=True)
    raise TypeError(
        f"load_image: expected a path, a PIL image or a uint8 numpy array, got {type(image).__name__}"
    )


def _decode(open_image: Callable[[], Image.Image], source: Any, check_pixels: bool) -> Image.Image:
    try:
        opened = open_image()
        try:
            if check_pixels:
                _check_pixel_limit(opened, source)
            opened.load()  # decode now, so truncation shows up here and not in a later transform
            upright = ImageOps.exif_transpose(opened)  # a new image: closing the file leaves it intact
            return _finish(_to_rgb(upright), source)
        finally:
            if check_pixels:
                opened.close()
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageLoadError(source, f"past Pillow's decompression-bomb limit ({error})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(source, "not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, MemoryError) as error:
        raise ImageLoadError(source, f"decoding failed: {type(error).__name__}: {error}") from None


def _check_pixel_limit(img: Image.Image, source: Any) -> None:
    # Pillow itself raises only past twice the limit and merely warns past it; treat both as errors.
    limit = Image.MAX_IMAGE_PIXELS
    width, height = img.size
    if limit is not None and width * height > limit:
        raise ImageLoadError(
            source,
            f"{width}x{height} = {width * height} pixels is past Pillow's decompression-bomb limit "
            f"PIL.Image.MAX_IMAGE_PIXELS = {limit}",
        )


def _finish(img: Image.Image, source: Any) -> Image.Image:
    if min(img.size) < MIN_IMAGE_SIDE:
        raise ImageLoadError(
            source, f"{img.width}x{img.height} pixels: expected at least {MIN_IMAGE_SIDE} on each side"
        )
    return img


def _array_to_pil(array: np.ndarray, source: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageLoadError(source, "expected a uint8 array (HxW, HxWx1, HxWx3 or HxWx4)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageLoadError(source, "expected an HxW, HxWx1, HxWx3 or HxWx4 array")
    return _to_rgb(Image.fromarray(np.ascontiguousarray(array)))  # L, RGB or RGBA from the shape


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _WIDE_GRAY_MODES:
        return Image.fromarray(_wide_gray_to_uint8(np.asarray(img), mode)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        return Image.fromarray(_composite_on_white(np.asarray(img.convert("RGBA"))))
    try:
        return img.convert("RGB")
    except ValueError as error:  # e.g. LAB: Pillow has no conversion without a colour profile
        raise ValueError(f"mode {mode} has no conversion to RGB ({error})") from None


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:].astype(np.uint32)
    # (c * a + 255 * (255 - a)) / 255 is never exactly k + 1/2 (255 is odd), so +127 // 255 rounds.
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _wide_gray_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    values = values.astype(np.float64)
    if mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    else:
        finite = values[np.isfinite(values)]
        vmin = float(finite.min()) if finite.size else 0.0
        vmax = float(finite.max()) if finite.size else 0.0
        if vmin >= 0 and vmax <= 1 and mode == "F":
            low, high = 0.0, 1.0
        elif vmin >= 0 and vmax <= 255:
            low, high = 0.0, 255.0
        elif vmin >= 0 and vmax <= 65535:
            low, high = 0.0, 65535.0
        else:
            low, high = vmin, vmax
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    if high <= low:  # a constant image outside every nominal range
        return np.zeros(values.shape, np.uint8)
    return np.clip(np.rint((values - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Geometry and normalisation shared by the transforms


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the short side is `size`, as torchvision's `Resize(size)` does for PIL images.

    The long side becomes `int(size * long / short)` (truncated); when width == height the width counts
    as the short side; an image already at the target size is returned unchanged.
    """
    width, height = img.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    if new_size == img.size:
        return img
    return img.resize(new_size, _BICUBIC)


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of a centered `size` x `size` crop, with torchvision's `int(round(...))` offsets."""
    if size > height or size > width:
        raise ValueError(f"center crop {size} is larger than the {width}x{height} image")
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(mean, dtype=np.float32).reshape(-1)
    std = np.asarray(std, dtype=np.float32).reshape(-1)
    if mean.shape != (3,) or std.shape != (3,):
        raise ValueError(f"mean and std: expected 3 values each (R, G, B), got {mean.size} and {std.size}")
    if not np.all(std > 0):
        raise ValueError(f"std={std.tolist()}: expected positive values")
    return mean, std


def _to_float(img: Image.Image, mean: Optional[np.ndarray], std: Optional[np.ndarray]) -> np.ndarray:
    # Same float32 operations as ToTensor (divide by 255) then Normalize (subtract, divide).
    array = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    if mean is not None:
        array -= mean
        array /= std
    return array


def _check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size={image_size!r}: expected a positive integer")
    return int(image_size)


# ----------------------------------------------------------------------------------------------------
# Evaluation transform


def eval_transform(
    image: ImageInput,
    image_size: int = 224,
    crop_ratio: float = 0.875,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    normalize: bool = True,
) -> np.ndarray:
    """Apple's evaluation preprocessing: a float32 (image_size, image_size, 3) array (HWC, MLX's layout).

    Loads `image` with `load_image`, resizes its short side to `round(image_size / crop_ratio)` with
    bicubic (256 for 224), center crops `image_size`, scales to [0, 1] and, with `normalize`, subtracts
    `mean` and divides by `std` per channel.
    """
    image_size = _check_image_size(image_size)
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"crop_ratio={crop_ratio!r}: expected a value in (0, 1]")
    mean, std = _check_mean_std(mean, std) if normalize else (None, None)
    img = resize_short_side(load_image(image), int(round(image_size / crop_ratio)))
    top, left = center_crop_box(img.height, img.width, image_size)
    img = img.crop((left, top, left + image_size, top + image_size))
    return _to_float(img, mean, std)


class EvalTransform:
    """`eval_transform` with fixed settings, callable as `t(image, rng=None)` like `TrainTransform`."""

    def __init__(
        self,
        image_size: int = 224,
        crop_ratio: float = 0.875,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        normalize: bool = True,
    ):
        self.image_size = _check_image_size(image_size)
        if not 0 < crop_ratio <= 1:
            raise ValueError(f"crop_ratio={crop_ratio!r}: expected a value in (0, 1]")
        _check_mean_std(mean, std)
        self.crop_ratio = crop_ratio
        self.mean, self.std, self.normalize = tuple(mean), tuple(std), normalize

    def __call__(self, image: ImageInput, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        return eval_transform(image, self.image_size, self.crop_ratio, self.mean, self.std, self.normalize)

    def __repr__(self) -> str:
        return (f"EvalTransform(image_size={self.image_size}, crop_ratio={self.crop_ratio}, "
                f"normalize={self.normalize})")


# ----------------------------------------------------------------------------------------------------
# Training augmentation


def sample_crop_box(
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) of a random resized crop, with torchvision's sampling rule.

    Up to 10 attempts draw an area fraction uniformly from `scale` and an aspect ratio (width / height)
    log-uniformly from `ratio`; the first box that fits is placed uniformly at random. If none fits, the
    fallback is the largest central box whose aspect ratio is clamped into `ratio`.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_w, crop_h = int(round(height * max(ratio))), height
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def shift_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """Rotate the hue of an RGB image by `hue_factor` turns (in [-0.5, 0.5]) in Pillow's 8-bit HSV.

    The shift is `int(hue_factor * 255)` hue steps (truncated toward zero) with wrap-around, as torchvision.
    """
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor={hue_factor}: expected a value in [-0.5, 0.5]")
    shift = int(hue_factor * 255) % 256
    hue, saturation, value = img.convert("HSV").split()
    hue = hue.point([(h + shift) % 256 for h in range(256)])
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")


def color_jitter(
    img: Image.Image,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    rng: np.random.Generator,
) -> Image.Image:
    """torchvision's ColorJitter on an RGB PIL image: the four adjustments in a random order.

    Factors are drawn uniformly from [max(0, 1 - b), 1 + b] (same for contrast and saturation) and the hue
    shift from [-hue, hue]; an adjustment whose strength is 0 is skipped and draws nothing.
    """
    order = rng.permutation(4)
    factors = [
        rng.uniform(max(0.0, 1 - strength), 1 + strength) if strength > 0 else None
        for strength in (brightness, contrast, saturation)
    ]
    factors.append(rng.uniform(-hue, hue) if hue > 0 else None)
    for which in order:
        factor = factors[which]
        if factor is None:
            continue
        if which == 0:
            img = ImageEnhance.Brightness(img).enhance(factor)
        elif which == 1:
            img = ImageEnhance.Contrast(img).enhance(factor)
        elif which == 2:
            img = ImageEnhance.Color(img).enhance(factor)
        else:
            img = shift_hue(img, factor)
    return img


class TrainTransform:
    """AIM's pre-training augmentation, called as `t(image, rng)` with an explicit `np.random.Generator`.

    Random resized crop (`sample_crop_box`, then bicubic resize to `image_size`), horizontal flip with
    probability `hflip`, then with probability `jitter_prob` color jitter with strengths
    `color_jitter = (brightness, contrast, saturation, hue)`; then [0, 1] scaling and, with `normalize`,
    per-channel `(x - mean) / std`. Returns float32 (image_size, image_size, 3).

    The random numbers are drawn in a fixed order from `rng` (crop, flip, jitter gate, jitter), so the
    same generator state gives the same output.
    """

    def __init__(
        self,
        image_size: int = 224,
        scale: Sequence[float] = (0.4, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        jitter_prob: float = 0.8,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        normalize: bool = True,
    ):
        self.image_size = _check_image_size(image_size)
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale={tuple(scale)}: expected (low, high) with 0 < low <= high")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio={tuple(ratio)}: expected (low, high) with 0 < low <= high")
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip={hflip}: expected a probability in [0, 1]")
        if not 0 <= jitter_prob <= 1:
            raise ValueError(f"jitter_prob={jitter_prob}: expected a probability in [0, 1]")
        self.color_jitter = tuple(float(c) for c in color_jitter)
        if len(self.color_jitter) != 4 or min(self.color_jitter) < 0 or self.color_jitter[3] > 0.5:
            raise ValueError(
                f"color_jitter={tuple(color_jitter)}: expected (brightness, contrast, saturation, hue), "
                "each >= 0, hue <= 0.5"
            )
        self.hflip, self.jitter_prob = float(hflip), float(jitter_prob)
        self.normalize = normalize
        self.mean, self.std = _check_mean_std(mean, std) if normalize else (None, None)

    def __call__(self, image: ImageInput, rng: np.random.Generator) -> np.ndarray:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"TrainTransform needs an np.random.Generator, got {type(rng).__name__}")
        img = load_image(image)
        top, left, crop_h, crop_w = sample_crop_box(img.height, img.width, self.scale, self.ratio, rng)
        # Crop, then resize (not resize(box=...)): the border pixels then match torchvision's resized_crop.
        img = img.crop((left, top, left + crop_w, top + crop_h))
        img = img.resize((self.image_size, self.image_size), _BICUBIC)
        if rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < self.jitter_prob and any(self.color_jitter):
            img = color_jitter(img, *self.color_jitter, rng)
        return _to_float(img, self.mean, self.std)

    def __repr__(self) -> str:
        return (f"TrainTransform(image_size={self.image_size}, scale={self.scale}, ratio={self.ratio}, "
                f"hflip={self.hflip}, color_jitter={self.color_jitter}, jitter_prob={self.jitter_prob}, "
                f"normalize={self.normalize})")


# ----------------------------------------------------------------------------------------------------
# Finding images on disk


def _has_glob_magic(text: str) -> bool:
    return any(char in text for char in "*?[")


def _walk_images(folder: Path, extensions: frozenset) -> Iterator[Path]:
    """Image files under `folder`, recursively, following symbolic links once; hidden names skipped."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link loop, or two links to one folder
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            # Hidden files include macOS's "._name.jpg" metadata files, which are not images.
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                yield Path(dirpath) / name


def list_images(
    inputs: Union[PathInput, Iterable[PathInput]], extensions: Iterable[str] = IMAGE_EXTENSIONS
) -> list[Path]:
    """Image files named by `inputs`: sorted, without duplicates.

    Each input is a file (kept whatever its extension), a folder (searched recursively, following
    symbolic links, skipping hidden files and folders), or a glob pattern (`**` spans folders; matched
    folders are searched, matched files are kept when their extension is an image one). Extensions are
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
                images = set(_walk_images(path, extensions))
            else:
                images = {path}
        elif _has_glob_magic(text):
            matches = glob.glob(text, recursive=True)
            if not matches:
                raise FileNotFoundError(f"no file or folder matches the pattern {text!r}")
            images = set()
            for match in map(Path, matches):
                if match.is_dir():
                    images.update(_walk_images(match, extensions))
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


# ----------------------------------------------------------------------------------------------------
# Batches

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
    and the list of paths, decoded and transformed by `num_workers` threads with up to `prefetch` batches
    in flight.

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
    failures in a row for one slot, RuntimeError.

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
        num_workers: int = 2,
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
        raise RuntimeError(
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
        plans = self._plans()
        if self.num_workers == 0:
            for epoch, indices, after in plans:
                results = [self._load_sample(epoch, i) for i in indices]
                self.epoch, self.position = after
                yield self._collate(results)
            return
        executor = ThreadPoolExecutor(self.num_workers, thread_name_prefix="mlx_aim-data")
        pending: deque[tuple[list[Future], tuple[int, int]]] = deque()
        try:
            for epoch, indices, after in plans:
                pending.append(([executor.submit(self._load_sample, epoch, i) for i in indices], after))
                if len(pending) <= self.prefetch:  # `prefetch` batches stay in flight while one is used
                    continue
                futures, after = pending.popleft()
                results = [f.result() for f in futures]
                self.epoch, self.position = after
                yield self._collate(results)
            while pending:
                futures, after = pending.popleft()
                results = [f.result() for f in futures]
                self.epoch, self.position = after
                yield self._collate(results)
        finally:
            for futures, _ in pending:
                for future in futures:
                    future.cancel()
            executor.shutdown(wait=True, cancel_futures=True)
