import json
import os

import numpy as np
import pytest
from PIL import Image

from mlx_aim.data import synthetic
from mlx_aim.data.synthetic import MANIFEST_NAME, SHAPE_CLASSES, SyntheticShapes, write_image_folder

PATTERNS = {"stripes", "checkerboard", "dots"}  # fill the whole image; every other class is one shape


def test_classes():
    assert len(SHAPE_CLASSES) >= 10
    assert len(set(SHAPE_CLASSES)) == len(SHAPE_CLASSES)
    assert SyntheticShapes(10).classes == list(SHAPE_CLASSES[:10])
    assert SyntheticShapes(10, num_classes=len(SHAPE_CLASSES)).classes == list(SHAPE_CLASSES)


@pytest.mark.parametrize("image_size", [32, 64])
def test_image_size_and_mode(image_size):
    ds = SyntheticShapes(20, image_size=image_size)
    image, label = ds[7]
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB" and image.size == (image_size, image_size)
    assert isinstance(label, int) and label == 7
    pixels = ds.array(7)
    assert pixels.dtype == np.uint8 and pixels.shape == (image_size, image_size, 3)
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_deterministic_per_index():
    a, b = SyntheticShapes(50, seed=3), SyntheticShapes(50, seed=3)
    first = [a.array(i) for i in (5, 3, 40)]
    second = [b.array(i) for i in (40, 3, 5)][::-1]  # access order does not matter
    for x, y in zip(first, second):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.array(5), a.array(15))  # same class, another sample
    assert not np.array_equal(a.array(5), SyntheticShapes(50, seed=4).array(5))
    assert not np.array_equal(a.array(5), SyntheticShapes(50, seed=3, split="val").array(5))
    # The sample depends on (seed, index) only, not on the dataset's length.
    np.testing.assert_array_equal(a.array(5), SyntheticShapes(6, seed=3).array(5))
    np.testing.assert_array_equal(a.array(-1), a.array(49))


def test_balanced_labels():
    ds = SyntheticShapes(120, num_classes=12)
    labels = [ds[i][1] for i in range(len(ds))]
    assert labels == [ds.label(i) for i in range(len(ds))]
    assert np.bincount(labels).tolist() == [10] * 12
    assert np.bincount(labels[:24]).tolist() == [2] * 12  # every prefix is balanced too


@pytest.mark.parametrize("name", SHAPE_CLASSES)
def test_every_class_draws_a_visible_shape_inside_the_image(name):
    draw = synthetic._DRAW[name]
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = draw(rng, 64)
        assert mask.shape == (64, 64) and mask.dtype == np.float32
        assert mask.min() >= 0.0 and mask.max() <= 1.0
        assert 0.03 < mask.mean() < 0.75, f"{name}: covers {mask.mean():.2f} of the image"
        if name not in PATTERNS:
            border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
            assert border.max() == 0.0, f"{name}: touches the image border"


def test_bad_arguments():
    for kwargs in [
        dict(num_classes=len(SHAPE_CLASSES) + 1),
        dict(num_classes=1),
        dict(image_size=8),
        dict(seed=-1),
        dict(seed=2**32),
        dict(split="test"),
    ]:
        with pytest.raises(ValueError):
            SyntheticShapes(10, **kwargs)
    with pytest.raises(ValueError, match="num_samples"):
        SyntheticShapes(-1)
    with pytest.raises(IndexError):
        SyntheticShapes(10)[10]
    with pytest.raises(IndexError):
        SyntheticShapes(10)[-11]


def _nearest_class_mean_accuracy(train, train_labels, test, test_labels, num_classes):
    means = np.stack([train[train_labels == c].mean(axis=0) for c in range(num_classes)])
    distances = ((test[:, None, :] - means[None]) ** 2).sum(axis=-1)
    return float((distances.argmin(axis=1) == test_labels).mean())


