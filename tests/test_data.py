"""Image loading, transforms, image folders and the batchers (the mlx_aim/data package). Offline: every image
is generated here with numpy and Pillow."""

import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from mlx_aim.data import (
    IMAGENET_MEAN, IMAGENET_STD, BatchLoader, EvalTransform, ImageFolder, ImageLoadError, NoUsableImages, Skipped,
    TrainTransform, center_crop_box, color_jitter, eval_transform, imagenet_classes, iter_image_batches, list_images,
    load_image, load_splits, resize_short_side, sample_crop_box, shift_hue, split_image_folder,
)

# ----------------------------------------------------------------------------------------------------
# Plain references, written from the documented rules


def reference_rgb(img: Image.Image) -> np.ndarray:
    """The documented mode -> 8-bit RGB rules, in numpy."""
    mode = img.mode
    if mode == "P":
        palette = np.asarray(img.getpalette(), dtype=np.float64).reshape(-1, 3)
        index = np.asarray(img)
        rgb = palette[index]
        if "transparency" in img.info:
            alpha = np.where(index == img.info["transparency"], 0.0, 255.0)[..., None]
            rgb = rgb * alpha / 255 + 255 * (1 - alpha / 255)
        return np.rint(rgb).astype(np.uint8)
    a = np.asarray(img).astype(np.float64)
    if mode in ("RGBA", "LA"):
        color, alpha = a[..., :-1], a[..., -1:]
        out = np.rint(color * alpha / 255 + 255 * (1 - alpha / 255))
        return np.broadcast_to(out, a.shape[:2] + (3,)).astype(np.uint8)
    if mode == "CMYK":
        c, k = a[..., :3], a[..., 3:]
        return np.rint((255 - c) * (255 - k) / 255).astype(np.uint8)
    if mode == "I;16":
        gray = np.rint(a / 257)
    elif mode == "F":  # the test's F images lie in [0, 1]
        gray = np.rint(a * 255)
    elif mode == "1":
        gray = a * 255
    else:
        gray = a
    if gray.ndim == 2:
        gray = np.repeat(gray[..., None], 3, axis=2)
    return gray.astype(np.uint8)


def reference_eval(rgb: np.ndarray, image_size=224, crop_ratio=0.875) -> np.ndarray:
    """torchvision's Resize(round(size / crop_ratio), bicubic) + CenterCrop(size) + ToTensor + Normalize."""
    height, width = rgb.shape[:2]
    short = round(image_size / crop_ratio)
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    img = Image.fromarray(rgb)
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    a = np.asarray(img, dtype=np.float64) / 255
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    a = a[top : top + image_size, left : left + image_size]
    return (a - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)


