"""Indexing for photo search (mlx_aim.tasks.search, `mlx-aim search index` and `dupes`) on a tiny random-weight LiT:
hidden and excluded folders, moved, renamed, copied and touched files found by content without a model call, exact
duplicates, indexes written before fingerprints, one writer at a time (a real second process, killed), and
near-duplicate groups against a brute-force cosine."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from conftest import ROOT, last_json
from mlx_aim.cli.search import main as search_main
from mlx_aim.data import WalkRules, list_images
from mlx_aim.tasks import search
from mlx_aim.tasks.dupes import connected_components, index_rows, near_duplicates, similar_pairs
from mlx_aim.tasks.search import IndexBusy, SearchIndex, build_index, content_fingerprint, file_stamp
from mlx_aim.tasks.visualize import contact_sheet_size
from test_search import NUM_PHOTOS, counting_embeds, index, listed, photos, write_photo  # noqa: F401 (fixture)


def rows_by_path(out) -> dict:
    rows, paths = index_rows(SearchIndex.open(out))
    return dict(zip(paths, rows))


def assert_same_index(out, clean):
    """`out` holds the rows a clean build `clean` holds: the same paths, embeddings equal to float32 rounding."""
    got, expected = rows_by_path(out), rows_by_path(clean)
    assert sorted(got) == sorted(expected)
    for path in expected:
        np.testing.assert_allclose(got[path], expected[path], atol=2e-6, err_msg=path)


# ---------------------------------------------------------------------------------------------------
# What is walked


def test_walk_rules_skip_hidden_names_and_excluded_folders(tmp_path, monkeypatch):
    for rel in ["a.png", ".hidden.png", "._a.png", ".cache/b.png", "x/@eaDir/c.png", "@eaDir/d.png", "raw/e.png",
                "x/raw/f.png"]:
        write_photo(tmp_path / "p" / rel, 0, size=16)
    root = tmp_path / "p"

    def found(**rules):
        return sorted(p.relative_to(root).as_posix() for p in list_images(root, rules=WalkRules(**rules)))

    assert found() == ["@eaDir/d.png", "a.png", "raw/e.png", "x/@eaDir/c.png", "x/raw/f.png"]
    # A bare name leaves out every folder of that name; a path (with a "/") that one folder only.
    monkeypatch.chdir(root)
    assert found(exclude_dirs=("@eaDir", "./raw")) == ["a.png", "x/raw/f.png"]
    assert WalkRules(("./raw", "@eaDir")).exclude_dirs == (str(root / "raw"), "@eaDir")  # as an index records it
    # Hidden names on request; macOS's "._" metadata files never.
    assert found(include_hidden=True, exclude_dirs=("raw", "x")) == [".cache/b.png", ".hidden.png", "@eaDir/d.png",
                                                                     "a.png"]
    assert [p.name for p in list_images(root / ".hidden.png")] == [".hidden.png"]  # a file named is taken
    for bad in ("", "..", "a/."):
        with pytest.raises(ValueError, match="not a folder name or path"):
            WalkRules((bad,))
    with pytest.raises(TypeError, match="not one string"):
        WalkRules("raw")


def test_exclusions_and_hidden_files_are_recorded_for_a_bare_rerun(lit_folder, photos, tmp_path, capsys):
    write_photo(photos / ".hidden" / "h.png", 11)
    write_photo(photos / "trip" / "@eaDir" / "thumb.png", 12)
    write_photo(photos / "raw" / "r.png", 13)
    out = tmp_path / "index"

    def run(*args):
        assert search_main(["index", "--out", str(out), "--json", "--no-progress", *map(str, args)]) == 0
        summary = last_json(capsys.readouterr().out)
        return summary, sorted(Path(p).relative_to(photos).as_posix() for p in rows_by_path(out))

    summary, paths = run("--model", lit_folder, photos, "--exclude-dir", "@eaDir", "--exclude-dir", photos / "raw")
    assert len(paths) == NUM_PHOTOS and not any("@eaDir" in p or "raw" in p or "hidden" in p for p in paths)
    assert (summary["exclude_dirs"], summary["include_hidden"]) == (["@eaDir", str(photos / "raw")], False)
    summary, again = run()  # no PHOTOS: the recorded inputs and walk
    assert (again, summary["num_embedded"], summary["num_dropped"]) == (paths, 0, 0)
    summary, hidden = run("--include-hidden")  # options still apply to the recorded inputs
    assert sorted(set(hidden) - set(paths)) == [".hidden/h.png"] and summary["exclude_dirs"] == ["@eaDir",
                                                                                                 str(photos / "raw")]
    summary, fresh = run(photos)  # PHOTOS given: the defaults again
    assert sorted(set(fresh) - set(paths)) == ["raw/r.png", "trip/@eaDir/thumb.png"]
    assert (summary["exclude_dirs"], summary["include_hidden"], summary["num_dropped"]) == ([], False, 1)


# ---------------------------------------------------------------------------------------------------
# Moved, renamed, copied files and exact duplicates


def test_moved_renamed_copied_and_touched_photos_keep_their_rows_without_a_model_call(lit, photos, tmp_path,
                                                                                      monkeypatch):
    model, _ = lit
    out = tmp_path / "index"
    first = index(model, photos, out, shard_size=4, batch_size=4)
    assert first.duplicates == [] and first.num_by_content == 0
    shards = first.index["shards"]
    assert all(f == content_fingerprint(p) for s in shards for p, f in zip(s["paths"], s["fingerprints"]))
    before = rows_by_path(out)
    (photos / "trip").rename(photos / "trip-2024")  # a moved folder: 3 photos
    (photos / "01.png").rename(photos / "renamed.png")
    shutil.copy2(photos / "02.png", photos / "copy-of-02.png")
    touched = photos / "04.jpg"
    os.utime(touched, ns=(1, file_stamp(touched)[1] + 10**9))  # a new stamp, the same bytes
    seen = counting_embeds(monkeypatch)
    again = index(model, photos, out, shard_size=4, batch_size=4)
    assert seen == [] and again.num_embedded == 0
    assert (again.num_by_content, again.num_dropped, again.index["num_rows"]) == (6, 5, NUM_PHOTOS + 1)
    assert again.duplicates == [sorted([str(photos / "02.png"), str(photos / "copy-of-02.png")])]
    after = rows_by_path(out)
    for old, new in [(photos / "trip" / "03.png", photos / "trip-2024" / "03.png"),
                     (photos / "01.png", photos / "renamed.png"), (photos / "02.png", photos / "copy-of-02.png"),
                     (touched, touched)]:
        np.testing.assert_array_equal(after[str(new)], before[str(old)])
    assert_same_index(out, index(model, photos, tmp_path / "clean").out)
    # An edited photo is new content: embedded. Two equal new files: embedded once, the second copies the row.
    write_photo(photos / "renamed.png", 40)
    os.utime(photos / "renamed.png", ns=(1, file_stamp(photos / "renamed.png")[1] + 10**9))
    write_photo(photos / "new-a.png", 41)
    shutil.copy(photos / "new-a.png", photos / "new-b.png")
    seen.clear()  # the clean build above embedded its own
    third = index(model, photos, out, shard_size=4, batch_size=4)
    assert (sum(seen), third.num_embedded, third.num_by_content) == (2, 2, 1)
    assert len(third.duplicates) == 2 and third.to_dict()["num_duplicate_copies"] == 2
    shutil.rmtree(tmp_path / "clean")
    assert_same_index(out, index(model, photos, tmp_path / "clean").out)


def test_a_run_interrupted_while_copying_rows_by_content_resumes_without_the_model(lit, photos, tmp_path,
                                                                                    monkeypatch):
    model, _ = lit
    out = tmp_path / "index"
    index(model, photos, out, shard_size=2, batch_size=2)
    for path in sorted(photos.rglob("*.*")):
        path.rename(path.with_name("moved-" + path.name))
    real, calls = search.IndexFolder.copy_rows, []

    def dies_on_the_third_copy(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a user's Ctrl-C, between two finished shards
        return real(self, *args, **kwargs)

    monkeypatch.setattr(search.IndexFolder, "copy_rows", dies_on_the_third_copy)
    seen = counting_embeds(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        index(model, photos, out, shard_size=2, batch_size=2)
    monkeypatch.setattr(search.IndexFolder, "copy_rows", real)
    resumed = index(model, photos, out, shard_size=2, batch_size=2)
    assert (seen, resumed.num_embedded, resumed.num_reused, resumed.num_by_content) == ([], 0, 4, NUM_PHOTOS - 4)
    assert_same_index(out, index(model, photos, tmp_path / "clean").out)


def test_cli_reports_moves_and_exact_duplicates(lit_folder, photos, tmp_path, capsys):
    out = tmp_path / "index"
    assert search_main(["index", "--model", str(lit_folder), "--out", str(out), str(photos), "--no-progress"]) == 0
    assert "exact duplicates: 0 extra copies in 0 group(s)\n" in capsys.readouterr().out
    shutil.copy(photos / "05.png", photos / "trip" / "05-copy.png")
    shutil.copy(photos / "05.png", photos / "05-copy.png")
    (photos / "07.png").rename(photos / "07-moved.png")
    assert search_main(["index", "--out", str(out), "--no-progress", "--json"]) == 0
    text = capsys.readouterr().out
    assert "3 moved, renamed or copied photo(s) found by content: no model call" in text
    assert "exact duplicates: 2 extra copies in 1 group(s) (--json lists them)" in text
    summary = last_json(text)
    assert (summary["num_embedded"], summary["num_by_content"], summary["num_duplicate_groups"]) == (0, 3, 1)
    assert summary["duplicates"] == [sorted(str(p) for p in (photos / "05.png", photos / "05-copy.png",
                                                             photos / "trip" / "05-copy.png"))]


def test_an_index_written_before_fingerprints_opens_and_updates(lit, photos, tmp_path, monkeypatch):
    model, _ = lit
    out = tmp_path / "index"
    index(model, photos, out, shard_size=4)
    for path in [*out.glob("shard-*.json"), out / "index.json"]:  # as the earlier writer left them
        record = json.loads(path.read_text())
        for shard in record.get("shards", [record]):
            del shard["fingerprints"]
        path.write_text(json.dumps(record))
    seen = counting_embeds(monkeypatch)
    again = index(model, photos, out, shard_size=4)
    assert (seen, again.num_reused, again.duplicates) == ([], NUM_PHOTOS, [])
    assert all("fingerprints" not in s for s in again.index["shards"])  # kept as they are: unknown, never hashed
    # Rows without a fingerprint are never matched by content: a moved old photo is embedded once more, and has
    # one from then on; the shard that lost it is carried over with unknown (None) fingerprints.
    (photos / "02.png").rename(photos / "02-moved.png")
    third = index(model, photos, out, shard_size=4)
    assert (sum(seen), third.num_embedded, third.num_by_content) == (1, 1, 0)
    fingerprints = {p: f for s in third.index["shards"] for p, f in zip(s["paths"], s.get("fingerprints") or [])}
    assert fingerprints[str(photos / "02-moved.png")] == content_fingerprint(photos / "02-moved.png")
    assert None in fingerprints.values()
    assert_same_index(out, index(model, photos, tmp_path / "clean").out)


# ---------------------------------------------------------------------------------------------------
# One writer at a time

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mlx_aim.tasks.search import WriterLock
    folder, hold = Path(sys.argv[1]), float(sys.argv[2])
    lock = WriterLock(folder)
    print("locked", flush=True)
    time.sleep(hold)
    (folder.parent / "holder-done").write_text("done")  # then exits, which releases the lock
""")