def _orientation_histograms(images, cells=4, bins=8):
    """Per cell of a 4x4 grid, gradient magnitude summed per orientation (polarity-free), normalised."""
    gray = images.mean(axis=-1)
    gy, gx = np.gradient(gray, axis=(1, 2))
    magnitude = np.hypot(gx, gy)
    orientation = np.minimum((np.arctan2(gy, gx) % np.pi / np.pi * bins).astype(int), bins - 1)
    n, size = len(images), images.shape[1]
    per_bin = [(magnitude * (orientation == k)).reshape(n, cells, size // cells, cells, size // cells)
               .sum(axis=(2, 4)) for k in range(bins)]
    features = np.stack(per_bin, axis=-1).reshape(n, -1)
    return features / (features.sum(axis=1, keepdims=True) + 1e-6)


def test_label_lies_in_structure_not_in_mean_colour():
    num_classes, n = 10, 1000
    train = SyntheticShapes(n, num_classes=num_classes, split="train")
    test = SyntheticShapes(n, num_classes=num_classes, split="val")
    x_train = np.stack([train.array(i) for i in range(n)]).astype(np.float32) / 255
    x_test = np.stack([test.array(i) for i in range(n)]).astype(np.float32) / 255
    y_train = np.array([train.label(i) for i in range(n)])
    y_test = np.array([test.label(i) for i in range(n)])
    chance = 1 / num_classes

    colour = _nearest_class_mean_accuracy(x_train.mean(axis=(1, 2)), y_train, x_test.mean(axis=(1, 2)),
                                          y_test, num_classes)
    structure = _nearest_class_mean_accuracy(_orientation_histograms(x_train), y_train,
                                             _orientation_histograms(x_test), y_test, num_classes)
    assert colour < 1.5 * chance, f"mean colour predicts the class: accuracy {colour:.3f}"
    assert structure > 2.5 * chance and structure > colour + 0.15, (colour, structure)


def _mtimes(root):
    return {p: os.stat(p).st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_image_folder(tmp_path):
    root = write_image_folder(tmp_path / "shapes", num_train=12, num_val=6, image_size=32, seed=1,
                              num_classes=3)
    assert root == tmp_path / "shapes"
    assert sorted(p.name for p in root.iterdir()) == sorted([MANIFEST_NAME, "train", "val"])
    for split, count in (("train", 12), ("val", 6)):
        assert sorted(p.name for p in (root / split).iterdir()) == ["disc", "ring", "square"]
        files = sorted((root / split).rglob("*.png"))
        assert len(files) == count
        ds = SyntheticShapes(count, image_size=32, seed=1, num_classes=3, split=split)
        for i in range(count):
            path = root / split / ds.classes[ds.label(i)] / f"{i}.png"
            np.testing.assert_array_equal(np.asarray(Image.open(path)), ds.array(i))  # PNG is lossless
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert manifest["num_train"] == 12 and manifest["num_val"] == 6 and manifest["seed"] == 1

    # Complete for these parameters: nothing is rewritten.
    before = _mtimes(root)
    write_image_folder(root, num_train=12, num_val=6, image_size=32, seed=1, num_classes=3)
    assert _mtimes(root) == before


def test_write_image_folder_rebuilds_a_partial_folder(tmp_path):
    root = tmp_path / "shapes"
    write_image_folder(root, num_train=6, num_val=3, image_size=32, num_classes=3)
    for path in root.rglob("*.png"):
        os.utime(path, ns=(10**9, 10**9))  # stamps that a rewrite replaces
    # A killed run: the manifest was never written and an image is missing.
    (root / MANIFEST_NAME).unlink()
    (root / "train" / "disc" / "3.png").unlink()
    write_image_folder(root, num_train=6, num_val=3, image_size=32, num_classes=3)
    assert (root / MANIFEST_NAME).exists() and (root / "train" / "disc" / "3.png").exists()
    assert all(t != 10**9 for t in _mtimes(root).values())
    assert len(list(root.rglob("*.png"))) == 9


def test_write_image_folder_rebuilds_for_other_parameters(tmp_path):
    root = tmp_path / "shapes"
    write_image_folder(root, num_train=6, num_val=3, image_size=32, num_classes=3)
    write_image_folder(root, num_train=4, num_val=2, image_size=32, num_classes=2)
    assert sorted(p.name for p in (root / "train").iterdir()) == ["disc", "ring"]
    assert len(list((root / "train").rglob("*.png"))) == 4
    assert len(list((root / "val").rglob("*.png"))) == 2


def test_write_image_folder_refuses_to_delete_other_data(tmp_path):
    root = tmp_path / "data"
    (root / "train" / "n01440764").mkdir(parents=True)
    (root / "train" / "n01440764" / "a.JPEG").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="n01440764"):
        write_image_folder(root, num_train=4, num_val=2, image_size=32)
    assert (root / "train" / "n01440764" / "a.JPEG").read_bytes() == b"not ours"
    (root / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt"):
        write_image_folder(root, num_train=4, num_val=2, image_size=32)
    with pytest.raises(ValueError, match="not a folder"):
        write_image_folder(root / "notes.txt", num_train=4, num_val=2, image_size=32)
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "train"]
