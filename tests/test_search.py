"""Photo search (mlx_aim.tasks.search, `mlx-aim search`) on a tiny random-weight LiT and generated photo folders: scores
against a brute-force numpy cosine of embeddings computed apart from the index, incremental and resumed runs,
image queries without the model, the contact sheet, a wrong model and unreadable files."""

import json
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from conftest import last_json, run_script
from lit_helpers import write_tiny_lit
from mlx_aim import load
from mlx_aim.tasks import encode, search
from mlx_aim.cli.main import main as mlx_aim_main
from mlx_aim.cli.search import main as search_main
from mlx_aim.data import preprocessing_for
from mlx_aim.tasks.features import load_features
from mlx_aim.tasks.lit import open_lit
from mlx_aim.tasks.search import SearchIndex, build_index, file_stamp, model_identity
from mlx_aim.data.synthetic import SyntheticShapes
from mlx_aim.tasks.visualize import contact_sheet_size

NUM_PHOTOS = 9


def write_photo(path, index: int, size: int = 40):
    path.parent.mkdir(parents=True, exist_ok=True)
    SyntheticShapes(index + 1, image_size=size, seed=3)[index][0].save(path)
    return path


@pytest.fixture
def photos(tmp_path):
    """NUM_PHOTOS generated photos in a folder tree (one sub-folder, one JPEG)."""
    root = tmp_path / "photos"
    for i in range(NUM_PHOTOS):
        write_photo(root / ("trip" if i % 3 == 0 else ".") / f"{i:02d}.{'jpg' if i == 4 else 'png'}", i)
    return root


def listed(root):
    return sorted(os.path.abspath(p) for p in root.rglob("*.*"))


def brute_force(model, tokenizer, paths, text):
    """Cosines of `text` with each of `paths`, from the model's raw projections normalised in numpy."""
    prep = preprocessing_for(model.config.image)
    images = np.asarray(model.encode_image(mx.array(np.stack([prep(p) for p in paths]))), np.float64)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    words = np.asarray(model.encode_text(mx.array(tokenizer.encode([text]))), np.float64)[0]
    return images @ (words / np.linalg.norm(words))


def counting_embeds(monkeypatch):
    """Counts the images `build_index` embeds (the real embedding still runs)."""
    seen = []
    real = search.embed_images

    def embed(model, images):
        seen.append(images.shape[0])
        return real(model, images)

    monkeypatch.setattr(search, "embed_images", embed)
    return seen


def index(model, photos, out, **kwargs):
    return build_index(model, [photos], out, model_name="tiny-lit", progress=False, **kwargs)


def test_cli_index_and_text_query_equal_a_brute_force_cosine(lit_folder, lit, photos, tmp_path, capsys):
    out = tmp_path / "index"
    assert search_main(["index", "--model", str(lit_folder), "--out", str(out), str(photos), "--batch-size", "4",
                        "--shard-size", "4", "--json", "--no-progress"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert (summary["num_images"], summary["num_embedded"], summary["num_shards"]) == (NUM_PHOTOS, NUM_PHOTOS, 3)
    text = "a red bicycle at night"
    assert search_main(["query", "--index", str(out), text, "--top-k", "100", "--json"]) == 0
    result = last_json(capsys.readouterr().out)
    assert result["model_loaded"] and result["model"] == str(lit_folder.resolve())
    paths = listed(photos)
    expected = dict(zip(paths, brute_force(*lit, paths, text)))
    got = {r["path"]: r["score"] for r in result["results"]}
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[p] for p in paths], [expected[p] for p in paths], rtol=1e-5, atol=1e-6)
    scores = [r["score"] for r in result["results"]]
    assert scores == sorted(scores, reverse=True) and [r["rank"] for r in result["results"]] == list(range(1, 10))
    # The index is a feature folder too: load_features reads its rows.
    rows, row_paths = load_features(out)
    assert rows.shape == (NUM_PHOTOS, 16) and sorted(row_paths) == paths