def start_holder(folder, hold: float) -> subprocess.Popen:
    """A real second process holding `folder`'s writer lock for `hold` seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(hold)], stdout=subprocess.PIPE,
                             text=True, env=env)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_second_writer_stops_naming_the_first_and_a_killed_writer_leaves_no_lock(lit_folder, lit, photos,
                                                                                    tmp_path, capsys):
    model, _ = lit
    out = tmp_path / "index"
    index(model, photos, out)
    holder = start_holder(out, hold=600)
    try:
        with pytest.raises(IndexBusy, match=rf"another indexer \(pid {holder.pid}\) is updating this index"):
            index(model, photos, out)
        assert search_main(["index", "--model", str(lit_folder), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert str(out) in err and f"pid {holder.pid}" in err and "--wait" in err
    finally:
        holder.send_signal(signal.SIGKILL)  # killed mid-hold: the kernel drops its lock
        holder.wait()
    assert not (tmp_path / "holder-done").exists()
    assert index(model, photos, out).index["num_rows"] == NUM_PHOTOS
    assert (out / "writer.lock").read_text().strip() == str(os.getpid())


def test_wait_starts_after_the_other_writer(lit, photos, tmp_path):
    model, _ = lit
    out = tmp_path / "index"
    out.mkdir()
    holder = start_holder(out, hold=1.0)
    try:
        result = index(model, photos, out, wait=True)
    finally:
        holder.wait()
    assert (tmp_path / "holder-done").exists()  # written by the holder just before it let go
    assert result.num_embedded == NUM_PHOTOS and len(SearchIndex.open(out)) == NUM_PHOTOS


def test_the_lock_file_is_not_made_in_a_folder_that_is_no_index(lit, photos, tmp_path):
    with pytest.raises(ValueError, match="is not a search index"):
        index(lit[0], photos, photos)
    assert not (photos / "writer.lock").exists()


# ---------------------------------------------------------------------------------------------------
# Near-duplicates


def test_blockwise_pairs_and_components_equal_a_brute_force():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((37, 8)).astype(np.float32)
    rows[[5, 17, 30]] = rows[3] + 0.05 * rng.standard_normal((3, 8))  # one cluster of 4
    rows[21] = rows[20] + 0.05 * rng.standard_normal(8)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    full = rows @ rows.T
    expected = {(i, j) for i in range(37) for j in range(i + 1, 37) if full[i, j] >= 0.95}
    for block in (4, 7, 64):
        i, j, s = similar_pairs(rows, 0.95, block)
        assert set(zip(i.tolist(), j.tolist())) == expected and len(i) == len(expected)
        np.testing.assert_allclose(s, full[i, j], atol=1e-6)
    labels = connected_components(6, np.array([4, 1, 3]), np.array([5, 2, 5]))  # 1-2, 3-5-4, 0 alone
    assert labels.tolist() == [0, 1, 1, 3, 3, 3]
    with pytest.raises(ValueError, match="links per photo"):
        similar_pairs(np.ones((200, 4), np.float32) / 2, 0.5)


@pytest.fixture
def near_dupes(lit, photos, tmp_path):
    """The photos plus a JPEG re-save and a brightened copy of 02.png, indexed."""
    original = Image.open(photos / "02.png").convert("RGB")
    original.save(photos / "02-resaved.jpg", quality=90)
    ImageEnhance.Brightness(original).enhance(1.08).save(photos / "02-bright.png")
    return index(lit[0], photos, tmp_path / "index").out


def test_dupes_groups_a_resave_and_an_edit_with_their_original(near_dupes, photos, tmp_path, capsys):
    groups = near_duplicates(SearchIndex.open(near_dupes), 0.97)
    assert [g.paths for g in groups] == [sorted(str(photos / n) for n in ("02.png", "02-resaved.jpg",
                                                                          "02-bright.png"))]
    rows = rows_by_path(near_dupes)
    members = groups[0].paths
    links = [float(rows[a] @ rows[b]) for a in members for b in members if a < b]
    assert groups[0].min_score == pytest.approx(min(links), abs=1e-5) and min(links) >= 0.97
    assert all(score >= 0.97 for score in groups[0].scores)
    # Every other pair is below the threshold: the brute force agrees there is one group.
    paths = sorted(rows)
    linked = {p for a in paths for b in paths if a < b and rows[a] @ rows[b] >= 0.97 for p in (a, b)}
    assert linked == set(members)

    grid = tmp_path / "sheets"
    assert search_main(["dupes", "--index", str(near_dupes), "--grid", str(grid), "--json"]) == 0
    text = capsys.readouterr().out
    assert "1 group(s) of near-duplicates (cosine >= 0.97)" in text
    result = last_json(text)
    assert [g["paths"] for g in result["groups"]] == [members] and result["grids"] == [str(grid / "group-0001.png")]
    with Image.open(grid / "group-0001.png") as sheet:
        assert sheet.size == contact_sheet_size(3, title=True)
    with pytest.raises(SystemExit) as usage:
        search_main(["dupes", "--index", str(near_dupes), "--threshold", "1.5"])
    assert usage.value.code == 2 and "1.5: expected a cosine similarity in (0, 1]" in capsys.readouterr().err
    with pytest.raises(ValueError, match="threshold=0"):
        near_duplicates(SearchIndex.open(near_dupes), 0)