def make_image(mode: str, width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    u8 = lambda *shape: rng.integers(0, 256, (height, width) + shape, dtype=np.uint8)  # noqa: E731
    if mode == "RGB":
        return Image.fromarray(u8(3))
    if mode == "L":
        return Image.fromarray(u8())
    if mode == "LA":
        return Image.merge("LA", (Image.fromarray(u8()), Image.fromarray(u8())))
    if mode == "RGBA":
        return Image.fromarray(u8(4))
    if mode == "P":
        img = Image.frombytes("P", (width, height), (u8() % 16).tobytes())
        img.putpalette(rng.integers(0, 256, 16 * 3, dtype=np.uint8).tobytes())
        return img
    if mode == "CMYK":
        return Image.frombytes("CMYK", (width, height), u8(4).tobytes())
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(rng.random((height, width), dtype=np.float32))
    if mode == "1":
        return Image.fromarray(rng.random((height, width)) < 0.5)
    raise AssertionError(mode)


MODES = ["RGB", "L", "LA", "P", "RGBA", "CMYK", "I;16", "F", "1"]
SIZES = [(256, 256), (300, 200), (200, 300), (257, 199), (101, 53), (17, 640), (224, 224)]


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


# ----------------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("mode", MODES)
def test_modes_convert_to_rgb_by_the_documented_rules(mode):
    img = make_image(mode, 37, 23, seed=1)
    assert img.mode == mode
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (37, 23)
    np.testing.assert_array_equal(np.asarray(out), reference_rgb(img))


@pytest.mark.parametrize("mode", MODES)
def test_eval_transform_matches_the_reference_for_every_size(mode):
    for seed, (width, height) in enumerate(SIZES):
        img = make_image(mode, width, height, seed=seed)
        out = eval_transform(img)
        assert out.shape == (224, 224, 3) and out.dtype == np.float32
        np.testing.assert_allclose(out, reference_eval(reference_rgb(img)), rtol=0, atol=1e-6)


def test_eval_transform_other_sizes_ratios_and_files(tmp_path):
    img = make_image("RGB", 150, 97, seed=3)
    rgb = np.asarray(img)
    for image_size, crop_ratio in [(64, 0.875), (32, 1.0), (49, 0.7)]:
        out = eval_transform(img, image_size=image_size, crop_ratio=crop_ratio)
        np.testing.assert_allclose(out, reference_eval(rgb, image_size, crop_ratio), rtol=0, atol=1e-6)
    # A path, a PIL image and an array give the same result; so does the EvalTransform wrapper.
    path = save(img, tmp_path / "a.png")
    expected = eval_transform(img, image_size=64)
    np.testing.assert_array_equal(eval_transform(path, image_size=64), expected)
    np.testing.assert_array_equal(eval_transform(str(path), image_size=64), expected)
    np.testing.assert_array_equal(eval_transform(rgb, image_size=64), expected)
    np.testing.assert_array_equal(EvalTransform(64)(path, np.random.default_rng(0)), expected)
    unnormalized = eval_transform(img, image_size=64, normalize=False)
    np.testing.assert_allclose((unnormalized - IMAGENET_MEAN) / IMAGENET_STD, expected, atol=1e-6)
    assert 0 <= unnormalized.min() and unnormalized.max() <= 1
    with pytest.raises(ValueError, match="crop_ratio"):
        eval_transform(img, crop_ratio=1.5)
    with pytest.raises(ValueError, match="std"):
        eval_transform(img, std=(0.2, 0.0, 0.2))


def test_resize_and_crop_follow_torchvision_rounding():
    # Long side int(256 * long / short), truncated; width counts as short when square.
    assert resize_short_side(Image.new("RGB", (500, 375)), 256).size == (341, 256)
    assert resize_short_side(Image.new("RGB", (375, 500)), 256).size == (256, 341)
    assert resize_short_side(Image.new("RGB", (299, 300)), 256).size == (256, 256)
    assert resize_short_side(Image.new("RGB", (3, 100)), 256).size == (256, 8533)
    # int(round(x / 2.0)) rounds halves to even, as Python's round does.
    assert center_crop_box(256, 341, 224) == (16, 58)  # 117 / 2 = 58.5 -> 58
    assert center_crop_box(259, 256, 224) == (18, 16)  # 35 / 2 = 17.5 -> 18
    with pytest.raises(ValueError):
        center_crop_box(100, 300, 224)


def test_alpha_is_composited_onto_white():
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [10, 20, 30, 128], [200, 0, 100, 64]]], np.uint8)
    rgba = np.repeat(rgba, 2, axis=0)
    out = np.asarray(load_image(rgba))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [10, 20, 30])
    expected = np.rint(np.array([10, 20, 30]) * 128 / 255 + 255 * 127 / 255)
    np.testing.assert_array_equal(out[0, 2], expected)
    # A palette image with a transparent index (as in GIFs): that index becomes white.
    p = make_image("P", 20, 10, seed=4)
    p.info["transparency"] = int(np.asarray(p)[0, 0])
    out = np.asarray(load_image(p))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out, reference_rgb(p))


