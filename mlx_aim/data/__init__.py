"""The data layer: images in, batches of float32 NHWC arrays out. numpy + Pillow (with pillow-heif, and rawpy
for RAW files) only, no MLX.

- `images`: loading (`load_image`, `ImageLoadError`) and the transforms (`eval_transform`, `EvalTransform`,
  `TrainTransform`).
- `formats`: which files are images (`IMAGE_EXTENSIONS`: Pillow's formats, HEIC/HEIF, AVIF, camera RAW) and
  what reads them (`missing_support`).
- `datasets`: finding images on disk (`list_images`, `gather_images`, what a walk skips: `WalkRules`, `Skipped`,
  `NoUsableImages`), labelled image folders (`ImageFolder`), their splits (`split_image_folder`, `load_splits`)
  and class names (`imagenet_classes`).
- `preprocessing`: each checkpoint's own preprocessing as data (`Preprocessing`, `preprocessing_for`), read
  from its `preprocessor_config.json` or a family default; native resolution (`TooManyPatches`, `is_native`).
- `loader`: threaded batching, `BatchLoader` for training and `iter_image_batches` for inference (which groups
  images of equal shape for native resolution).
"""

from .formats import AVIF_EXTENSIONS, HEIF_EXTENSIONS, IMAGE_EXTENSIONS, RAW_EXTENSIONS, missing_support
from .datasets import (
    ImageFolder, NoUsableImages, PathInput, Skipped, WalkRules, gather_images, imagenet_classes, list_images,
    load_splits, split_image_folder, split_images,
)
from .images import (
    IMAGENET_MEAN, IMAGENET_STD, MIN_IMAGE_SIDE, EvalTransform, ImageInput, ImageLoadError, TrainTransform,
    center_crop_box, color_jitter, eval_transform, load_image, resize_short_side, sample_crop_box, shift_hue,
)
from .loader import NUM_WORKERS, BatchLoader, iter_image_batches
from .preprocessing import (
    CLIP_MEAN, CLIP_STD, MAX_PATCHES, PREPROCESSOR_CONFIG, Preprocessing, TooManyPatches, is_native, model_family,
    preprocessing_for,
)

__all__ = [
    "AVIF_EXTENSIONS",
    "CLIP_MEAN",
    "CLIP_STD",
    "HEIF_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_PATCHES",
    "MIN_IMAGE_SIDE",
    "NUM_WORKERS",
    "PREPROCESSOR_CONFIG",
    "BatchLoader",
    "EvalTransform",
    "ImageFolder",
    "ImageInput",
    "ImageLoadError",
    "NoUsableImages",
    "PathInput",
    "Preprocessing",
    "RAW_EXTENSIONS",
    "Skipped",
    "TooManyPatches",
    "TrainTransform",
    "WalkRules",
    "center_crop_box",
    "color_jitter",
    "eval_transform",
    "gather_images",
    "imagenet_classes",
    "is_native",
    "iter_image_batches",
    "list_images",
    "load_image",
    "load_splits",
    "missing_support",
    "model_family",
    "preprocessing_for",
    "resize_short_side",
    "sample_crop_box",
    "shift_hue",
    "split_image_folder",
    "split_images",
]
