"""Per-checkpoint preprocessing (mlx_aim/data/preprocessing.py): transformers' CLIPImageProcessor files read and
reproduced pixel for pixel, the family defaults, native resolution's floor and guard. Offline: every image and
preprocessor file is generated here."""

import json
import pickle
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import transformers  # the dev extra's reference implementation, never a runtime need
from PIL import Image

from conftest import tiny_config
from mlx_aim.data import (
    CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, PREPROCESSOR_CONFIG, ImageLoadError, Preprocessing, Skipped, TooManyPatches,
    eval_transform, iter_image_batches, preprocessing_for,
)

# transformers' Pillow backend, named so: with torchvision installed, `CLIPImageProcessor` resizes with torchvision's
# tensor kernels instead, whose bicubic gives other pixel values than Pillow's. The file's meaning is the same.
CLIPImageProcessor = transformers.CLIPImageProcessorPil


@dataclass
class StandIn:
    """The attributes an AIMv2 config has (mlx_aim/models/config.py's AIMv2Config): image_size None = native."""

    image_size: Optional[int] = 224
    patch_size: int = 14
    max_patches: int = 4096

    def to_dict(self) -> dict:
        return {"model_type": "aimv2", "image_size": self.image_size, "patch_size": self.patch_size}


def random_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (height, width) if mode == "L" else (height, width, len(mode))
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def clip_processor(folder, shortest_edge: int, crop: int, **kwargs):
    """A CLIPImageProcessor saved by transformers itself into `folder`; returns the processor."""
    processor = CLIPImageProcessor(size={"shortest_edge": shortest_edge},
                                                crop_size={"height": crop, "width": crop}, **kwargs)
    processor.save_pretrained(folder)
    return processor


def reference_pixels(processor, image: Image.Image) -> np.ndarray:
    """transformers' pixel values for one image, as HWC float32."""
    return processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


# ----------------------------------------------------------------------------------------------------
# transformers' files


# (width, height): landscape, portrait, square, and sizes whose crop excess is 3 modulo 4, where transformers'
# floor and torchvision's round-half-even put the crop one pixel apart.
SIZES = [(227, 224), (300, 200), (200, 300), (101, 53), (37, 40), (224, 224), (61, 97)]


@pytest.mark.parametrize("shortest_edge,crop", [(224, 224), (35, 32)])
def test_clip_processor_file_is_reproduced_pixel_for_pixel(tmp_path, shortest_edge, crop):
    processor = clip_processor(tmp_path, shortest_edge, crop)
    prep = Preprocessing.from_processor_file(tmp_path / PREPROCESSOR_CONFIG)
    assert (prep.mean, prep.std, prep.resize, prep.crop_size) == (CLIP_MEAN, CLIP_STD, shortest_edge, (crop, crop))
    assert prep.resample == "bicubic" and prep.crop_rounding == "floor" and not prep.native
    for seed, (width, height) in enumerate(SIZES):
        for mode in ("RGB", "L", "RGBA"):
            image = random_image(width, height, seed, mode)
            ours, theirs = prep(image), reference_pixels(processor, image)
            assert ours.shape == theirs.shape == (crop, crop, 3) and ours.dtype == np.float32
            # Both resize with Pillow and scale, normalise in the same float precision: equal, not merely close.
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{mode} {width}x{height}")
    # The rounding matters: torchvision's rule crops one pixel further for an excess of 3 (35 - 32).
    if shortest_edge - crop == 3:
        image = random_image(227, 224, 0)
        torchvision_rule = Preprocessing(**{**prep.to_dict(), "crop_rounding": "round"})
        assert not np.array_equal(torchvision_rule(image), reference_pixels(processor, image))


def test_other_clip_settings_follow_the_file(tmp_path):
    """Mean, std, resampling, no rescale or no normalisation: what the file says, as transformers does it."""
    settings = [dict(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], resample=2),
                dict(do_normalize=False), dict(do_rescale=False, image_mean=[120, 110, 100], image_std=[60, 60, 60]),
                dict(do_center_crop=False)]
    for i, kwargs in enumerate(settings):
        folder = tmp_path / str(i)
        processor = clip_processor(folder, 40, 32, **kwargs)
        prep = Preprocessing.from_processor_file(folder / PREPROCESSOR_CONFIG)
        for seed, (width, height) in enumerate([(61, 45), (45, 61)]):
            image = random_image(width, height, seed)
            np.testing.assert_array_equal(prep(image), reference_pixels(processor, image), err_msg=str(kwargs))
    assert prep.crop_size is None and prep(random_image(61, 45, 0)).shape == (40, 54, 3)


