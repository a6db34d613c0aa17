"""Which files are images, and what reads the formats Pillow does not read by itself. Nothing is decoded here.

- `IMAGE_EXTENSIONS`: the file extensions every image-reading job looks for in folders (`datasets.list_images`),
  the union of the sets below; one list, so that classify, extract-features, probe, pretrain, zero-shot and
  search all take the same files.
- HEIC/HEIF (`HEIF_EXTENSIONS`, iPhone photos): pillow-heif's Pillow opener, registered once, when this module is
  imported (with `mlx_aim.data`), so that any `Image.open` in the process reads HEIC, not only `load_image`'s
  (importing pillow-heif costs some 20-40 ms). pillow-heif applies the file's rotation and mirror (its
  `irot`/`imir` boxes) as it decodes and sets the EXIF orientation it reports to 1, so the EXIF step of
  `load_image` leaves its result as it is: the photo is turned once.
- AVIF (`AVIF_EXTENSIONS`): Pillow's own plugin (in Pillow's wheels since 11.3), or pillow-avif-plugin where an
  older Pillow lacks it. Pillow reports the file's `irot`/`imir` as an EXIF orientation, which `load_image`
  honours as it does for JPEG.
- RAW (`RAW_EXTENSIONS`: DNG and the camera makers' formats): read by `rawpy` (LibRaw), the optional `raw` extra
  (`pip install 'mlx-aim[raw]'`); `images.load_image` takes the embedded preview.
- `missing_support(path)`: why this installation cannot read a file of that extension (None when it can), so a
  job skips it with that reason instead of failing to identify it.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Optional

from PIL import features

PILLOW_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
HEIF_EXTENSIONS = frozenset({".heic", ".heif", ".hif"})  # .hif: Canon's and Fujifilm's in-camera HEIF
AVIF_EXTENSIONS = frozenset({".avif"})
# LibRaw's formats that cameras write today: Adobe DNG, Canon, Nikon, Sony, Fujifilm, Olympus/OM, Panasonic/Leica,
# Pentax, Samsung, Sigma, Hasselblad, Phase One, Leaf, Minolta, Kodak.
RAW_EXTENSIONS = frozenset({
    ".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf", ".rw2", ".rwl", ".pef",
    ".srw", ".x3f", ".3fr", ".fff", ".iiq", ".mos", ".mrw", ".kdc", ".dcr", ".erf",
})
IMAGE_EXTENSIONS = PILLOW_EXTENSIONS | HEIF_EXTENSIONS | AVIF_EXTENSIONS | RAW_EXTENSIONS

RAW_EXTRA_HINT = "RAW support needs `pip install 'mlx-aim[raw]'` (rawpy)"


def extension(path: str | os.PathLike) -> str:
    """The file's extension, lower-cased, with its dot ("" for none)."""
    return os.path.splitext(os.fspath(path))[1].lower()


def is_raw(path: str | os.PathLike) -> bool:
    """Whether `path` names a camera RAW file (by its extension), read through rawpy."""
    return extension(path) in RAW_EXTENSIONS


def missing_support(path: str | os.PathLike) -> Optional[str]:
    """Why this installation cannot read `path`'s format, judged by its extension; None when it can (or when the
    extension is not one of the formats that need more than Pillow)."""
    suffix = extension(path)
    if suffix in HEIF_EXTENSIONS:
        return _heif_support()
    if suffix in AVIF_EXTENSIONS:
        return _avif_support()
    if suffix in RAW_EXTENSIONS:
        return None if rawpy_module() is not None else RAW_EXTRA_HINT
    return None


@functools.lru_cache(maxsize=None)
def _heif_support() -> Optional[str]:
    try:
        import pillow_heif
    except ImportError as error:  # a dependency of the default install: only a broken install lacks it
        return f"HEIC/HEIF support needs pillow-heif (`pip install pillow-heif`; importing it failed: {error})"
    pillow_heif.register_heif_opener()  # once per process: the cache answers later calls
    return None


_heif_support()


@functools.lru_cache(maxsize=None)
def _avif_support() -> Optional[str]:
    if features.check("avif"):
        return None
    try:
        import pillow_avif  # noqa: F401  (registers its Pillow plugin on import)
    except ImportError:
        return ("AVIF support needs a Pillow built with AVIF (`pip install -U pillow`: its wheels have it since "
                "11.3) or `pip install pillow-avif-plugin`")
    return None


@functools.lru_cache(maxsize=None)
def rawpy_module() -> Optional[ModuleType]:
    """The rawpy module, or None where the `raw` extra is not installed."""
    try:
        import rawpy
    except ImportError:
        return None
    return rawpy
