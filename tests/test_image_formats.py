"""HEIC/HEIF, AVIF and camera RAW files (mlx_aim/data/formats.py, `load_image`): files written here decode to the
pixels saved (within the codec's loss), their orientation is applied once, RAW files give their embedded preview
(or their demosaiced data) with the `raw` extra and are skipped with the reason without it, and the folder
listing, the loaders, classify, extract-features, zero-shot, probe, pretrain, `mlx-aim search index` and the
search page all take them."""

import os

import numpy as np
import pillow_heif  # a dependency of the default install
import pytest
import rawpy  # noqa: F401  (the `raw` extra, in the dev install: these tests read the DNG files they write)
from PIL import Image, ImageOps

from conftest import last_json
from dng_helpers import write_dng
from probe_helpers import make_model_folder
from mlx_aim.data import (
    IMAGENET_STD, BatchLoader, EvalTransform, ImageFolder, ImageLoadError, Skipped, formats, gather_images,
    iter_image_batches, list_images, load_image,
)
from mlx_aim.data.images import RAW_PREVIEW_MIN_SIDE
from mlx_aim.tasks.features import load_features

ORIENTATION = 0x0112
# Four flat quadrants: a photo turned or mirrored the wrong way shows a different colour in some corner.
QUADRANTS = np.array([[[220, 40, 40], [40, 200, 60]], [[40, 60, 220], [230, 220, 50]]], np.uint8)
# Codec tolerance, in levels, at the quadrants' centres (flat areas: the codecs' loss is at the edges).
TOLERANCE = 8


def quadrants(height: int = 48, width: int = 64) -> np.ndarray:
    return QUADRANTS.repeat(height // 2, axis=0).repeat(width // 2, axis=1)


def centres(array: np.ndarray) -> np.ndarray:
    """The pixel at the centre of each quadrant, as a 2x2x3 array (int for uint8 pixels)."""
    h, w = array.shape[:2]
    corners = array[[h // 4, 3 * h // 4]][:, [w // 4, 3 * w // 4]]
    return corners.astype(int) if corners.dtype == np.uint8 else corners


def save(path, array: np.ndarray, orientation: int = 1):
    """`array` saved by Pillow in the format of `path`'s extension (HEIC through pillow-heif), with an EXIF
    orientation tag unless it is 1."""
    formats.missing_support(path)  # registers pillow-heif's opener, as load_image does
    exif = Image.Exif()
    if orientation != 1:
        exif[ORIENTATION] = orientation
    Image.fromarray(array).save(path, quality=95, exif=exif.tobytes())
    return path


def upright(array: np.ndarray, orientation: int) -> np.ndarray:
    """What a viewer shows for pixels stored with `orientation` (Pillow's own EXIF rule, on an in-memory image)."""
    img = Image.fromarray(array)
    img.getexif()[ORIENTATION] = orientation
    return np.asarray(ImageOps.exif_transpose(img))


@pytest.mark.parametrize("suffix", [".heic", ".avif"])
def test_heic_and_avif_decode_to_the_pixels_saved(tmp_path, suffix):
    pixels = quadrants()
    loaded = np.asarray(load_image(save(tmp_path / f"photo{suffix}", pixels)))
    assert loaded.shape == pixels.shape and loaded.dtype == np.uint8
    assert np.abs(centres(loaded) - centres(pixels)).max() <= TOLERANCE
    assert np.abs(loaded.astype(int) - pixels).mean() < 5  # chroma subsampling blurs the quadrant edges


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("suffix", [".jpg", ".heic", ".avif"])
def test_orientation_is_applied_once(tmp_path, suffix, orientation):
    pixels = quadrants()
    path = save(tmp_path / f"turned{suffix}", pixels, orientation)
    if suffix == ".heic":
        # pillow-heif stores the turn as HEIF's rotation box and keeps the EXIF tag, as an iPhone does: a reader
        # that applied both would turn the photo twice.
        exif = Image.Exif()
        exif.load(pillow_heif.open_heif(path).info["exif"])
        assert exif.get(ORIENTATION) == orientation
    loaded = np.asarray(load_image(path))
    expected = upright(pixels, orientation)
    assert loaded.shape == expected.shape
    assert np.abs(centres(loaded) - centres(expected)).max() <= TOLERANCE


@pytest.mark.parametrize("suffix", [".heic", ".avif"])
def test_a_truncated_file_is_an_image_load_error(tmp_path, suffix):
    data = save(tmp_path / f"photo{suffix}", quadrants()).read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) - 50])
    with pytest.raises(ImageLoadError, match=f"cut\\{suffix}"):
        load_image(tmp_path / f"cut{suffix}")