def test_a_rerun_embeds_nothing_and_changes_embed_only_those(lit, photos, tmp_path, monkeypatch):
    model, tokenizer = lit
    out = tmp_path / "index"
    first = index(model, photos, out, shard_size=4, batch_size=4)
    assert (first.num_embedded, first.num_reused, first.num_dropped) == (NUM_PHOTOS, 0, 0)
    seen = counting_embeds(monkeypatch)
    again = index(model, photos, out, shard_size=4, batch_size=4)
    assert (again.num_embedded, again.num_reused, again.num_dropped, seen) == (0, NUM_PHOTOS, 0, [])
    assert again.index["shards"] == first.index["shards"]

    added = write_photo(photos / "trip" / "new.png", 20)
    changed = photos / "01.png"
    write_photo(changed, 21)
    os.utime(changed, ns=(1, file_stamp(changed)[1] + 10**9))  # a new mtime, whatever the clock's resolution
    (photos / "trip" / "00.png").unlink()
    third = index(model, photos, out, shard_size=4, batch_size=4)
    assert (third.num_embedded, third.num_reused, third.num_dropped, sum(seen)) == (2, NUM_PHOTOS - 2, 2, 2)
    paths = listed(photos)
    found = SearchIndex.open(out)
    assert sorted(h.path for h in found.search(np.eye(16)[0], top_k=100)) == paths
    # Rows of the added and changed files are theirs, and the others' are still right.
    got = {h.path: h.score for h in found.search(_text(model, tokenizer, "a disc"), top_k=100)}
    expected = dict(zip(paths, brute_force(model, tokenizer, paths, "a disc")))
    for path in paths:
        assert got[path] == pytest.approx(expected[path], rel=1e-5, abs=1e-6), path
    assert str(added) in got
    # Shards that lost rows were rewritten; the dead ones are gone from the folder.
    on_disk = {p.name for p in out.glob("shard-*.json")}
    assert on_disk == {f"{s['name']}.json" for s in found.index["shards"]}


def _text(model, tokenizer, text):
    words = np.asarray(model.encode_text(mx.array(tokenizer.encode([text]))), np.float64)[0]
    return words / np.linalg.norm(words)