def test_wide_gray_modes_are_scaled_by_their_range():
    def gray(values, mode):
        img = Image.fromarray(np.asarray(values, dtype={"F": np.float32, "I": np.int32}[mode]))
        assert img.mode == mode
        return np.asarray(load_image(img))[..., 0]

    # F within [0, 255] keeps its values; F with negatives stretches min..max; NaN is the low end.
    np.testing.assert_array_equal(gray([[0, 100.4], [200, 255]], "F"), [[0, 100], [200, 255]])
    np.testing.assert_array_equal(gray([[-1, 0], [1, 3]], "F"), [[0, 64], [128, 255]])
    np.testing.assert_array_equal(gray([[np.nan, 0.5], [1.0, 0]], "F"), [[0, 128], [255, 0]])
    # I within [0, 255] is 8-bit data; up to 65535 it is 16-bit data; beyond, min..max.
    np.testing.assert_array_equal(gray([[0, 7], [255, 128]], "I"), [[0, 7], [255, 128]])
    np.testing.assert_array_equal(gray([[0, 257], [65535, 1000]], "I"), [[0, 1], [255, 4]])
    np.testing.assert_array_equal(gray([[100000, 300000], [500000, 100000]], "I"), [[0, 128], [255, 0]])
    # 16-bit PNGs: Pillow's own L conversion clips (65535 -> 255 but 1000 -> 255 too); ours divides by 257.
    np.testing.assert_array_equal(gray_16 := np.asarray(load_image(
        Image.fromarray(np.array([[0, 1000], [32768, 65535]], np.uint16))))[..., 0], [[0, 4], [128, 255]])
    assert gray_16.dtype == np.uint8


def test_arrays_of_every_layout_load():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(rgb)), rgb)
    np.testing.assert_array_equal(np.asarray(load_image(gray)), np.repeat(gray[..., None], 3, 2))
    np.testing.assert_array_equal(np.asarray(load_image(gray[..., None])), np.repeat(gray[..., None], 3, 2))
    with pytest.raises(ImageLoadError, match="uint8"):
        load_image(rgb.astype(np.float32))
    with pytest.raises(ImageLoadError, match="HxWx3"):
        load_image(rng.integers(0, 256, (6, 5, 2), dtype=np.uint8))
    with pytest.raises(TypeError, match="load_image"):
        load_image(42)


def test_exif_orientation_is_honoured(tmp_path):
    # Left half red, right half blue; orientation 6 means "rotate 90 degrees clockwise to display".
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(Image.fromarray(pixels), tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)  # width 20, height 40: now portrait
    a = np.asarray(out).astype(int)
    assert a[5, 10, 0] > 200 and a[5, 10, 2] < 60  # top is red (was left)
    assert a[35, 10, 2] > 200 and a[35, 10, 0] < 60  # bottom is blue (was right)
    np.testing.assert_array_equal(a, np.asarray(Image.open(path).convert("RGB").rotate(-90, expand=True)))
    # The same file without the tag stays landscape.
    plain = save(Image.fromarray(pixels), tmp_path / "plain.jpg", quality=95)
    assert load_image(plain).size == (40, 20)
    assert eval_transform(path, image_size=16).shape == (16, 16, 3)