@pytest.mark.parametrize("module, suffix, fix", [("pillow_heif", ".heic", "pip install pillow-heif"),
                                                 ("pillow_avif", ".avif", "pip install pillow-avif-plugin")])
def test_a_format_this_installation_cannot_read_is_refused_with_the_fix(tmp_path, monkeypatch, module, suffix, fix):
    path = save(tmp_path / f"photo{suffix}", quadrants())
    monkeypatch.setitem(__import__("sys").modules, module, None)  # importing it fails, as where it is missing
    monkeypatch.setattr(formats.features, "check", lambda feature: False)  # a Pillow built without AVIF
    formats._heif_support.cache_clear()
    formats._avif_support.cache_clear()
    try:
        with pytest.raises(ImageLoadError, match=fix):
            load_image(path)
        skipped = Skipped()
        assert gather_images([path], skipped) == [] and fix in skipped.items[0][1]
    finally:
        formats._heif_support.cache_clear()
        formats._avif_support.cache_clear()


def test_heic_and_avif_are_listed_as_images_whatever_the_case_of_the_extension(tmp_path):
    for name in ("a.HEIC", "b.heif", "c.hif", "d.avif", "e.DNG", "f.cr3", "g.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.HEIC", "b.heif", "c.hif", "d.avif", "e.DNG", "f.cr3"]
    assert formats.IMAGE_EXTENSIONS >= {".heic", ".avif", ".dng", ".nef", ".arw", ".jpg"}


# ----------------------------------------------------------------------------------------------------
# RAW


BAYER_SHAPE = (64, 96)