def test_an_interrupted_run_keeps_its_finished_shards(lit, photos, tmp_path, monkeypatch):
    model, _ = lit
    out = tmp_path / "index"
    real, calls = search.embed_images, []

    def dies_on_the_third_batch(model, images):
        calls.append(images.shape[0])
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a user's Ctrl-C
        return real(model, images)

    monkeypatch.setattr(search, "embed_images", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        index(model, photos, out, shard_size=2, batch_size=2)
    assert not (out / "index.json").exists() and len(list(out.glob("shard-*.json"))) == 2
    with pytest.raises(FileNotFoundError, match="no search index"):
        SearchIndex.open(out)
    seen = counting_embeds(monkeypatch)
    resumed = index(model, photos, out, shard_size=2, batch_size=2)
    assert (resumed.num_reused, resumed.num_embedded, sum(seen)) == (4, NUM_PHOTOS - 4, NUM_PHOTOS - 4)
    fresh = index(model, photos, tmp_path / "fresh", shard_size=2, batch_size=2)
    a, b = SearchIndex.open(out), SearchIndex.open(fresh.out)
    query = np.full(16, 0.25)
    assert [(h.path, h.score) for h in a.search(query, 100)] == [(h.path, h.score) for h in b.search(query, 100)]


def test_an_indexed_image_is_queried_without_the_model(lit_folder, lit, photos, tmp_path, capsys):
    model_copy = tmp_path / "model"
    shutil.copytree(lit_folder, model_copy)
    out = tmp_path / "index"
    assert search_main(["index", "--model", str(model_copy), "--out", str(out), str(photos), "--no-progress"]) == 0
    capsys.readouterr()
    probe = photos / "trip" / "03.png"
    moved = model_copy.rename(tmp_path / "moved")  # the recorded model is gone: loading it would fail
    assert search_main(["query", "--index", str(out), "--image", str(probe), "--top-k", "3", "--json"]) == 0
    result = last_json(capsys.readouterr().out)
    assert not result["model_loaded"] and result["model_seconds"] == 0
    assert result["query"] == {"image": str(probe), "terms": [{"sign": 1, "weight": 1.0, "kind": "image",
                                                                "value": str(probe)}]}
    stored = SearchIndex.open(out)
    row = stored.search(stored.stored_embedding(probe), 1)[0].row
    assert stored.row_path(row) == str(probe)
    assert result["results"][0] == {"rank": 1, "path": str(probe), "score": pytest.approx(1.0, abs=1e-6), "row": row}
    expected = stored.search(stored.stored_embedding(probe), 3)
    assert [r["path"] for r in result["results"]] == [h.path for h in expected]
    # A changed file is not the indexed one: the model is needed, and its absence is reported.
    os.utime(probe, ns=(1, file_stamp(probe)[1] + 10**9))
    assert stored.stored_embedding(probe) is None
    assert search_main(["query", "--index", str(out), "--image", str(probe)]) == 2
    assert "cannot load the model" in capsys.readouterr().err
    moved.rename(model_copy)
    assert search_main(["query", "--index", str(out), "--image", str(probe), "--top-k", "1", "--json"]) == 0
    result = last_json(capsys.readouterr().out)
    assert result["model_loaded"] and result["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_grid_writes_a_contact_sheet_of_the_expected_size(lit_folder, photos, tmp_path, capsys):
    out, grid = tmp_path / "index", tmp_path / "sheet" / "hits.png"
    assert mlx_aim_main(["search", "index", "--model", str(lit_folder), "--out", str(out), str(photos),
                         "--no-progress"]) == 0
    assert mlx_aim_main(["search", "query", "--index", str(out), "a disc", "--top-k", "7", "--grid",
                         str(grid)]) == 0
    assert f"contact sheet: {grid}" in capsys.readouterr().out
    with Image.open(grid) as sheet:
        assert sheet.format == "PNG" and sheet.mode == "RGB"
        assert sheet.size == contact_sheet_size(7, title=True) == (5 * 164 + 4, 24 + 4 + 2 * (160 + 30 + 4))
        assert len(set(map(tuple, np.asarray(sheet).reshape(-1, 3)[::97].tolist()))) > 20  # thumbnails, not blank


def test_a_different_model_is_refused_naming_both(lit_folder, lit, photos, tmp_path, capsys):
    model, _ = lit
    # The index holds image embeddings: the image side identifies the model, loaded whole or not.
    assert model_identity(load(lit_folder, text_tower=False), "x") == model_identity(model, "x")
    out = tmp_path / "index"
    index(model, photos, out)
    other_folder = write_tiny_lit(tmp_path / "other-lit", seed=1)  # same config, other weights
    other, _ = open_lit(other_folder)
    with pytest.raises(ValueError, match=r"built with tiny-lit, and other differs from it in image_weights_sha256"):
        build_index(other, [photos], out, model_name="other", progress=False)
    with pytest.raises(ValueError, match="model_dtype"):
        build_index(open_lit(lit_folder, dtype="bfloat16")[0], [photos], out, model_name="bf16", progress=False)
    assert search_main(["query", "--index", str(out), "--model", str(other_folder), "a disc"]) == 2
    err = capsys.readouterr().err
    assert "built with tiny-lit" in err and str(other_folder) in err
    assert search_main(["index", "--out", str(tmp_path / "new"), str(photos)]) == 2
    assert "--model: required" in capsys.readouterr().err


def test_unreadable_files_are_listed_and_not_retried_until_they_change(lit, photos, tmp_path, monkeypatch):
    model, _ = lit
    (photos / "notes.jpg").write_text("not a JPEG")
    data = (photos / "04.jpg").read_bytes()
    (photos / "trip" / "cut.jpg").write_bytes(data[: len(data) // 3])
    out = tmp_path / "index"
    first = index(model, photos, out, shard_size=4)
    bad = {os.path.abspath(photos / "notes.jpg"), os.path.abspath(photos / "trip" / "cut.jpg")}
    assert {p for p, _ in first.skipped.items} == bad and first.index["num_rows"] == NUM_PHOTOS
    assert {item["path"] for item in first.index["skipped"]} == bad
    assert all(item["reason"] and item["size"] > 0 for item in first.index["skipped"])
    seen = counting_embeds(monkeypatch)
    calls = []
    monkeypatch.setattr(encode, "iter_image_batches", lambda paths, *a, **k: calls.append(paths) or iter(()))
    again = index(model, photos, out, shard_size=4)
    assert (calls, seen, {p for p, _ in again.skipped.items}) == ([], [], bad)  # not read again
    monkeypatch.undo()
    write_photo(photos / "notes.jpg", 30)  # fixed: a real image now
    third = index(model, photos, out, shard_size=4)
    assert third.num_embedded == 1 and {p for p, _ in third.skipped.items} == bad - {str(photos / "notes.jpg")}
    assert third.index["num_rows"] == NUM_PHOTOS + 1


def test_float16_storage_and_the_script(lit_folder, lit, photos, tmp_path):
    out = tmp_path / "index"
    summary = last_json(run_script("scripts/search.py", "index", "--model", lit_folder, "--out", out, photos,
                                   "--save-dtype", "float16", "--json", "--no-progress").stdout)
    assert summary["num_images"] == NUM_PHOTOS
    assert np.load(next(out.glob("shard-*.embedding.npy"))).dtype == np.float16
    result = run_script("scripts/search.py", "query", "--index", out, "a disc", "--top-k", "100", "--json")
    got = {r["path"]: r["score"] for r in last_json(result.stdout)["results"]}
    paths = listed(photos)
    np.testing.assert_allclose([got[p] for p in paths], brute_force(*lit, paths, "a disc"), atol=2e-3)
    result = run_script("scripts/search.py", "index", "--out", out, photos, "--save-dtype", "float32", check_rc=2)
    assert "stores float16 embeddings, not float32" in result.stderr
    usage = run_script("scripts/search.py", "query", "--index", out, check_rc=2)
    assert "give a text or --image FILE" in usage.stderr
    assert json.loads((out / "index.json").read_text())["dtype"] == "float16"
