"""The atomic writers: a finished write renames into place, a failed one leaves the old file or folder as it
was and no temporary behind; folders are replaced only when asked; temporaries keep the final suffix."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
from mlx_aim.fileio import (
    atomic_directory, atomic_file, read_json, remove_stale_temporaries, temporary_glob, write_json, write_text,
)


class Boom(Exception):
    pass


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_file_renames_on_success_and_keeps_the_suffix(tmp_path):
    target = tmp_path / "weights.safetensors"
    with atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".safetensors"
        assert tmp.name.startswith(".weights.safetensors.tmp-")
        assert tmp.match(temporary_glob("weights.safetensors"))
        assert not target.exists()
        mx.save_safetensors(str(tmp), {"a": mx.arange(3)})  # MLX would refuse another suffix
    assert names(tmp_path) == ["weights.safetensors"]
    assert mx.load(str(target))["a"].tolist() == [0, 1, 2]

    with atomic_file(tmp_path / "x.npy") as tmp:
        np.save(tmp, np.ones(2))  # numpy appends .npy to a name without it
    assert names(tmp_path) == ["weights.safetensors", "x.npy"]


def test_atomic_file_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("old")
    with pytest.raises(Boom):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise Boom
    assert target.read_text() == "old"
    assert names(tmp_path) == ["notes.txt"]
    with pytest.raises(Boom):  # failing before anything was written
        with atomic_file(tmp_path / "new.txt"):
            raise Boom
    assert names(tmp_path) == ["notes.txt"]


def test_write_text_and_write_json_replace_the_file(tmp_path):
    path = tmp_path / "state.json"
    write_text(path, "stale")
    write_json(path, {"step": 3, "path": tmp_path}, indent=1, default=str)
    assert path.read_text() == json.dumps({"step": 3, "path": str(tmp_path)}, indent=1) + "\n"
    write_json(path, [1, 2])
    assert json.loads(path.read_text()) == [1, 2]
    with pytest.raises(TypeError):  # not serialisable: the previous file stays
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == [1, 2]
    assert names(tmp_path) == ["state.json"]


def test_atomic_directory_creates_then_refuses_an_existing_folder(tmp_path):
    final = tmp_path / "model"
    with atomic_directory(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.tmp-") and not final.exists()
        (tmp / "a.txt").write_text("1")
    assert names(tmp_path) == ["model"] and names(final) == ["a.txt"]
    assert os.stat(final).st_mode & 0o777 == 0o755
    with pytest.raises(FileExistsError, match="model"):
        with atomic_directory(final):
            pytest.fail("the block runs although the folder exists")
    assert names(tmp_path) == ["model"] and (final / "a.txt").read_text() == "1"


def test_atomic_directory_refuses_a_folder_that_appears_meanwhile(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(FileExistsError, match="appeared"):
        with atomic_directory(final) as tmp:
            (tmp / "new.txt").write_text("new")
            final.mkdir()  # an empty folder: a plain rename would silently replace it
    assert names(tmp_path) == ["out"] and names(final) == []


def test_atomic_directory_replaces_only_when_asked_and_keeps_the_old_on_failure(tmp_path):
    final = tmp_path / "checkpoint"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(Boom):
        with atomic_directory(final, replace=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise Boom
    assert names(tmp_path) == ["checkpoint"] and names(final) == ["old.txt"]
    with atomic_directory(final, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert names(tmp_path) == ["checkpoint"] and names(final) == ["new.txt"]


def test_remove_stale_temporaries_deletes_leftovers_and_restores_a_folder_set_aside(tmp_path):
    (tmp_path / ".model.tmp-123").mkdir()
    (tmp_path / ".index.json.tmp-9-ab.json").write_text("{")
    (tmp_path / ".keep.txt").write_text("not a temporary")
    # Killed between the two renames of a replacement: only the folder set aside holds the checkpoint.
    (tmp_path / ".checkpoint.old-7-cd").mkdir()
    (tmp_path / ".checkpoint.old-7-cd" / "state.json").write_text("{}")
    # A replacement that completed but was killed before deleting the old one.
    (tmp_path / "step_2").mkdir()
    (tmp_path / ".step_2.old-8-ef").mkdir()
    remove_stale_temporaries(tmp_path, "model")
    assert names(tmp_path) == sorted([".checkpoint.old-7-cd", ".index.json.tmp-9-ab.json", ".keep.txt",
                                      ".step_2.old-8-ef", "step_2"])  # only model's temporaries went
    remove_stale_temporaries(tmp_path)
    assert names(tmp_path) == [".keep.txt", "checkpoint", "step_2"]
    assert (tmp_path / "checkpoint" / "state.json").read_text() == "{}"


def test_read_json_names_the_file_when_missing_or_invalid(tmp_path):
    path = tmp_path / "state.json"
    with pytest.raises(FileNotFoundError, match="state.json: missing"):
        read_json(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="state.json: not valid JSON"):
        read_json(path)
    write_json(path, {"a": [1]})
    assert read_json(path) == {"a": [1]}
