"""Writing files and folders so that a reader never sees half of one: build under a temporary name in the
same folder, then rename over the final name (a rename within a file system is atomic).

Temporary names are `.NAME.tmp-...` (a file keeps NAME's suffix after it: MLX's and numpy's save functions
pick the format from it). Replacing a folder first renames the old one aside to `.NAME.old-...`, so a kill
at any moment leaves the old or the new one in place; `remove_stale_temporaries` clears what a kill left.

    with atomic_file(folder / "head.safetensors") as tmp:
        mx.save_safetensors(str(tmp), weights)
    with atomic_directory(out / "checkpoint", replace=True) as tmp:
        write_json(tmp / "state.json", state)

Reading a model folder, whose every file is untrusted: `confined` resolves a file name against the folder and
refuses one that leaves it; `read_json` (`read_json_object`, `read_text`) turns any failure to decode a file (too
large, not UTF-8, not JSON, nested past what the parser follows) into a ValueError naming the file.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]

# The most a model folder's config, preprocessor settings or weight index may hold: real ones are kilobytes (an
# index of a 7B model's shards well under one MiB), so this refuses a flood before it is read, not an honest file.
MAX_CONFIG_BYTES = 16 * 1024**2
# huggingface_hub's cache: a snapshot folder's files are symlinks into the repo's blobs/ (`confined`).
_HUB_SNAPSHOT = "snapshots"
_HUB_REPO_PREFIX = "models--"


def temporary_glob(name: str) -> str:
    """The glob that matches the temporaries of a file or folder named `name` (itself a glob or a name)."""
    return f".{name}.tmp-*"


@contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `path`, with the same suffix, for the caller to write; renames it
    over `path` when the block ends normally, deletes it when the block raises. The folder must exist."""
    path = Path(path)
    # Unique per process and call; not created here, so the writer creates it with the usual permissions.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: PathLike, text: str) -> None:
    """Writes `text` to `path` atomically (`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: PathLike, obj: Any, *, indent: int = 2, default=None) -> None:
    """Writes `obj` as JSON (with a final newline) to `path` atomically; `default` as in `json.dumps`."""
    write_text(path, json.dumps(obj, indent=indent, default=default) + "\n")


def read_text(path: PathLike, max_bytes: Optional[int] = None) -> str:
    """The UTF-8 text in `path`. A missing file raises FileNotFoundError; one past `max_bytes` (None: no limit,
    for the library's own files) or not UTF-8 raises ValueError; both name the file. At most `max_bytes` + 1 bytes
    are read, whatever the file is."""
    try:
        with open(path, "rb") as f:
            raw = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
    if max_bytes is not None and len(raw) > max_bytes:
        raise ValueError(f"{path}: larger than {max_bytes} bytes, the most a file of its kind may hold")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def parse_json(text: str, where: str) -> Any:
    """`json.loads(text)`; any failure (invalid JSON, nesting too deep for the parser, an integer past Python's
    digit limit) raises ValueError naming `where`."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # json.JSONDecodeError, and int()'s digit limit
        raise ValueError(f"{where}: not valid JSON ({e})") from None


def read_json(path: PathLike, max_bytes: Optional[int] = None) -> Any:
    """The JSON in `path` (`read_text`, `parse_json`): a missing file raises FileNotFoundError, any other failure
    to read it as JSON ValueError; both name the file."""
    return parse_json(read_text(path, max_bytes), str(path))


def read_json_object(path: PathLike, max_bytes: Optional[int] = MAX_CONFIG_BYTES) -> dict:
    """`read_json` of a file that must hold a JSON object (a config): anything else raises ValueError naming it."""
    value = read_json(path, max_bytes)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def confined(folder: PathLike, name: Any, where: Optional[str] = None) -> Path:
    """`folder / name`, for a file name that a model folder's file gives (a shard in an index) or that the loader
    looks for there, once it is known to stay in the folder: a name that is not a string, holds a NUL, is absolute,
    or resolves (symlinks followed) outside the folder raises ValueError naming `where` (the file and entry that
    gave the name; default: the folder) and the name. The file need not exist.

    A folder in huggingface_hub's cache (`.../models--OWNER--NAME/snapshots/REVISION`) holds symlinks into the
    repo's `blobs/`: its bound is the repo's cache folder, `models--OWNER--NAME`."""
    folder = Path(folder)
    where = where or str(folder)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: {name!r}: expected the name of a file in {folder}")
    if "\0" in name:
        reason = "holds a NUL byte"
    elif os.path.isabs(name):
        reason = "is an absolute path"
    else:
        root = Path(os.path.realpath(folder))
        if root.parent.name == _HUB_SNAPSHOT and root.parent.parent.name.startswith(_HUB_REPO_PREFIX):
            root = root.parent.parent
        resolved = Path(os.path.realpath(folder / name))
        if resolved.is_relative_to(root):
            return folder / name
        reason = f"resolves to {resolved}, outside {root}"
    raise ValueError(f"{where}: {name!r} {reason}: expected a file inside the model folder {folder}")


@contextmanager
def atomic_directory(final: PathLike, replace: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary folder next to `final` for the caller to fill; renames it to `final` when
    the block ends normally, deletes it when the block raises.

    An existing `final` raises FileExistsError (on entry, before any work, and again before the rename),
    unless `replace`: then the old folder is renamed aside, the new one renamed in, and the old one deleted.
    The parent folder must exist.
    """
    final = Path(final)
    if final.exists() and not replace:
        raise FileExistsError(f"{final} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private to the user; the finished folder is not
        if not final.exists():
            os.replace(tmp, final)
            return
        if not replace:
            raise FileExistsError(f"{final} appeared while it was being written")
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(old, final)  # the rename failed: the old folder goes back
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(folder: PathLike, name: str = "*") -> None:
    """Clears what killed atomic writes of `name` (a name or a glob) left in `folder`.

    Temporaries (`.NAME.tmp-*`) are deleted. A folder set aside for replacement (`.NAME.old-*`) is deleted
    when NAME is in place, and renamed back to NAME when the kill came between the two renames.
    """
    folder = Path(folder)
    for stale in folder.glob(temporary_glob(name)):
        _remove(stale)
    for stale in folder.glob(f".{name}.old-*"):
        final = folder / stale.name[1:].rpartition(".old-")[0]
        if final.exists():
            _remove(stale)
        else:
            os.replace(stale, final)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