def test_bad_inputs_raise_image_load_error_naming_the_file(tmp_path, monkeypatch):
    missing = tmp_path / "missing.jpg"
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all")
    full = save(make_image("RGB", 64, 64), tmp_path / "full.jpg", quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    tiny = save(Image.new("RGB", (1, 1)), tmp_path / "tiny.png")
    thin = save(Image.new("RGB", (1, 50)), tmp_path / "thin.png")
    cases = {missing: "no such file", text: "not an image", truncated: "truncated", tiny: "at least 2",
             thin: "at least 2", tmp_path: "directory"}
    for path, reason in cases.items():
        with pytest.raises(ImageLoadError, match=reason) as info:
            load_image(path)
        assert str(path) in str(info.value)
        assert isinstance(info.value, ValueError) and info.value.source == path
    with pytest.raises(ImageLoadError, match="at least 2"):
        load_image(Image.new("L", (5, 1)))

    # Decompression bombs: past the limit (Pillow warns) and past twice the limit (Pillow raises).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    warned = save(make_image("RGB", 12, 12), tmp_path / "warned.png")  # 144 pixels
    raised = save(make_image("RGB", 20, 20), tmp_path / "raised.png")  # 400 pixels
    with pytest.warns(Image.DecompressionBombWarning):
        with pytest.raises(ImageLoadError, match="decompression-bomb") as info:
            load_image(warned)
    assert "warned.png" in str(info.value)
    with pytest.raises(ImageLoadError, match="decompression-bomb") as info:
        load_image(raised)
    assert "raised.png" in str(info.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert load_image(raised).size == (20, 20)


def test_image_files_of_every_format_load(tmp_path):
    img = make_image("RGB", 30, 20, seed=5)
    for ext in ["png", "bmp", "tif", "webp", "gif", "jpg"]:
        kwargs = {"lossless": True} if ext == "webp" else {}
        out = load_image(save(img, tmp_path / f"x.{ext}", **kwargs))
        assert out.mode == "RGB" and out.size == (30, 20)
        if ext in ("png", "bmp", "tif", "webp"):
            np.testing.assert_array_equal(np.asarray(out), np.asarray(img))
    for mode in ["LA", "P", "I;16", "RGBA", "L", "1"]:
        img = make_image(mode, 30, 20, seed=6)
        np.testing.assert_array_equal(np.asarray(load_image(save(img, tmp_path / f"{mode}.png"))),
                                      reference_rgb(img))


# ----------------------------------------------------------------------------------------------------
# Training augmentation


def test_crop_box_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    height, width = 480, 640
    for _ in range(500):
        top, left, h, w = sample_crop_box(height, width, (0.4, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        # Rounding w and h moves the area by under (w + h) / 2 + 1 pixels.
        slack = (w + h) / 2 + 1
        assert 0.4 * height * width - slack <= h * w <= height * width
        assert 3 / 4 * (1 - 2 / h) <= w / h <= 4 / 3 * (1 + 2 / h)
    # Nothing fits (aspect ratio 2 at full area of a square): the central fallback, clamped to ratio 2.
    assert sample_crop_box(100, 100, (1.0, 1.0), (2.0, 2.0), rng) == (25, 0, 50, 100)
    assert sample_crop_box(100, 100, (1.0, 1.0), (0.5, 0.5), rng) == (0, 25, 100, 50)
    # A very wide image with the usual settings often falls back: still inside the image.
    for _ in range(50):
        top, left, h, w = sample_crop_box(10, 400, (0.4, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 10 and 0 <= left and left + w <= 400


def test_train_transform_is_reproducible_and_seed_dependent():
    img = make_image("RGB", 120, 90, seed=7)
    t = TrainTransform(image_size=32)
    a = t(img, np.random.default_rng(123))
    b = t(img, np.random.default_rng(123))
    c = t(img, np.random.default_rng(124))
    assert a.shape == (32, 32, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.1
    with pytest.raises(TypeError, match="Generator"):
        t(img, 0)
    with pytest.raises(ValueError, match="scale"):
        TrainTransform(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="color_jitter"):
        TrainTransform(color_jitter=(0.4, 0.4, 0.2, 0.6))


def test_train_transform_crops_flips_about_half_the_time():
    # Whole-image crops of a square image, no jitter: the output is the image or its mirror.
    img = make_image("RGB", 16, 16, seed=8)
    t = TrainTransform(image_size=16, scale=(1, 1), ratio=(1, 1), jitter_prob=0.0, normalize=False)
    plain = np.asarray(img, np.float32) / 255
    mirrored = plain[:, ::-1]
    flips = 0
    for seed in range(200):
        out = t(img, np.random.default_rng(seed))
        if np.array_equal(out, mirrored):
            flips += 1
        else:
            np.testing.assert_array_equal(out, plain)
    assert 70 <= flips <= 130
    never = TrainTransform(image_size=16, scale=(1, 1), ratio=(1, 1), hflip=0.0, jitter_prob=0.0,
                           normalize=False)
    assert all(np.array_equal(never(img, np.random.default_rng(s)), plain) for s in range(20))


def test_color_jitter_draws_in_the_documented_order():
    img = make_image("RGB", 24, 24, seed=9)
    # Brightness only: the permutation is drawn first, then the factor from [0.6, 1.4].
    rng = np.random.default_rng(5)
    out = color_jitter(img, 0.4, 0.0, 0.0, 0.0, rng)
    replay = np.random.default_rng(5)
    replay.permutation(4)
    expected = ImageEnhance.Brightness(img).enhance(replay.uniform(0.6, 1.4))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    # All four: same seed, same result; a pure red shifted by a third of a turn becomes green.
    np.testing.assert_array_equal(np.asarray(color_jitter(img, 0.4, 0.4, 0.2, 0.1, np.random.default_rng(1))),
                                  np.asarray(color_jitter(img, 0.4, 0.4, 0.2, 0.1, np.random.default_rng(1))))
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    r, g, b = np.asarray(shift_hue(red, 1 / 3))[0, 0].astype(int)
    assert g > 240 and r < 20 and b < 20
    r, g, b = np.asarray(shift_hue(red, -1 / 3))[0, 0].astype(int)
    assert b > 240 and r < 20 and g < 20
    # The training transform applies jitter with probability jitter_prob: 0 and 1 differ.
    base = dict(image_size=24, scale=(1, 1), ratio=(1, 1), hflip=0.0, normalize=False)
    none = TrainTransform(jitter_prob=0.0, **base)(img, np.random.default_rng(3))
    always = TrainTransform(jitter_prob=1.0, **base)(img, np.random.default_rng(3))
    np.testing.assert_array_equal(none, np.asarray(img, np.float32) / 255)
    assert np.abs(always - none).max() > 0.02


# ----------------------------------------------------------------------------------------------------
# Finding images


def make_tree(root: Path) -> None:
    img = make_image("RGB", 8, 8)
    for name in ["a/1.jpg", "a/2.PNG", "a/deep/er/3.jpeg", "b/4.webp", "b/5.Tif", "c.bmp",
                 "a/._6.jpg", ".hidden/7.png", "b/x.gif"]:
        save(img, root / name)
    (root / "a" / "notes.txt").write_text("hello")
    (root / "empty").mkdir()


def test_list_images_recursive_globs_and_errors(tmp_path):
    make_tree(tmp_path)
    found = list_images(tmp_path)
    names = [p.relative_to(tmp_path).as_posix() for p in found]
    assert names == ["a/1.jpg", "a/2.PNG", "a/deep/er/3.jpeg", "b/4.webp", "b/5.Tif", "b/x.gif", "c.bmp"]
    assert found == sorted(found) and list_images(tmp_path) == found
    assert list_images([tmp_path / "b", tmp_path / "a" / "1.jpg", tmp_path / "b"]) == [
        tmp_path / "a/1.jpg", tmp_path / "b/4.webp", tmp_path / "b/5.Tif", tmp_path / "b/x.gif"]
    assert list_images(str(tmp_path / "**" / "*.jp*g")) == [
        tmp_path / "a/1.jpg", tmp_path / "a/deep/er/3.jpeg"]
    assert list_images(str(tmp_path / "a" / "*")) == [
        tmp_path / "a/1.jpg", tmp_path / "a/2.PNG", tmp_path / "a/deep/er/3.jpeg"]
    # An explicitly named file is kept whatever its extension.
    assert list_images(tmp_path / "a" / "notes.txt") == [tmp_path / "a" / "notes.txt"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="pattern"):
        list_images(str(tmp_path / "*.nothing"))
    with pytest.raises(ValueError, match="empty"):
        list_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="no image"):
        list_images(str(tmp_path / "a" / "*.txt"))


def make_folder(root: Path, counts: dict, size=(10, 12)) -> None:
    for c, (name, count) in enumerate(counts.items()):
        for i in range(count):
            save(make_image("RGB", *size, seed=100 * c + i), root / name / f"{i:03d}.png")


def test_image_folder_classes_and_samples(tmp_path):
    make_folder(tmp_path, {"dog": 2, "cat": 3})
    (tmp_path / ".cache").mkdir()
    folder = ImageFolder(tmp_path)
    assert folder.classes == ["cat", "dog"] and folder.class_to_idx == {"cat": 0, "dog": 1}
    assert folder.labels == [0, 0, 0, 1, 1] and len(folder) == 5
    assert folder[3] == (tmp_path / "dog" / "000.png", 1)
    imposed = ImageFolder(tmp_path, classes=["ant", "cat", "dog"])
    assert imposed.labels == [1, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="dog"):
        ImageFolder(tmp_path, classes=["cat"])
    (tmp_path / "eel").mkdir()
    with pytest.raises(ValueError, match="eel"):
        ImageFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(tmp_path / "nowhere")


def test_stratified_split_and_load_splits(tmp_path):
    make_folder(tmp_path / "flat", {"a": 10, "b": 5, "c": 1}, size=(3, 3))
    train, val = split_image_folder(tmp_path / "flat", val_ratio=0.2, seed=0)
    assert [train.labels.count(c) for c in range(3)] == [8, 4, 1]
    assert [val.labels.count(c) for c in range(3)] == [2, 1, 0]
    assert set(map(tuple, train.samples)).isdisjoint(map(tuple, val.samples))
    assert sorted(train.samples + val.samples) == sorted(ImageFolder(tmp_path / "flat").samples)
    again = split_image_folder(tmp_path / "flat", val_ratio=0.2, seed=0)
    assert again[1].samples == val.samples and again[0].samples == train.samples
    others = {tuple(split_image_folder(tmp_path / "flat", 0.2, seed)[1].samples) for seed in range(6)}
    assert len(others) > 1
    assert load_splits(tmp_path / "flat", 0.2, 0)[1].samples == val.samples
    with pytest.raises(ValueError, match="val_ratio"):
        split_image_folder(tmp_path / "flat", val_ratio=1.0)

    make_folder(tmp_path / "ready" / "train", {"x": 2, "y": 2}, size=(3, 3))
    make_folder(tmp_path / "ready" / "val", {"y": 1}, size=(3, 3))
    train, val = load_splits(tmp_path / "ready")
    assert train.classes == ["x", "y"] and val.classes == ["x", "y"]
    assert val.samples == [(tmp_path / "ready" / "val" / "y" / "000.png", 1)]

    make_folder(tmp_path / "only_train" / "train", {"x": 5}, size=(3, 3))
    train, val = load_splits(tmp_path / "only_train", val_ratio=0.4)
    assert len(train) == 3 and len(val) == 2
    make_folder(tmp_path / "only_val" / "val", {"x": 1}, size=(3, 3))
    with pytest.raises(ValueError, match="train/"):
        load_splits(tmp_path / "only_val")


def test_imagenet_class_names_load():
    names = imagenet_classes()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert names[0] == "tench" and names[1] == "goldfish" and names[-1] == "toilet tissue"
    assert all(name and name == name.strip() for name in names)


# ----------------------------------------------------------------------------------------------------
# The batch loader


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    samples = []
    for i in range(24):
        path = save(make_image("RGB", 12 + i % 3, 10, seed=i), root / f"{i:02d}.png")
        samples.append((path, i % 3))
    return samples


def collect(loader, count=None):
    batches = []
    for batch in loader:
        batches.append(batch)
        if count is not None and len(batches) == count:
            break
    return batches


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for (xa, ya, pa), (xb, yb, pb) in zip(first, second):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        assert pa == pb


def test_loader_is_deterministic_across_runs_and_thread_counts(small_set):
    transform = TrainTransform(image_size=8)
    runs = [collect(BatchLoader(small_set, 5, transform, seed=3, drop_last=False, num_workers=workers,
                                prefetch=prefetch))
            for workers, prefetch in [(0, 1), (1, 1), (3, 2), (2, 4)]]
    for run in runs[1:]:
        assert_same_batches(runs[0], run)
    batches = runs[0]
    assert [len(p) for _, _, p in batches] == [5, 5, 5, 5, 4]
    images, labels, paths = batches[0]
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.float32 and labels.dtype == np.int32
    label_of = dict(small_set)
    assert labels.tolist() == [label_of[p] for p in paths]
    seen = [p for _, _, batch in batches for p in batch]
    assert sorted(seen) == sorted(p for p, _ in small_set)
    assert seen != [p for p, _ in small_set]  # shuffled


def test_loader_epochs_differ_and_resume_exactly(small_set):
    transform = TrainTransform(image_size=8)
    make = lambda: BatchLoader(small_set, 4, transform, seed=1, loop=True, num_workers=2,  # noqa: E731
                               prefetch=3)
    reference = collect(make(), 14)  # 6 batches per epoch: crosses two epoch boundaries
    first_epoch = [p for _, _, batch in reference[:6] for p in batch]
    second_epoch = [p for _, _, batch in reference[6:12] for p in batch]
    assert sorted(first_epoch) == sorted(second_epoch) and first_epoch != second_epoch

    loader = make()
    head = collect(loader, 4)
    state = loader.state_dict()  # taken while later batches are being prefetched
    assert (state["epoch"], state["position"]) == (0, 16)
    resumed = make()
    resumed.load_state_dict(state)
    assert_same_batches(head + collect(resumed, 10), reference)
    # The loader itself continues from where its consumer stopped too.
    assert_same_batches(collect(loader, 10), reference[4:])

    epochs = BatchLoader(small_set, 4, transform, seed=1, num_workers=0)
    assert len(epochs) == 6
    assert_same_batches(collect(epochs), reference[:6])
    assert epochs.state_dict()["epoch"] == 1 and epochs.state_dict()["position"] == 0
    assert_same_batches(collect(epochs), reference[6:12])
    with pytest.raises(ValueError, match="seed"):
        make().load_state_dict({**state, "seed": 2})


def test_loader_shards_are_disjoint_and_cover_the_epoch(small_set):
    transform = EvalTransform(image_size=8)
    for count, world_size in [(24, 3), (23, 4)]:
        shards = []
        for rank in range(world_size):
            loader = BatchLoader(small_set[:count], 2, transform, seed=5, drop_last=False, num_workers=1,
                                 rank=rank, world_size=world_size)
            shards.append([p for _, _, batch in collect(loader) for p in batch])
        assert len({len(s) for s in shards}) == 1  # the same number of samples on every rank
        everything = [p for s in shards for p in s]
        assert len(set(everything)) == len(everything) == count - count % world_size
        # Together: the head of the epoch's permutation (the same on every rank), dealt out in turn.
        permutation = BatchLoader(small_set[:count], 2, transform, seed=5).epoch_order(0)
        dealt = [small_set[i][0] for i in permutation[: count - count % world_size]]
        assert set(everything) == set(dealt)
        assert shards[1][:2] == dealt[1 : 2 * world_size : world_size]
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(small_set, 2, transform, seed=0, rank=3, world_size=3)
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchLoader(small_set[:5], 4, transform, seed=0, world_size=2)


def test_loader_skips_and_lists_broken_files(small_set, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    unlabeled = [p for p, _ in small_set[:11]] + [broken]
    transform = TrainTransform(image_size=8)
    results = []
    for workers in (0, 2):
        loader = BatchLoader(unlabeled, 4, transform, seed=0, shuffle=False, num_workers=workers)
        with pytest.warns(UserWarning, match="broken.png"):
            batches = collect(loader)
        assert [x.shape for x, _, _ in batches] == [(4, 8, 8, 3)] * 3
        assert all((y == -1).all() for _, y, _ in batches)
        paths = [p for _, _, batch in batches for p in batch]
        assert broken not in paths and len(paths) == 12
        assert loader.num_skipped == 1 and [p for p, _ in loader.skipped] == [broken]
        assert "not an image" in loader.skipped[0][1]
        results.append(batches)
    assert_same_batches(*results)

    everything_broken = BatchLoader([broken] * 4, 2, transform, seed=0, num_workers=0, max_attempts=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NoUsableImages, match="3 samples in a row"):
            collect(everything_broken)


class CountingTransform:
    """Records the paths it is called on (from any thread) and returns a blank image; "boom" raises."""

    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()

    def __call__(self, path, rng=None):
        if Path(path).name == "boom":
            raise RuntimeError("boom: not an ImageLoadError")
        with self.lock:
            self.calls.append(Path(path))
        return np.zeros((4, 4, 3), np.float32)


def test_batchers_read_ahead_by_at_most_their_prefetch():
    """Both batchers run on one engine: while a batch is in use, workers decode `prefetch` batches past it
    (`prefetch + 1` for `iter_image_batches`) and no more; with 0 workers nothing is read ahead."""
    paths = [Path(f"{i:02d}.png") for i in range(40)]
    for workers in (0, 2):
        batchers = {  # (iterator, the most samples it may have decoded when its first batch is handed out)
            "iter_image_batches": (lambda t: iter_image_batches(paths, t, 2, Skipped(), num_workers=workers,
                                                                prefetch=1), 2 * (1 + 2)),
            "BatchLoader": (lambda t: iter(BatchLoader(paths, 2, t, seed=0, num_workers=workers, prefetch=1)),
                            2 * (1 + 1)),
        }
        for name, (make, bound) in batchers.items():
            bound = bound if workers else 2
            transform = CountingTransform()
            batches = make(transform)
            assert len(next(batches)[0]) == 2, name
            deadline = time.monotonic() + 10  # let the workers finish what was handed to them
            while len(transform.calls) < bound and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)
            assert len(transform.calls) == bound, (name, workers, len(transform.calls))
            batches.close()


def test_batchers_pass_on_other_errors_and_refuse_negative_workers():
    paths = [Path("a.png"), Path("boom"), Path("c.png")]
    for workers in (0, 2):
        with pytest.raises(RuntimeError, match="boom"):
            list(iter_image_batches(paths, CountingTransform(), 2, Skipped(), num_workers=workers))
        with pytest.raises(RuntimeError, match="boom"):
            list(BatchLoader(paths, 1, CountingTransform(), seed=0, shuffle=False, num_workers=workers))
    with pytest.raises(ValueError, match="num_workers=-1"):
        list(iter_image_batches(paths, CountingTransform(), 2, Skipped(), num_workers=-1))


SHAPES = {"A": (8, 12, 3), "B": (12, 8, 3), "C": (4, 4, 3)}


def shaped(path, rng=None):
    """A transform for grouping tests: path "<index>-<shape letter>" -> an image of that shape filled with the
    index; "bad" in the name -> an unreadable file."""
    if "bad" in path.name:
        raise ImageLoadError(path, "unreadable")
    index, letter = path.name.split("-")
    return np.full(SHAPES[letter], float(index), np.float32)


def test_image_batches_group_equal_shapes_never_mixing_them():
    letters = "ABACBAACB"
    paths = [Path(f"{i}-{letter}") for i, letter in enumerate(letters)]
    paths.insert(4, Path("bad-A"))
    labels = [int(p.name.split("-")[0]) if "bad" not in p.name else -1 for p in paths]
    expected = {  # max_pending -> batches of indices, by hand from the documented rule
        None: [[0, 2, 5], [1, 4, 8], [3, 7], [6]],  # full batches as they fill, the rest oldest first
        3: [[0, 2], [1, 4], [3, 7], [5, 6], [8]],  # past 3 waiting images, the oldest one's batch goes out
    }
    for workers in (0, 2):
        for max_pending, batches_expected in expected.items():
            skipped = Skipped()
            batches = list(iter_image_batches(paths, shaped, 3, skipped, num_workers=workers, labels=labels,
                                              group_by_shape=True, max_pending=max_pending))
            assert [indices for _, _, indices in batches] == batches_expected
            for images, batch_paths, indices in batches:
                letter = batch_paths[0].name[-1]
                assert images.shape == (len(indices), *SHAPES[letter])  # one shape per batch
                assert {p.name[-1] for p in batch_paths} == {letter}
                assert images[:, 0, 0, 0].tolist() == indices  # images, paths and labels stay together
            assert [p for p, _ in skipped.items] == ["bad-A"]
    # Without grouping the batches follow the input order (and stacking different shapes fails, as before).
    same = [Path(f"{i}-A") for i in range(5)]
    plain = list(iter_image_batches(same, shaped, 2, Skipped(), num_workers=0, labels=range(5)))
    assert [indices for _, _, indices in plain] == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        list(iter_image_batches(paths[:2], shaped, 2, Skipped(), num_workers=0))
    with pytest.raises(ValueError, match="max_pending=2: expected at least batch_size=3"):
        list(iter_image_batches(paths, shaped, 3, Skipped(), group_by_shape=True, max_pending=2))
