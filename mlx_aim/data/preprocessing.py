"""Each checkpoint's own preprocessing, as data: `Preprocessing` (the settings, callable as a transform),
read from the `preprocessor_config.json` that ships with a checkpoint, or a family's documented default.

    prep = preprocessing_for(model.config, "path/to/checkpoint")   # the file there, else the family default
    pixels = prep("cat.jpg")                                      # float32 HWC, ready for the model

The defaults, per family, where no file ships:

- AIM v1: Apple's evaluation transform (`eval_transform`): short side to round(size / 0.875) (256 for 224),
  bicubic, center crop `image_size`, ImageNet mean/std, torchvision's rounding of the crop offset.
- AIMv2 at a fixed size: what the hub's `preprocessor_config.json` (a CLIPImageProcessor) says: short side to
  the crop size (crop ratio 1.0), bicubic, center crop, CLIP mean/std, transformers' rounding of the offset.
- AIMv2 at native resolution: no resize and no crop; CLIP mean/std; the image's own size floored to the patch
  grid by dropping the right and bottom remainder (the top-left crop keeps exactly the pixels the stride-14
  patch conv of Apple's and transformers' models reads from the uncropped image, so tokens match theirs; a
  centered crop would shift every patch), refused past `max_patches` (default `MAX_PATCHES`).

Where the sources disagree: the hub's preprocessor_config.json files use CLIP mean/std and crop ratio 1.0; Apple's
ml-aim README evaluates AIMv2 with AIM v1's transform (ImageNet mean/std, ratio 0.875); the
released training configs (apple/ml-l3m) normalise with ImageNet statistics. We follow the file that ships
with the weights, and the hub file's settings where none does. A native checkpoint's file contributes its
colour settings only: native means no resize and no crop, whatever geometry the file names.

The two libraries also round differently, and each source is reproduced in its own library's rule: the crop
offset is `int(round((H - h) / 2))` (round half to even) in torchvision, `(H - h) // 2` in transformers, so
the crops differ by one pixel when the excess is 3 modulo 4. Scaling `x * rescale_factor` in float64 then
casting to float32 (transformers) equals torchvision's float32 `x / 255` for every 8-bit value.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from ..models.config import MAX_PATCHES
from ..fileio import MAX_CONFIG_BYTES, confined, read_json
from .images import IMAGENET_MEAN, IMAGENET_STD, ImageInput, ImageLoadError, load_image, resize_short_side

PREPROCESSOR_CONFIG = "preprocessor_config.json"  # transformers' name for an image processor's settings
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_ROUNDINGS = ("round", "floor")  # torchvision's int(round(excess / 2)), transformers' excess // 2
# A checkpoint's preprocessor_config.json may resize a fixed-size model's images to at most this many times its image
# size (the released files resize to 1x, AIM v1's transform to 1.14x): past it, a file could make each image a
# machine-sized allocation. A native model's bound is its longest possible side, `max_patches` patches in one row.
MAX_RESIZE_FACTOR = 4
# PIL's resampling codes, as `resample` in a preprocessor_config.json holds them.
RESAMPLE_CODES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_RESAMPLE_FILTERS = {name: Image.Resampling[name.upper()] for name in RESAMPLE_CODES.values()}
# CLIPImageProcessor's class defaults: what transformers uses for a key the file leaves out.
_CLIP_DEFAULTS = {"do_resize": True, "size": {"shortest_edge": 224}, "resample": 3, "do_center_crop": True,
                  "crop_size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255,
                  "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
                  "do_convert_rgb": True}


class TooManyPatches(ImageLoadError):
    """A native-resolution image whose patch grid is past the `max_patches` guard. An `ImageLoadError` (so
    the batchers skip it and list it, and a direct call raises a ValueError) naming the image, its grid and
    the limit."""

    def __init__(self, source: Any, grid: tuple[int, int], max_patches: int):
        rows, cols = grid
        reason = (f"its {cols}x{rows} patch grid (width x height) is {rows * cols} patches, past the limit "
                  f"max_patches={max_patches} (raise it, or resize the image)")
        super().__init__(source, reason)
        self.grid, self.max_patches = grid, max_patches

    def __str__(self) -> str:
        return f"image {self.source}: {self.reason}"

    def __reduce__(self):  # the constructor's arguments differ from ImageLoadError's
        return type(self), (self.source, self.grid, self.max_patches)


def _describe(image: ImageInput) -> Any:
    if isinstance(image, (str, os.PathLike)):
        return image
    if isinstance(image, Image.Image):
        return getattr(image, "filename", "") or f"<PIL image {image.width}x{image.height}>"
    return f"<array shape={getattr(image, 'shape', '?')}>"


@dataclass(frozen=True)
class Preprocessing:
    """How images become model input, as data; `prep(image)` applies it (the `EvalTransform` interface).

    Steps, in order: load as 8-bit RGB (`load_image`); if `resize`, short side to `resize` with `resample`
    (long side truncated, as torchvision and transformers do); if `crop_size` (height, width), a center crop
    whose offsets are rounded by `crop_rounding` ("round": torchvision, "floor": transformers); if `native`,
    the top-left `patch_size`-multiple of the image, refused (`TooManyPatches`) past `max_patches` patches
    (None: no limit); then `x * rescale_factor` (float64, cast to float32; None: no rescale) and, with
    `mean`/`std` (None: no normalisation), `(x - mean) / std` per channel in float32. Returns float32 HWC.

    `source` says where the settings came from (a file, or a family default), for records and messages; it
    takes no part in equality (`==` means the same pixels) nor in `settings()`.
    """

    mean: Optional[tuple[float, float, float]] = IMAGENET_MEAN
    std: Optional[tuple[float, float, float]] = IMAGENET_STD
    resize: Optional[int] = 256
    crop_size: Optional[tuple[int, int]] = (224, 224)
    resample: str = "bicubic"
    crop_rounding: str = "round"
    rescale_factor: Optional[float] = 1 / 255
    native: bool = False
    patch_size: Optional[int] = None
    max_patches: Optional[int] = MAX_PATCHES
    source: str = field(default="AIM v1 default", compare=False)

    def __post_init__(self):
        if (self.mean is None) != (self.std is None):
            raise ValueError("preprocessing: mean and std are both given (normalise) or both None")
        if self.mean is not None:
            object.__setattr__(self, "mean", _three_floats(self.mean, "mean"))
            object.__setattr__(self, "std", _three_floats(self.std, "std"))
            if min(self.std) <= 0:
                raise ValueError(f"preprocessing std={self.std}: expected positive values")
        if self.resize is not None:
            _positive_int(self.resize, "resize")
        if self.crop_size is not None:
            crop = tuple(self.crop_size) if isinstance(self.crop_size, (tuple, list)) else None
            if crop is None or len(crop) != 2:
                raise ValueError(f"preprocessing crop_size={self.crop_size!r}: expected (height, width)")
            object.__setattr__(self, "crop_size", tuple(_positive_int(v, "crop_size") for v in crop))
            if self.resize is not None and max(self.crop_size) > self.resize:
                # transformers pads such a crop with zeros; a crop past the short side is a settings mistake.
                raise ValueError(f"preprocessing crop_size={self.crop_size} is larger than the resized short "
                                 f"side {self.resize}: the crop would leave the image")
        if self.resample not in _RESAMPLE_FILTERS:
            raise ValueError(f"preprocessing resample={self.resample!r}: expected one of "
                             f"{', '.join(_RESAMPLE_FILTERS)}")
        if self.crop_rounding not in CROP_ROUNDINGS:
            raise ValueError(f"preprocessing crop_rounding={self.crop_rounding!r}: expected 'round' or 'floor'")
        if self.rescale_factor is not None and not (isinstance(self.rescale_factor, (int, float))
                                                    and not isinstance(self.rescale_factor, bool)
                                                    and math.isfinite(self.rescale_factor)
                                                    and self.rescale_factor > 0):
            raise ValueError(f"preprocessing rescale_factor={self.rescale_factor!r}: expected a positive number")
        if self.native:
            if self.patch_size is None:
                raise ValueError("preprocessing: native resolution needs the patch size (patch_size)")
            _positive_int(self.patch_size, "patch_size")
        if self.max_patches is not None:
            _positive_int(self.max_patches, "max_patches")

    # ------------------------------------------------------------------------------------------------
    # The family defaults

    @classmethod
    def aim_v1(cls, image_size: int = 224, crop_ratio: float = 0.875) -> "Preprocessing":
        """Apple's AIM v1 evaluation transform: the same pixels as `eval_transform(image, image_size, crop_ratio)`."""
        _positive_int(image_size, "image_size")
        if not 0 < crop_ratio <= 1:
            raise ValueError(f"crop_ratio={crop_ratio!r}: expected a value in (0, 1]")
        return cls(resize=int(round(image_size / crop_ratio)), crop_size=(image_size, image_size),
                   source="AIM v1 default")

    @classmethod
    def aimv2(cls, image_size: int) -> "Preprocessing":
        """An AIMv2 fixed-size checkpoint without a preprocessor file: the hub file's settings (CLIP mean/std,
        short side to `image_size`, center crop, transformers' rounding)."""
        _positive_int(image_size, "image_size")
        return cls(mean=CLIP_MEAN, std=CLIP_STD, resize=image_size, crop_size=(image_size, image_size),
                   crop_rounding="floor", source="AIMv2 default")

    @classmethod
    def aimv2_native(cls, patch_size: int = 14, max_patches: Optional[int] = MAX_PATCHES) -> "Preprocessing":
        """AIMv2 at native resolution: CLIP mean/std, no resize or crop, the size floored to the patch grid."""
        return cls(mean=CLIP_MEAN, std=CLIP_STD, resize=None, crop_size=None, crop_rounding="floor", native=True,
                   patch_size=patch_size, max_patches=max_patches, source="AIMv2 native default")

    def as_native(self, patch_size: int, max_patches: Optional[int] = MAX_PATCHES) -> "Preprocessing":
        """These colour settings at native resolution: no resize, no crop, floored to the patch grid."""
        return dataclasses.replace(self, resize=None, crop_size=None, native=True, patch_size=patch_size,
                                   max_patches=max_patches)

    def at_size(self, size: int) -> "Preprocessing":
        """These colour settings on square images of `size`: the short side resized to it, then a center crop (a
        native-resolution model trained on batches of one size, as fine-tuning does)."""
        _positive_int(size, "size")
        return dataclasses.replace(self, resize=size, crop_size=(size, size), native=False)

    # ------------------------------------------------------------------------------------------------
    # transformers' preprocessor_config.json

    @classmethod
    def from_processor_file(cls, path: str | os.PathLike) -> "Preprocessing":
        """The settings of a CLIPImageProcessor `preprocessor_config.json`, read strictly (`from_processor_dict`)."""
        return cls.from_processor_dict(read_json(path, MAX_CONFIG_BYTES), str(path))

    @classmethod
    def from_processor_dict(cls, params: dict, source: str = PREPROCESSOR_CONFIG) -> "Preprocessing":
        """The settings of a CLIPImageProcessor's dict (as `preprocessor_config.json` holds it).

        Keys read: `do_resize`, `size` ({"shortest_edge": n}, or n), `resample` (PIL's code, 3 = bicubic),
        `do_center_crop`, `crop_size` ({"height": h, "width": w}, or n), `do_rescale`, `rescale_factor`,
        `do_normalize`, `image_mean`, `image_std`, `do_convert_rgb` (images always become RGB here), `do_pad`
        (must be false), `image_processor_type` (a CLIPImageProcessor, when present); a key left out takes
        CLIPImageProcessor's default, as in transformers; other keys are ignored. A value of the wrong type or
        range raises ValueError naming `source` and the key. Offsets are rounded as transformers does ("floor").
        """
        if not isinstance(params, dict):
            raise ValueError(f"{source}: expected a JSON object, found {type(params).__name__}")
        kind = params.get("image_processor_type")
        if kind is not None and not (isinstance(kind, str) and kind.startswith("CLIPImageProcessor")):
            raise ValueError(f"{source}: image_processor_type={kind!r}: expected a CLIPImageProcessor "
                             "(other processors resize by other rules)")
        p = {**_CLIP_DEFAULTS, **params}

        def fail(key: str, expected: str):
            raise ValueError(f"{source}: {key}={p[key]!r}: expected {expected}")

        def flag(key: str) -> bool:
            if not isinstance(p[key], bool):
                fail(key, "true or false")
            return p[key]

        def side(key: str, names: Sequence[str]) -> tuple[int, ...]:
            value = p[key]
            if isinstance(value, dict) and set(value) == set(names):
                value = tuple(value[n] for n in names)
            elif _is_int(value):
                value = (value,) * len(names)
            else:
                fail(key, " and ".join(f'"{n}"' for n in names) + " as an object, or one integer")
            if not all(_is_int(v) and v > 0 for v in value):
                fail(key, "positive integers")
            return value

        def colour(key: str) -> tuple[float, float, float]:
            value = p[key]
            if _is_number(value):
                value = [value] * 3
            if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_number(v) for v in value)):
                fail(key, "3 numbers (R, G, B)")
            return tuple(float(v) for v in value)

        resize = side("size", ["shortest_edge"])[0] if flag("do_resize") else None
        if not (_is_int(p["resample"]) and p["resample"] in RESAMPLE_CODES):
            fail("resample", "one of PIL's codes " + ", ".join(f"{k} ({v})" for k, v in RESAMPLE_CODES.items()))
        crop = side("crop_size", ["height", "width"]) if flag("do_center_crop") else None
        rescale = None
        if flag("do_rescale"):
            if not (_is_number(p["rescale_factor"]) and p["rescale_factor"] > 0):
                fail("rescale_factor", "a positive number")
            rescale = float(p["rescale_factor"])
        mean = std = None
        if flag("do_normalize"):
            mean, std = colour("image_mean"), colour("image_std")
            if min(std) <= 0:
                fail("image_std", "positive numbers")
        flag("do_convert_rgb")
        if params.get("do_pad") not in (None, False):
            fail("do_pad", "false (padding is not supported)")
        if crop is not None and resize is not None and max(crop) > resize:
            fail("crop_size", f"at most size.shortest_edge={resize} (transformers would pad the crop with zeros)")
        return cls(mean=mean, std=std, resize=resize, crop_size=crop, resample=RESAMPLE_CODES[p["resample"]],
                   crop_rounding="floor", rescale_factor=rescale, source=str(source))

    def processor_dict(self) -> dict:
        """These settings as a CLIPImageProcessor `preprocessor_config.json` (native: no resize, no crop).
        Only settings with transformers' crop rounding ("floor") can be written so."""
        if self.crop_rounding != "floor":
            raise ValueError("preprocessing with torchvision's crop rounding has no CLIPImageProcessor equivalent")
        codes = {name: code for code, name in RESAMPLE_CODES.items()}
        out: dict[str, Any] = {"image_processor_type": "CLIPImageProcessor", "do_resize": self.resize is not None,
                               "resample": codes[self.resample], "do_center_crop": self.crop_size is not None,
                               "do_rescale": self.rescale_factor is not None, "do_normalize": self.mean is not None,
                               "do_convert_rgb": True}
        if self.resize is not None:
            out["size"] = {"shortest_edge": self.resize}
        if self.crop_size is not None:
            out["crop_size"] = {"height": self.crop_size[0], "width": self.crop_size[1]}
        if self.rescale_factor is not None:
            out["rescale_factor"] = self.rescale_factor
        if self.mean is not None:
            out["image_mean"], out["image_std"] = list(self.mean), list(self.std)
        return out

    # ------------------------------------------------------------------------------------------------
    # Records

    def to_dict(self) -> dict:
        """Every field, JSON-ready (tuples as lists): what a probe's record stores."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def settings(self) -> dict:
        """`to_dict` without `source`: what decides the pixels, compared when a run or a cache is reused."""
        return {k: v for k, v in self.to_dict().items() if k != "source"}

    @classmethod
    def from_dict(cls, params: dict) -> "Preprocessing":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"preprocessing: unknown fields {unknown}")
        return cls(**params)

    # ------------------------------------------------------------------------------------------------
    # Applying it

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the patch grid a native-resolution image of height x width pixels gives."""
        return height // self.patch_size, width // self.patch_size

    def __call__(self, image: ImageInput, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        img = load_image(image)
        if self.resize is not None:
            img = resize_short_side(img, self.resize, _RESAMPLE_FILTERS[self.resample])
        if self.crop_size is not None:
            img = self._center_crop(img, image)
        if self.native:
            img = self._floor_to_grid(img, image)
        if self.rescale_factor is not None:
            array = (np.asarray(img, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        else:
            array = np.asarray(img, dtype=np.float32)
        if self.mean is not None:
            array -= np.asarray(self.mean, np.float32)
            array /= np.asarray(self.std, np.float32)
        return array

    def _center_crop(self, img: Image.Image, image: ImageInput) -> Image.Image:
        crop_h, crop_w = self.crop_size
        if crop_h > img.height or crop_w > img.width:
            raise ImageLoadError(_describe(image), f"{img.width}x{img.height} pixels (after resizing) is smaller "
                                                   f"than the {crop_w}x{crop_h} crop")
        if self.crop_rounding == "round":
            top, left = int(round((img.height - crop_h) / 2.0)), int(round((img.width - crop_w) / 2.0))
        else:
            top, left = (img.height - crop_h) // 2, (img.width - crop_w) // 2
        return img.crop((left, top, left + crop_w, top + crop_h))

    def _floor_to_grid(self, img: Image.Image, image: ImageInput) -> Image.Image:
        p = self.patch_size
        rows, cols = self.grid(img.height, img.width)
        if not rows or not cols:
            raise ImageLoadError(_describe(image), f"{img.width}x{img.height} pixels is smaller than one "
                                                   f"{p}x{p} patch")
        if self.max_patches is not None and rows * cols > self.max_patches:
            raise TooManyPatches(_describe(image), (rows, cols), self.max_patches)
        if (rows * p, cols * p) == (img.height, img.width):
            return img
        return img.crop((0, 0, cols * p, rows * p))  # top-left: the remainder the patch conv would drop


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value, name: str) -> int:
    if not (_is_int(value) or isinstance(value, np.integer)) or value < 1:
        raise ValueError(f"preprocessing {name}={value!r}: expected a positive integer")
    return int(value)


def _three_floats(values, name: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1))
    if len(values) != 3:
        raise ValueError(f"preprocessing {name}: expected 3 values (R, G, B), got {len(values)}")
    return values


# ----------------------------------------------------------------------------------------------------
# Per checkpoint


def is_native(config) -> bool:
    """Whether a model config (duck-typed) is at native resolution: its `image_size` is None."""
    return getattr(config, "image_size", 0) is None


def model_family(config) -> str:
    """"aimv2" or "aim" (AIM v1), from the `model_type` a config's `to_dict()` writes (AIM v1 without one)."""
    to_dict = getattr(config, "to_dict", None)
    return "aimv2" if to_dict is not None and to_dict().get("model_type") == "aimv2" else "aim"


def _check_bound(prep: Preprocessing, bound: int, why: str, file: Path) -> None:
    """A file's resize and crop sizes at most `bound` (`why` says what it is), or a ValueError naming the key."""
    sizes = {"size.shortest_edge": prep.resize, "crop_size": max(prep.crop_size) if prep.crop_size else None}
    for key, value in sizes.items():
        if value is not None and value > bound:
            raise ValueError(f"{file}: {key}={value}: past the limit {bound} ({why})")


def preprocessing_for(config, source: Optional[str | os.PathLike] = None) -> Preprocessing:
    """The preprocessing of a model: its checkpoint folder's `preprocessor_config.json` when `source` is a
    folder holding one, else its family's default (module docstring).

    `config` is duck-typed: `image_size` (None: native resolution), `patch_size`, `max_patches` (native only)
    and `to_dict()["model_type"]`. A native model takes only the file's colour settings (`as_native`). For a
    fixed-size model the file must crop to the model's `image_size`, or a ValueError names the file. Resize and crop
    sizes past the model's bound (`MAX_RESIZE_FACTOR` times its image size; native: `max_patches` x `patch_size`)
    are refused, with the key and the bound, before any image is read.
    """
    native = is_native(config)
    file = confined(source, PREPROCESSOR_CONFIG) if source is not None and Path(source).is_dir() else None
    if file is not None and file.is_file():
        prep = Preprocessing.from_processor_file(file)
        max_patches = getattr(config, "max_patches", MAX_PATCHES)
        if native:
            _check_bound(prep, max_patches * config.patch_size,
                         f"max_patches {max_patches} x patch_size {config.patch_size}", file)
            return prep.as_native(config.patch_size, max_patches)
        size = config.image_size
        _check_bound(prep, MAX_RESIZE_FACTOR * size, f"{MAX_RESIZE_FACTOR} x the model's image size {size}", file)
        if prep.crop_size != (size, size):
            found = "no crop" if prep.crop_size is None else f"crop_size {prep.crop_size[1]}x{prep.crop_size[0]}"
            raise ValueError(f"{file}: {found}, but the model takes {size}x{size} images")
        return prep
    if native:
        return Preprocessing.aimv2_native(config.patch_size, getattr(config, "max_patches", MAX_PATCHES))
    if model_family(config) == "aimv2":
        return Preprocessing.aimv2(config.image_size)
    return Preprocessing.aim_v1(config.image_size)