def test_processor_dict_round_trips_through_transformers(tmp_path):
    """What mlx-aim writes (a probe's model folder) is a file transformers reads back to the same pixels."""
    for prep in (Preprocessing.aimv2(32), Preprocessing(mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1), resize=40,
                                                          crop_size=(24, 32), resample="bilinear",
                                                          crop_rounding="floor")):
        folder = tmp_path / prep.resample
        folder.mkdir()
        (folder / PREPROCESSOR_CONFIG).write_text(json.dumps(prep.processor_dict()))
        processor = CLIPImageProcessor.from_pretrained(folder)
        image = random_image(57, 49, 3)
        np.testing.assert_array_equal(prep(image), reference_pixels(processor, image))
        read = Preprocessing.from_processor_file(folder / PREPROCESSOR_CONFIG)
        assert read == prep and read.source == str(folder / PREPROCESSOR_CONFIG)
        assert read.settings() == prep.settings() and read.to_dict()["source"] == read.source
    with pytest.raises(ValueError, match="torchvision"):
        Preprocessing.aim_v1().processor_dict()


@pytest.mark.parametrize("key,value,expected", [
    ("resample", 7, "PIL's codes"),
    ("image_mean", [0.5, 0.5], "3 numbers"),
    ("image_std", [0.2, 0.0, 0.2], "positive"),
    ("size", {"height": 224, "width": 224}, "shortest_edge"),
    ("size", {"shortest_edge": 0}, "positive integers"),
    ("crop_size", {"height": 300, "width": 300}, "at most size.shortest_edge=224"),
    ("do_resize", "yes", "true or false"),
    ("rescale_factor", -1, "positive number"),
    ("do_pad", True, "padding is not supported"),
    ("image_processor_type", "SiglipImageProcessor", "CLIPImageProcessor"),
])
def test_bad_values_name_the_file_and_the_key(tmp_path, key, value, expected):
    clip_processor(tmp_path, 224, 224)
    path = tmp_path / PREPROCESSOR_CONFIG
    params = json.loads(path.read_text())
    path.write_text(json.dumps({**params, key: value}))
    with pytest.raises(ValueError, match=expected) as error:
        Preprocessing.from_processor_file(path)
    assert str(path) in str(error.value) and key in str(error.value)