def bayer() -> np.ndarray:
    """Sensor values: the left half bright, the right half dark (what the demosaiced image must show)."""
    cfa = np.full(BAYER_SHAPE, 300, np.uint16)
    cfa[:, BAYER_SHAPE[1] // 2:] = 40
    cfa[:, : BAYER_SHAPE[1] // 2] = 3000
    return cfa


PREVIEW = quadrants(RAW_PREVIEW_MIN_SIDE, 320)


@pytest.mark.parametrize("jpeg", [True, False], ids=["jpeg-preview", "rgb-preview"])
@pytest.mark.parametrize("orientation", [1, 6, 8, 3])
def test_raw_gives_its_embedded_preview_turned_as_the_file_says(tmp_path, jpeg, orientation):
    path = write_dng(tmp_path / "photo.dng", bayer(), PREVIEW, orientation, jpeg_preview=jpeg)
    loaded = np.asarray(load_image(path))
    expected = upright(PREVIEW, orientation)
    assert loaded.shape == expected.shape
    assert np.abs(centres(loaded) - centres(expected)).max() <= (TOLERANCE if jpeg else 0)


@pytest.mark.parametrize("preview", [None, quadrants(RAW_PREVIEW_MIN_SIDE - 2, 320)], ids=["no-preview", "small"])
def test_raw_without_a_usable_preview_is_demosaiced_at_half_size(tmp_path, preview):
    path = write_dng(tmp_path / "photo.dng", bayer(), preview, orientation=6)
    loaded = np.asarray(load_image(path)).astype(int)
    half = (BAYER_SHAPE[0] // 2, BAYER_SHAPE[1] // 2)
    assert loaded.shape == (half[1], half[0], 3)  # turned a quarter clockwise: the bright left half is on top
    assert loaded[: half[1] // 2 - 2].min() > loaded[half[1] // 2 + 2:].max()


def test_a_file_that_is_not_raw_is_an_image_load_error(tmp_path):
    path = tmp_path / "fake.nef"
    path.write_bytes(b"not a RAW file" * 100)
    with pytest.raises(ImageLoadError, match="fake.nef.*LibRaw cannot read it"):
        load_image(path)


@pytest.fixture
def without_rawpy(monkeypatch):
    """The `raw` extra absent: importing rawpy fails, as it does where it is not installed."""
    monkeypatch.setitem(__import__("sys").modules, "rawpy", None)  # `import rawpy` now raises ImportError
    formats.rawpy_module.cache_clear()
    yield
    formats.rawpy_module.cache_clear()


def test_without_the_raw_extra_a_raw_file_is_skipped_with_the_reason(tmp_path, without_rawpy):
    folder = tmp_path / "photos"
    folder.mkdir()
    save(folder / "a.jpg", quadrants())
    raw = write_dng(folder / "b.dng", bayer(), PREVIEW)
    with pytest.raises(ImageLoadError, match=r"b\.dng: RAW support needs `pip install 'mlx-aim\[raw\]'`"):
        load_image(raw)
    skipped = Skipped()
    assert gather_images([folder], skipped) == [folder / "a.jpg"]
    assert skipped.items == [(str(raw), formats.RAW_EXTRA_HINT)]
    # A training loader given the file anyway replaces it and lists why.
    loader = BatchLoader([raw, folder / "a.jpg"], 2, EvalTransform(16), seed=0, shuffle=False, num_workers=0)
    with pytest.warns(UserWarning, match="skipping .*b.dng"):
        images, _, paths = next(iter(loader))
    assert paths == [folder / "a.jpg"] * 2 and loader.skipped == [(raw, formats.RAW_EXTRA_HINT)]


# ----------------------------------------------------------------------------------------------------
# Every job that reads images takes them


@pytest.fixture
def mixed_folder(tmp_path):
    """Two class folders holding a JPEG, a HEIC, an AVIF and a DNG each."""
    root = tmp_path / "mixed"
    for label, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        pixels = np.roll(quadrants(), label, axis=2)
        for suffix in (".jpg", ".heic", ".avif"):
            save(root / name / f"photo{suffix}", pixels, orientation=6)
        preview = np.roll(quadrants(288, 384), label, axis=2)  # the photos' 3:4, over RAW_PREVIEW_MIN_SIDE
        write_dng(root / name / "photo.dng", bayer(), preview, orientation=6)
    return root


def test_folder_dataset_and_loaders_read_every_format(mixed_folder):
    folder = ImageFolder(mixed_folder)
    assert sorted(p.suffix for p, _ in folder.samples) == sorted([".avif", ".dng", ".heic", ".jpg"] * 2)
    skipped = Skipped()
    batches = list(iter_image_batches([p for p, _ in folder.samples], EvalTransform(16), 8, skipped, num_workers=2))
    assert len(skipped) == 0 and batches[0][0].shape == (8, 16, 16, 3)
    # Each file reads as its class's upright picture: the RAW file's preview stands for the photo.
    images, paths = batches[0][:2]
    for image, path in zip(images, paths):
        first = images[0 if path.parent.name == "a" else 4]
        assert np.abs(centres(image) - centres(first)).max() < TOLERANCE / 255 / min(IMAGENET_STD)
    loader = BatchLoader(folder, 4, EvalTransform(16), seed=0, num_workers=2)
    assert sum(len(paths) for _, _, paths in loader) == 8 and loader.num_skipped == 0


def test_classify_reads_every_format(mixed_folder, tmp_path, capsys):
    from mlx_aim.cli import classify

    model = make_model_folder(tmp_path / "model")
    assert classify.main(["--model", str(model), "--no-progress", "--json", str(mixed_folder)]) == 0
    result = last_json(capsys.readouterr().out)
    assert (result["num_images"], result["num_skipped"]) == (8, 0)


def test_search_index_reads_every_format_and_a_raw_file_after_the_extra_is_installed(
        lit_folder, mixed_folder, tmp_path, capsys, monkeypatch):
    from mlx_aim.cli.search import main as search_main

    out = tmp_path / "index"
    command = ["index", "--model", str(lit_folder), "--out", str(out), str(mixed_folder), "--json", "--no-progress"]
    monkeypatch.setitem(__import__("sys").modules, "rawpy", None)
    formats.rawpy_module.cache_clear()
    assert search_main(command) == 0
    first = last_json(capsys.readouterr().out)
    assert (first["num_images"], first["num_skipped"]) == (6, 2)
    monkeypatch.undo()  # the extra installed: the skipped RAW files are read now, though they did not change
    formats.rawpy_module.cache_clear()
    assert search_main(command) == 0
    second = last_json(capsys.readouterr().out)
    assert (second["num_images"], second["num_embedded"], second["num_skipped"]) == (8, 2, 0)
    rows, paths = load_features(out)
    assert rows.shape[0] == 8 and sorted(os.path.basename(p) for p in paths) == sorted(
        [f"photo{s}" for s in (".jpg", ".heic", ".avif", ".dng")] * 2)


def test_extract_features_zero_shot_probe_and_pretrain_read_every_format(mixed_folder, lit_folder, tmp_path, capsys,
                                                                         recwarn):
    from mlx_aim.cli import extract_features, pretrain, probe, zero_shot
    from conftest import tiny_config

    model = make_model_folder(tmp_path / "model")
    assert extract_features.main(["--model", str(model), "--out", str(tmp_path / "f"), "--no-progress", "--json",
                                  str(mixed_folder)]) == 0
    assert (last_json(capsys.readouterr().out)["num_images"], load_features(tmp_path / "f")[0].shape[0]) == (8, 8)
    assert zero_shot.main(["--model", str(lit_folder), "--labels", "a,b", "--no-progress", "--json",
                           str(mixed_folder)]) == 0
    result = last_json(capsys.readouterr().out)
    assert (result["num_images"], result["num_skipped"]) == (8, 0)
    trunk = make_model_folder(tmp_path / "trunk", with_head=False)
    assert probe.main(["train", "--model", str(trunk), "--data", str(mixed_folder), "--out", str(tmp_path / "p"),
                       "--steps", "2", "--batch-size", "4", "--val-ratio", "0.25", "--no-progress", "--json"]) == 0
    config = tmp_path / "tiny.json"
    config.write_text(__import__("json").dumps(
        tiny_config(width=32, depth=1, num_heads=2, head_depth=1, probe_layers=[0]).to_dict()))
    assert pretrain.main(["--config", str(config), "--data", str(mixed_folder), "--out", str(tmp_path / "run"),
                          "--steps", "1", "--batch-size", "4", "--val-ratio", "0", "--no-progress"]) == 0
    assert "skipping" not in capsys.readouterr().err
    assert not [w for w in recwarn if "skipping" in str(w.message)]


def test_an_open_file_reads_as_its_path_does(mixed_folder):
    for path in sorted((mixed_folder / "a").iterdir()):
        with open(path, "rb") as f:
            assert np.array_equal(np.asarray(load_image(f)), np.asarray(load_image(path))), path.name


def test_search_serve_shows_every_format_upright(lit, mixed_folder, tmp_path):
    import http.client
    import io
    import threading

    from mlx_aim.apps.search_server import SearchService, make_server
    from mlx_aim.tasks.search import SearchIndex, build_index

    write_dng(mixed_folder / "bare.dng", bayer(), orientation=6)  # no preview: Pillow alone cannot show it
    build_index(lit[0], [mixed_folder], tmp_path / "index", model_name="tiny-lit", progress=False)
    index = SearchIndex.open(tmp_path / "index")
    assert len(index) == 9
    server = make_server(SearchService(tmp_path / "index", None, "tiny-lit"), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for row in range(len(index)):
            path = index.row_path(row)
            for kind in ("photo", "thumb"):
                connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
                connection.request("GET", f"/{kind}/{row}")
                response = connection.getresponse()
                body = response.read()
                connection.close()
                assert response.status == 200, (kind, path)
                # As a browser shows it: a file served as it is turns by its EXIF tag.
                shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(body))).convert("RGB"))
                expected = np.asarray(load_image(path).resize(shown.shape[1::-1], Image.Resampling.BICUBIC))
                assert np.abs(centres(shown) - centres(expected)).max() <= 2 * TOLERANCE, (kind, path)
    finally:
        server.shutdown()
        server.server_close()
