"""Images in, float32 HWC arrays out: loading, and the evaluation and training transforms. numpy and Pillow,
with pillow-heif for HEIC and rawpy (optional) for camera RAW files.

- `load_image` turns a path, a PIL image or a uint8 array into an upright 8-bit RGB PIL image, or raises
  `ImageLoadError` naming the file and the reason. Besides Pillow's own formats it reads HEIC/HEIF, AVIF and
  camera RAW files (their embedded preview); `formats.py` says which files are images and what reads them.
- `eval_transform` / `EvalTransform`: Apple's evaluation preprocessing (short side to 256 with bicubic,
  center crop 224, ImageNet normalisation), generalised to other sizes, with torchvision's rounding rules.
- `TrainTransform`: AIM's pre-training augmentation (random resized crop, horizontal flip, color jitter),
  driven by an explicit `np.random.Generator` so results follow from a seed.
"""

from __future__ import annotations

import io
import math
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

from .formats import is_raw, missing_support, rawpy_module

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Smaller images carry no usable content (and break the crop arithmetic): they are rejected.
MIN_IMAGE_SIDE = 2
# A RAW file's embedded preview smaller than this on its short side (the 256 that the 224 evaluation transform
# resizes to) would lose detail the raw data has: the raw data is demosaiced instead.
RAW_PREVIEW_MIN_SIDE = 256

ImageInput = Union[str, os.PathLike, BinaryIO, Image.Image, np.ndarray]

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

    `image` is a path, a binary file open for reading (its `name`, when it has one, says its format, as a path's
    extension does), a PIL image, or a uint8 numpy array (HxW gray, HxWx1, HxWx3 RGB or HxWx4 RGBA).
    The EXIF orientation tag is honoured (`ImageOps.exif_transpose`); multi-frame files give their first
    frame (a HEIF file its primary image). HEIC/HEIF files are decoded by pillow-heif, which applies their
    rotation itself and reports orientation 1, AVIF files by Pillow, which reports theirs as EXIF orientation.
    A camera RAW file (`formats.RAW_EXTENSIONS`, with the `raw` extra) gives its embedded preview, turned as
    LibRaw says the photo is (the preview's own EXIF orientation is not applied on top); a RAW file without
    a preview, or with one under `RAW_PREVIEW_MIN_SIDE` pixels on its short side, gives its raw data
    demosaiced by LibRaw at half size with the camera's white balance. Modes become RGB this way:

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

    Raises `ImageLoadError` (a ValueError) naming the file and the reason for a missing file, a format this
    installation cannot read (`formats.missing_support`: RAW without the `raw` extra, say), a file Pillow
    cannot identify, a truncated or corrupt file, an image with a side under `MIN_IMAGE_SIDE` pixels, and
    a file with more pixels than Pillow's decompression-bomb limit `PIL.Image.MAX_IMAGE_PIXELS` (raise or
    clear that limit to load such files; Pillow also warns about them).
    """
    if isinstance(image, np.ndarray):
        source = f"<array shape={image.shape} dtype={image.dtype}>"
        return _finish(_array_to_pil(image, source), source)
    if isinstance(image, Image.Image):
        source = getattr(image, "filename", "") or f"<PIL image mode={image.mode} size={image.size}>"
        return _decode(lambda: (image, ImageOps.exif_transpose), source, check_pixels=False)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise ImageLoadError(path, "no such file")
        if path.is_dir():
            raise ImageLoadError(path, "is a directory, not an image file")
        return _open_file(path, path)
    if hasattr(image, "read"):
        name = getattr(image, "name", None)
        return _open_file(image, name if isinstance(name, (str, os.PathLike)) else "<file object>")
    raise TypeError(
        f"load_image: expected a path, a binary file, a PIL image or a uint8 numpy array, got {type(image).__name__}"
    )


def _open_file(file: Union[Path, BinaryIO], source: Any) -> Image.Image:
    """A file (a path, or an open binary file named `source`), read by what its format needs."""
    reason = missing_support(source)
    if reason is not None:
        raise ImageLoadError(source, reason)
    if is_raw(source):
        return _decode(lambda: _open_raw(file), source, check_pixels=True)
    return _decode(lambda: (Image.open(file), ImageOps.exif_transpose), source, check_pixels=True)


Orient = Callable[[Image.Image], Image.Image]


def _decode(open_image: Callable[[], tuple[Image.Image, Orient]], source: Any, check_pixels: bool) -> Image.Image:
    """`open_image()` gives the (lazily decoded) image and the function that turns it upright."""
    try:
        opened, orient = open_image()
        try:
            if check_pixels:
                _check_pixel_limit(opened, source)
            opened.load()  # decode now, so truncation shows up here and not in a later transform
            upright = orient(opened)  # a new image: closing the file leaves it intact
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


# LibRaw's `flip` (dcraw's: bit 4 swaps the axes, then bit 2 flips rows, bit 1 columns) as Pillow's transposes.
_LIBRAW_FLIPS = {
    1: Image.Transpose.FLIP_LEFT_RIGHT, 2: Image.Transpose.FLIP_TOP_BOTTOM, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.TRANSPOSE, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
}


def _open_raw(file: Union[Path, BinaryIO]) -> tuple[Image.Image, Orient]:
    """A RAW file's embedded preview and the transpose that turns it upright (LibRaw's orientation), or, without a
    usable preview, its raw data demosaiced at half size (LibRaw turns that itself)."""
    rawpy = rawpy_module()
    try:
        with rawpy.imread(file if hasattr(file, "read") else os.fspath(file)) as raw:
            preview = _raw_preview(raw, rawpy)
            if preview is not None and min(preview.size) >= RAW_PREVIEW_MIN_SIDE:
                transpose = _LIBRAW_FLIPS.get(raw.sizes.flip)
                return preview, (lambda img: img.transpose(transpose) if transpose is not None else img.copy())
            rgb = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8)
    except rawpy.LibRawError as error:  # LibRaw's errors are plain Exceptions: say what failed
        raise OSError(f"LibRaw cannot read it ({type(error).__name__}: {error})") from None
    return Image.fromarray(rgb), Image.Image.copy  # a copy, as the caller closes what it opened


def _raw_preview(raw, rawpy) -> Optional[Image.Image]:
    """The embedded preview LibRaw picks (the largest), not yet decoded; None where the file has none it can give.
    A JPEG preview's own EXIF orientation is dropped: LibRaw's orientation of the RAW file is the one applied."""
    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        return None
    if thumb.format == rawpy.ThumbFormat.JPEG:
        return Image.open(io.BytesIO(thumb.data))
    if thumb.format == rawpy.ThumbFormat.BITMAP and thumb.data.dtype == np.uint8:  # HxWx3 RGB, or HxWx1 gray
        return Image.fromarray(np.ascontiguousarray(thumb.data[..., :3] if thumb.data.shape[-1] >= 3
                                                    else thumb.data[..., 0]))
    return None


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


def resize_short_side(img: Image.Image, size: int, resample: Image.Resampling = _BICUBIC) -> Image.Image:
    """Resize (bicubic unless `resample` says) so the short side is `size`, as torchvision's `Resize(size)`
    and transformers' `{"shortest_edge": size}` do for PIL images.

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
    return img.resize(new_size, resample)


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