def test_unreadable_and_sparse_files(tmp_path):
    path = tmp_path / PREPROCESSOR_CONFIG
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        Preprocessing.from_processor_file(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        Preprocessing.from_processor_file(path)
    with pytest.raises(FileNotFoundError, match="missing"):
        Preprocessing.from_processor_file(tmp_path / "nowhere.json")
    # Keys left out take CLIPImageProcessor's defaults, as in transformers.
    path.write_text(json.dumps({"crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32}}))
    processor = CLIPImageProcessor.from_pretrained(tmp_path)
    image = random_image(50, 41, 0)
    np.testing.assert_array_equal(Preprocessing.from_processor_file(path)(image), reference_pixels(processor, image))


# ----------------------------------------------------------------------------------------------------
# The family defaults and the checkpoint folder's file


def test_aim_v1_default_is_the_eval_transform():
    config = tiny_config(image_size=224)
    prep = preprocessing_for(config)
    assert prep == Preprocessing.aim_v1(224) == Preprocessing() and prep.mean == IMAGENET_MEAN
    for seed, (width, height) in enumerate(SIZES + [(257, 199), (17, 640)]):
        image = random_image(width, height, seed)
        np.testing.assert_array_equal(prep(image), eval_transform(image))
    image = random_image(150, 97, 1)
    for size, ratio in [(64, 0.875), (49, 0.7), (32, 1.0)]:
        np.testing.assert_array_equal(Preprocessing.aim_v1(size, ratio)(image), eval_transform(image, size, ratio))


def test_aimv2_defaults_and_the_shipped_file(tmp_path):
    fixed = preprocessing_for(StandIn(image_size=336))
    assert fixed == Preprocessing.aimv2(336)
    assert (fixed.mean, fixed.resize, fixed.crop_size, fixed.crop_rounding) == (CLIP_MEAN, 336, (336, 336), "floor")
    # A hub file with the same settings (the default stands in for it) gives the same pixels.
    processor = clip_processor(tmp_path / "hub", 336, 336)
    image = random_image(500, 377, 2)
    np.testing.assert_array_equal(fixed(image), reference_pixels(processor, image))

    # A checkpoint folder with its own file: that file rules.
    folder = tmp_path / "ckpt"
    clip_processor(folder, 40, 32, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    prep = preprocessing_for(StandIn(image_size=32), folder)
    assert prep.source == str(folder / PREPROCESSOR_CONFIG) and prep.mean == (0.5, 0.5, 0.5) and prep.resize == 40
    with pytest.raises(ValueError, match=f"{folder / PREPROCESSOR_CONFIG}: crop_size 32x32, but the model takes 224"):
        preprocessing_for(StandIn(image_size=224), folder)
    # A native checkpoint takes the file's colour settings only: no resize, no crop.
    native = preprocessing_for(StandIn(image_size=None, max_patches=100), folder)
    assert native.native and native.resize is None and native.crop_size is None and native.mean == (0.5, 0.5, 0.5)
    assert (native.patch_size, native.max_patches) == (14, 100)
    # No file, or a source that is not a folder (a preset name): the family default.
    assert preprocessing_for(StandIn(image_size=None), tmp_path) == Preprocessing.aimv2_native(14, 4096)
    assert preprocessing_for(StandIn(image_size=224), "aimv2-large-patch14-224") == Preprocessing.aimv2(224)


def test_records_round_trip():
    for prep in (Preprocessing(), Preprocessing.aimv2(448), Preprocessing.aimv2_native(14, 1024)):
        record = json.loads(json.dumps(prep.to_dict()))
        assert Preprocessing.from_dict(record) == prep
    with pytest.raises(ValueError, match="unknown fields"):
        Preprocessing.from_dict({"crop_ratio": 0.875})
    with pytest.raises(ValueError, match="larger than the resized short side"):
        Preprocessing(resize=200, crop_size=(224, 224))
    with pytest.raises(ValueError, match="patch size"):
        Preprocessing(resize=None, crop_size=None, native=True)


# ----------------------------------------------------------------------------------------------------
# Native resolution


def test_native_floors_to_the_patch_grid_from_the_top_left():
    prep = Preprocessing.aimv2_native(14)
    image = random_image(640, 480, 5)
    out = prep(image)
    assert out.shape == (476, 630, 3)  # the reference's example: 45 x 34 = 1530 tokens
    # No resize: the kept pixels are the image's own, the right and bottom remainder dropped.
    full = Preprocessing(mean=CLIP_MEAN, std=CLIP_STD, resize=None, crop_size=None)(image)
    assert full.shape == (480, 640, 3)
    np.testing.assert_array_equal(out, full[:476, :630])
    # Non-square, already on the grid: unchanged; one patch: fine; under one patch: refused, naming the image.
    assert prep(random_image(28, 70, 0)).shape == (70, 28, 3)
    assert prep(random_image(14, 27, 0)).shape == (14, 14, 3)
    with pytest.raises(ImageLoadError, match="13x40 pixels is smaller than one 14x14 patch"):
        prep(random_image(13, 40, 0))


def test_native_guard_names_the_image_its_grid_and_the_limit(tmp_path):
    path = tmp_path / "wide.png"
    random_image(640, 480, 5).save(path)
    prep = Preprocessing.aimv2_native(14, max_patches=1000)
    with pytest.raises(TooManyPatches) as error:
        prep(path)
    message = str(error.value)
    assert str(path) in message and "45x34 patch grid" in message and "1530 patches" in message
    assert "max_patches=1000" in message
    assert isinstance(error.value, ValueError) and error.value.grid == (34, 45)
    assert str(pickle.loads(pickle.dumps(error.value))) == message  # crosses processes intact
    # The limit is changeable; the default is 4096 patches; None lifts it.
    assert Preprocessing.aimv2_native(14, max_patches=1530)(path).shape == (476, 630, 3)
    assert Preprocessing.aimv2_native(14).max_patches == 4096
    assert Preprocessing.aimv2_native(14, None)(random_image(70 * 14, 70 * 14, 0)).shape == (980, 980, 3)
    # In a batch run, an image past the guard is skipped and listed, like an unreadable file.
    small = tmp_path / "small.png"
    random_image(60, 30, 1).save(small)
    skipped = Skipped()
    batches = list(iter_image_batches([path, small], prep, 4, skipped, num_workers=0))
    assert [b[1] for b in batches] == [[small]] and skipped.items[0][0] == str(path)
    assert "max_patches=1000" in skipped.items[0][1]


def test_at_size_keeps_the_colour_settings_at_one_square_size():
    native = Preprocessing.aimv2_native(patch_size=4)
    fixed = native.at_size(16)
    assert (fixed.resize, fixed.crop_size, fixed.native) == (16, (16, 16), False)
    assert (fixed.mean, fixed.std, fixed.crop_rounding) == (native.mean, native.std, native.crop_rounding)
    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    assert fixed(image).shape == (16, 16, 3)
    with pytest.raises(ValueError, match="size"):
        native.at_size(0)
