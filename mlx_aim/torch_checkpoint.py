"""Read PyTorch checkpoints (`torch.save`) without PyTorch and without trusting pickle.

Apple ships AIM as `torch.save` pickles. Unpickling runs whatever the file names, so this reader
unpickles with an allow-list of the few globals a tensor state dict needs, stands in its own inert
objects for them, and refuses everything else (`UnsafeCheckpointError`). Tensors are then read one
at a time straight from the file at their storage's offset (memory-mapped), so a 26 GB checkpoint
converts in bounded memory.

Two layouts are understood:
- the zip archive `torch.save` writes since PyTorch 1.6: `<top>/data.pkl` (the pickle),
  `<top>/data/<storage key>` (raw storages, stored uncompressed), `<top>/byteorder`, `<top>/version`;
  the top folder's name varies and is never assumed;
- the legacy stream (`_use_new_zipfile_serialization=False`): five pickles (magic number, protocol
  version, sys info, the object, the list of storage keys), then each storage as a little-endian
  int64 element count followed by its raw little-endian bytes.

Which tensors a file holds (`keys()`): nested dicts (and lists) are flattened into dotted names,
like `nn.Module.state_dict()` names. A training checkpoint that wraps the state dict, such as
`{"model": {...}, "epoch": 3}` or `{"state_dict": {...}}`, is unwrapped: when the top level holds no
tensor itself and exactly one of its values is a dict holding tensors, names are taken relative to
that dict (`TorchCheckpoint.root_key` says which). Otherwise every tensor keeps its full dotted name.
Plain non-tensor values (numbers, strings, None) are skipped.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import reprlib
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

import mlx.core as mx
import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

# The legacy stream opens with these two pickled values (torch/serialization.py).
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
# Longest text line a legacy pickle may ask for (GLOBAL names, INT text): a corrupt or hostile file
# must not make readline() pull gigabytes into memory.
_MAX_PICKLE_LINE = 1 << 20
# Deeper nesting than this is no state dict (and could be a reference cycle).
_MAX_NESTING = 64


class CheckpointError(ValueError):
    """The file is not a readable PyTorch tensor checkpoint (the message names the file and key)."""


class UnsafeCheckpointError(CheckpointError):
    """The file asks for something a tensor state dict never needs (code execution, odd archives)."""


@dataclass(frozen=True)
class _DType:
    name: str  # PyTorch's name, which `TorchCheckpoint.dtype` returns
    itemsize: int
    numpy: Optional[str]  # little-endian numpy type the raw bytes are read as (None: can't read)
    mlx: Optional[mx.Dtype]  # what `read` returns (None: MLX has no such dtype)


_DTYPES = {
    d.name: d
    for d in (
        _DType("float32", 4, "<f4", mx.float32),
        _DType("float16", 2, "<f2", mx.float16),
        # numpy has no bfloat16: read the bits as uint16 and reinterpret them in MLX.
        _DType("bfloat16", 2, "<u2", mx.bfloat16),
        # mx.array() turns float64 into float32 unless asked; keep it exact (MLX: CPU stream only).
        _DType("float64", 8, "<f8", mx.float64),
        _DType("int64", 8, "<i8", mx.int64),
        _DType("int32", 4, "<i4", mx.int32),
        _DType("int16", 2, "<i2", mx.int16),
        _DType("int8", 1, "<i1", mx.int8),
        _DType("uint64", 8, "<u8", mx.uint64),
        _DType("uint32", 4, "<u4", mx.uint32),
        _DType("uint16", 2, "<u2", mx.uint16),
        _DType("uint8", 1, "<u1", mx.uint8),
        _DType("bool", 1, "?", mx.bool_),
        _DType("complex64", 8, "<c8", mx.complex64),
        # Known to PyTorch, listed so that their keys can be inspected; `read` refuses them.
        _DType("complex128", 16, None, None),
        _DType("float8_e4m3fn", 1, None, None),
        _DType("float8_e5m2", 1, None, None),
    )
}

# The legacy typed storage classes `torch.save` still names for the classic dtypes (checked with 2.13).
_STORAGE_CLASS_DTYPES = {
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}


class _RecordError(Exception):
    """A tensor or storage record in the pickle is malformed (wrapped into CheckpointError)."""


class _Inert:
    """Base of the stand-ins below: pickle's BUILD opcode calls `__setstate__`, which refuses, so a
    record cannot be changed after it was validated (frozen dataclasses alone would not stop it)."""

    def __setstate__(self, state):
        raise _RecordError(f"the pickle tries to modify a {type(self).__name__.lstrip('_')}")


# Inert stand-ins for the torch objects the allow-listed globals name: not callable, so REDUCE on
# them fails; frozen and `_Inert`, so nothing changes them once made.
@dataclass(frozen=True)
class _StorageType(_Inert):
    """Stands in for `torch.FloatStorage` & co, and for `torch.storage.UntypedStorage` (bytes)."""

    dtype: str


@dataclass(frozen=True)
class _TorchDtype(_Inert):
    """Stands in for `torch.float32` & co, which `_rebuild_tensor_v3` receives."""

    name: str


@dataclass(frozen=True)
class _StorageRef(_Inert):
    """A storage as the pickle's persistent id describes it; its bytes are located separately."""

    key: str
    dtype: str
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class _TensorRef(_Inert):
    """A tensor as `_rebuild_tensor_v2/v3` describes it: a strided view into a storage."""

    storage: _StorageRef
    offset: int  # in elements of `dtype`
    shape: tuple
    stride: tuple
    dtype: str
    negative: bool = False  # PyTorch's lazy "neg" bit: the values are minus the stored ones
    conjugate: bool = False  # PyTorch's lazy "conj" bit (complex tensors)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def span(self) -> int:
        """Elements from the first to one past the last element this view touches."""
        return 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))


def _short(value) -> str:
    """repr() of an untrusted value, cut short so a hostile file cannot flood the error message."""
    return reprlib.repr(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_tuple(value, what: str) -> tuple:
    if not isinstance(value, (tuple, list)) or not all(_is_int(v) and v >= 0 for v in value):
        raise _RecordError(f"{what} must be a tuple of non-negative integers, got {_short(value)}")
    return tuple(value)


def _tensor_ref(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata, dtype):
    """Validate `_rebuild_tensor_v2/v3`'s arguments (all of them came from the untrusted pickle)."""
    if not isinstance(storage, _StorageRef):
        raise _RecordError(f"tensor storage must be a storage record, got {type(storage).__name__}")
    if not _is_int(storage_offset) or storage_offset < 0:
        raise _RecordError(f"storage offset must be a non-negative int, got {_short(storage_offset)}")
    shape = _int_tuple(size, "tensor size")
    strides = _int_tuple(stride, "tensor stride")
    if len(shape) != len(strides):
        raise _RecordError(f"tensor size {shape} and stride {strides} differ in length")
    if not isinstance(requires_grad, bool):
        raise _RecordError(f"requires_grad must be a bool, got {_short(requires_grad)}")
    # PyTorch never saves hooks (an empty OrderedDict stands in); anything else is not a state dict.
    if not isinstance(backward_hooks, dict) or backward_hooks:
        raise _RecordError(f"backward hooks must be an empty dict, got {_short(backward_hooks)}")
    if metadata is None:
        metadata = {}
    # torch._utils.get_tensor_metadata: only the lazy "conj" and "neg" bits.
    if not isinstance(metadata, dict) or not all(
        k in ("conj", "neg") and isinstance(v, bool) for k, v in metadata.items()
    ):
        raise _RecordError(f"unsupported tensor metadata {_short(metadata)}")
    return _TensorRef(
        storage,
        storage_offset,
        shape,
        strides,
        dtype,
        negative=metadata.get("neg", False),
        conjugate=metadata.get("conj", False),
    )


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
):
    dtype = storage.dtype if isinstance(storage, _StorageRef) else None
    return _tensor_ref(
        storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata, dtype
    )


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
    # torch.save 2.x writes this for dtypes without a typed storage class (uint16/32/64, float8):
    # the storage is untyped bytes and the dtype comes separately.
    if not isinstance(dtype, _TorchDtype):
        raise _RecordError(f"tensor dtype must be a torch dtype, got {_short(dtype)}")
    return _tensor_ref(
        storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata, dtype.name
    )


def _rebuild_parameter(data, requires_grad, backward_hooks):
    # An nn.Parameter is its tensor here.
    if not isinstance(data, _TensorRef):
        raise _RecordError(f"parameter data must be a tensor, got {type(data).__name__}")
    if not isinstance(requires_grad, bool) or not isinstance(backward_hooks, dict) or backward_hooks:
        raise _RecordError("parameter record holds unexpected requires_grad or hooks")
    return data


# Every global a tensor state dict written by torch.save (checked with 2.13) refers to, mapped to
# the inert object used in its place. Nothing else is ever imported.
_STATE_DICT_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "UntypedStorage"): _StorageType("uint8"),
    **{("torch", cls): _StorageType(dtype) for cls, dtype in _STORAGE_CLASS_DTYPES.items()},
    **{("torch", name): _TorchDtype(name) for name in _DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed globals and never the normal `find_class`."""

    def __init__(
        self,
        file,
        path: str,
        allowed: dict[tuple[str, str], Any],
        load_storage: Optional[Callable[[Any], _StorageRef]] = None,
    ):
        super().__init__(file)
        self._path = path
        self._allowed = allowed
        self._load_storage = load_storage

    def find_class(self, module, name):
        key = (module, name)
        if key in self._allowed:
            return self._allowed[key]
        raise UnsafeCheckpointError(
            f"{self._path}: refused global '{module}.{name}' (only tensor state dicts are allowed)"
        )

    def persistent_load(self, pid):
        if self._load_storage is None:
            raise UnsafeCheckpointError(
                f"{self._path}: unexpected persistent id {_short(pid)} in a header pickle"
            )
        return self._load_storage(pid)


def _unpickle(file, path: str, what: str, allowed=None, load_storage=None):
    """Run one pickle through the restricted unpickler; any failure is a CheckpointError."""
    unpickler = _RestrictedUnpickler(file, path, allowed or {}, load_storage)
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except _RecordError as exc:
        raise CheckpointError(f"{path}: {what}: {exc}") from exc
    # Corrupt pickles raise nearly anything (EOFError, UnpicklingError, TypeError, MemoryError...).
    except Exception as exc:
        raise CheckpointError(
            f"{path}: {what} is truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from exc


class _StorageTable:
    """Collects the storages the pickle references (its `persistent_load`), checking consistency."""

    def __init__(self, legacy: bool):
        self.legacy = legacy
        self.refs: dict[str, _StorageRef] = {}

    def __call__(self, pid) -> _StorageRef:
        # Zip: ('storage', type, key, location, numel); legacy adds view_metadata.
        if not isinstance(pid, tuple) or len(pid) != (6 if self.legacy else 5):
            raise _RecordError(f"malformed storage record {_short(pid)}")
        typename, storage_type, key, location = pid[:4]
        numel = pid[4]
        if isinstance(typename, bytes):  # written by Python 2
            typename = typename.decode("ascii", "replace")
        if typename != "storage":
            raise _RecordError(f"unsupported persistent record type {_short(typename)}")
        if not isinstance(storage_type, _StorageType):
            raise _RecordError(f"storage record names {_short(storage_type)}, not a storage class")
        if not isinstance(key, str) or not key or "/" in key or "\\" in key or key in (".", ".."):
            raise _RecordError(f"storage key {_short(key)} is not a plain name")
        if not isinstance(location, (str, bytes)):
            raise _RecordError(f"storage location {_short(location)} is not a device name")
        if not _is_int(numel) or numel < 0:
            raise _RecordError(f"storage {_short(key)} size {_short(numel)} is not a non-negative int")
        if self.legacy and pid[5] is not None:
            raise _RecordError(f"storage {_short(key)} is a view (PyTorch < 0.4 files): unsupported")
        ref = _StorageRef(key, storage_type.dtype, numel)
        seen = self.refs.setdefault(key, ref)
        if seen != ref:
            raise _RecordError(f"storage {_short(key)} is described twice differently: {seen} and {ref}")
        return ref


def _tensor_refs(obj, path: str) -> tuple[dict[str, _TensorRef], Optional[str]]:
    """Flatten the unpickled object into dotted names; unwrap a single wrapped state dict."""
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, expected a state dict (a dict of tensors)"
        )
    per_entry = {key: _flatten(value, _key_name(key, path), path) for key, value in obj.items()}
    holders = [key for key, sub in per_entry.items() if sub]
    root_key = None
    if not any(isinstance(value, _TensorRef) for value in obj.values()) and len(holders) == 1:
        if isinstance(obj[holders[0]], dict):
            root_key = _key_name(holders[0], path)
    if root_key is not None:
        return _flatten(obj[holders[0]], "", path), root_key
    tensors: dict[str, _TensorRef] = {}
    for sub in per_entry.values():
        for name, ref in sub.items():
            if name in tensors:
                raise CheckpointError(f"{path}: two tensors are both named '{name}'")
            tensors[name] = ref
    return tensors, None


def _key_name(key, path: str) -> str:
    if isinstance(key, str):
        return key
    if _is_int(key):  # e.g. an optimizer's per-parameter state
        return str(key)
    raise CheckpointError(f"{path}: dict key {_short(key)} is not a string or an integer")


def _flatten(obj, prefix: str, path: str, depth: int = 0) -> dict[str, _TensorRef]:
    if depth > _MAX_NESTING:
        raise CheckpointError(f"{path}: '{prefix}' is nested more than {_MAX_NESTING} levels deep")
    if isinstance(obj, _TensorRef):
        return {prefix: obj}
    if isinstance(obj, dict):
        items = [(_key_name(k, path), v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(obj)]
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return {}  # plain metadata such as an epoch counter: not a tensor
    else:
        raise CheckpointError(f"{path}: '{prefix}' holds a {type(obj).__name__}, not a tensor")
    out: dict[str, _TensorRef] = {}
    for name, value in items:
        full = f"{prefix}.{name}" if prefix else name
        for sub_name, ref in _flatten(value, full, path, depth + 1).items():
            if sub_name in out:
                raise CheckpointError(f"{path}: two tensors are both named '{sub_name}'")
            out[sub_name] = ref
    return out


class _CappedReader:
    """File reads capped at the file's end, so a corrupt length cannot request a huge buffer."""

    def __init__(self, file, size: int):
        self._file = file
        self._size = size

    def read(self, n: int = -1) -> bytes:
        remaining = max(self._size - self._file.tell(), 0)
        return self._file.read(remaining if n is None or n < 0 else min(n, remaining))

    def readline(self, limit: int = -1) -> bytes:
        return self._file.readline(_MAX_PICKLE_LINE if limit < 0 else min(limit, _MAX_PICKLE_LINE))


def _decode_zip_name(raw: bytes, flags: int) -> str:
    return raw.decode("utf-8" if flags & 0x800 else "cp437")


class TorchCheckpoint:
    """A PyTorch checkpoint opened for reading tensors one at a time (see the module docstring).

    Opening unpickles only the (small) pickle and locates every storage; `read` maps one tensor's
    bytes and copies them into an MLX array. Use as a context manager, or call `close()`.
    Attributes: `path`; `format`, "zip" or "legacy"; `root_key`, the key of the wrapper dict the
    tensors were taken from (e.g. "model"), or None.
    """

    def __init__(self, path: PathLike):
        self.path = os.fspath(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot open ({exc})") from exc
        try:
            self._size = os.fstat(self._file.fileno()).st_size
            # storage key -> (file offset of its first byte, bytes available there)
            self._storage_bytes: dict[str, tuple[int, int]] = {}
            self._byteorder = "little"
            head = self._file.read(512)
            if not head:
                raise CheckpointError(f"{self.path}: empty file, not a PyTorch checkpoint")
            if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
                self.format = "zip"
                obj = self._open_zip()
            elif head[257:262] == b"ustar":
                raise CheckpointError(
                    f"{self.path}: a tar checkpoint (PyTorch < 0.4): unsupported; "
                    "re-save it with a newer torch.save"
                )
            elif head[:1] == b"\x80":  # pickle PROTO opcode
                self.format = "legacy"
                obj = self._open_legacy()
            else:
                raise CheckpointError(
                    f"{self.path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a "
                    f"legacy pickle stream; starts with {head[:8]!r})"
                )
            self._tensors, self.root_key = _tensor_refs(obj, self.path)
            for key, ref in self._tensors.items():
                self._check_tensor(key, ref)
        except BaseException:
            self._file.close()
            raise

    # -- opening ---------------------------------------------------------------------------------

    def _open_zip(self):
        path = self.path
        try:
            archive = zipfile.ZipFile(self._file)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise CheckpointError(f"{path}: truncated or corrupt zip archive ({exc})") from exc
        try:
            with archive:
                obj, refs = self._read_zip_directory(archive)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
            raise CheckpointError(f"{path}: truncated or corrupt zip archive ({exc})") from exc
        for key in refs:
            info = self._zip_members.get(f"{self._zip_top}/data/{key}")
            if info is not None:
                self._storage_bytes[key] = (self._zip_member_offset(info), info.file_size)
        self._storage_members = {key: f"record '{self._zip_top}/data/{key}'" for key in refs}
        return obj

    def _read_zip_directory(self, archive: zipfile.ZipFile):
        """Check the members, read the byte order, and unpickle `<top>/data.pkl`."""
        path = self.path
        infos = archive.infolist()
        names = [info.filename for info in infos]
        if not names:
            raise CheckpointError(f"{path}: empty zip archive, not a torch.save file")
        tops = {name.split("/", 1)[0] for name in names}
        if len(tops) != 1 or any("/" not in name for name in names):
            raise UnsafeCheckpointError(
                f"{path}: a torch.save archive has one top folder; found {sorted(tops)}"
            )
        (top,) = tops
        # Readers disagree on which of two same-named (or case-folded) members counts: refuse.
        folded = collections.Counter(name.lower() for name in names)
        clashes = sorted(name for name in names if folded[name.lower()] > 1)
        extra_pickles = sorted(
            name for name in names
            if name.rsplit("/", 1)[-1].lower() == "data.pkl" and name != f"{top}/data.pkl"
        )
        if clashes or extra_pickles:
            raise UnsafeCheckpointError(
                f"{path}: ambiguous archive members {sorted(set(clashes + extra_pickles))}"
            )
        by_name = {info.filename: info for info in infos}
        if f"{top}/data.pkl" not in by_name:
            raise CheckpointError(f"{path}: zip archive without '{top}/data.pkl': not a torch.save file")
        if f"{top}/byteorder" in by_name:
            if by_name[f"{top}/byteorder"].file_size > 16:
                raise CheckpointError(f"{path}: '{top}/byteorder' is not a byte order name")
            byteorder = archive.read(f"{top}/byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(
                    f"{path}: unknown byte order {_short(byteorder)} in '{top}/byteorder'"
                )
            self._byteorder = byteorder
        table = _StorageTable(legacy=False)
        with archive.open(f"{top}/data.pkl") as pickle_file:
            obj = _unpickle(pickle_file, path, f"'{top}/data.pkl'", _STATE_DICT_GLOBALS, table)
        self._zip_top, self._zip_members = top, by_name
        return obj, table.refs

    def _zip_member_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a stored member's bytes start: after its local header, which must agree."""
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointError(
                f"{self.path}: storage '{info.filename}' is compressed; expected stored"
            )
        if info.flag_bits & 0x1:
            raise CheckpointError(f"{self.path}: storage '{info.filename}' is encrypted")
        self._file.seek(info.header_offset)
        header = self._file.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: corrupt zip local header for '{info.filename}'")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        name = _decode_zip_name(self._file.read(name_len), info.flag_bits)
        if name != info.orig_filename:
            raise UnsafeCheckpointError(
                f"{self.path}: zip local header names {name!r} where the directory names "
                f"{info.orig_filename!r}"
            )
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > self._size:
            raise CheckpointError(f"{self.path}: truncated: storage '{info.filename}' runs past the end")
        return start

    def _open_legacy(self):
        path = self.path
        self._file.seek(0)
        reader = _CappedReader(self._file, self._size)
        magic = _unpickle(reader, path, "magic number pickle")
        if magic != _LEGACY_MAGIC_NUMBER:
            raise CheckpointError(
                f"{path}: not a PyTorch checkpoint (a pickle without torch's magic number)"
            )
        version = _unpickle(reader, path, "protocol version pickle")
        if version != _LEGACY_PROTOCOL_VERSION:
            raise CheckpointError(f"{path}: unsupported legacy protocol version {_short(version)}")
        sys_info = _unpickle(reader, path, "sys info pickle")
        if not isinstance(sys_info, dict):
            raise CheckpointError(f"{path}: corrupt sys info pickle ({type(sys_info).__name__})")
        table = _StorageTable(legacy=True)
        obj = _unpickle(reader, path, "main pickle", _STATE_DICT_GLOBALS, table)
        storage_keys = _unpickle(reader, path, "storage key pickle")
        if not isinstance(storage_keys, list) or not all(isinstance(k, str) for k in storage_keys):
            raise CheckpointError(f"{path}: the storage key pickle is not a list of names")
        # The storages follow in the listed order, each an int64 count then its bytes (always
        # little-endian: PyTorch converts on write and on read, whatever sys_info says).
        offset = self._file.tell()
        for key in storage_keys:
            ref = table.refs.get(key)
            if ref is None or key in self._storage_bytes:
                raise CheckpointError(
                    f"{path}: storage key {_short(key)} is listed but not (or twice) described "
                    "by the pickle"
                )
            self._file.seek(offset)
            count = self._file.read(8)
            if len(count) != 8:
                raise CheckpointError(f"{path}: truncated: storage {key!r} is missing its header")
            (numel,) = struct.unpack("<q", count)
            if numel != ref.numel:
                raise CheckpointError(
                    f"{path}: storage {key!r} holds {numel} elements where the pickle says {ref.numel}"
                )
            start = offset + 8
            offset = start + ref.nbytes
            if offset > self._size:
                raise CheckpointError(
                    f"{path}: truncated: storage {key!r} needs bytes up to {offset}, "
                    f"file has {self._size}"
                )
            self._storage_bytes[key] = (start, ref.nbytes)
        self._storage_members = {key: f"storage {key!r}" for key in table.refs}
        return obj

    def _check_tensor(self, key: str, ref: _TensorRef) -> None:
        storage = ref.storage
        if storage.key not in self._storage_bytes:
            raise CheckpointError(
                f"{self.path}: tensor '{key}' needs {self._storage_members[storage.key]}, "
                "which is missing from the file"
            )
        if ref.numel == 0:
            return
        available = min(storage.nbytes, self._storage_bytes[storage.key][1])
        itemsize = _DTYPES[ref.dtype].itemsize
        end = (ref.offset + ref.span()) * itemsize
        if end > available:
            raise CheckpointError(
                f"{self.path}: tensor '{key}' (shape {ref.shape}, stride {ref.stride}, offset "
                f"{ref.offset}) reaches byte {end} of storage {storage.key!r}, which holds {available}"
            )

    # -- reading ---------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key) -> bool:
        return key in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def _ref(self, key: str) -> _TensorRef:
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {key!r}") from None

    def shape(self, key: str) -> tuple:
        return self._ref(key).shape

    def dtype(self, key: str) -> str:
        """PyTorch's name of the tensor's dtype: "float32", "bfloat16", "int64", ..."""
        return self._ref(key).dtype

    def nbytes(self, key: str) -> int:
        ref = self._ref(key)
        return ref.numel * _DTYPES[ref.dtype].itemsize

    def read(self, key: str) -> mx.array:
        """The tensor as an MLX array (same dtype), read from the file now; nothing else is read."""
        ref = self._ref(key)
        if self._file.closed:
            raise CheckpointError(f"{self.path}: checkpoint is closed")
        dt = _DTYPES[ref.dtype]
        if dt.mlx is None:
            raise CheckpointError(
                f"{self.path}: tensor '{key}' has dtype {dt.name}, which MLX cannot hold"
            )
        if ref.numel == 0:
            return mx.zeros(ref.shape, dtype=dt.mlx)
        # "<" or "|" -> ">" for files saved on a big-endian machine (zip format only).
        np_dtype = np.dtype(dt.numpy)
        if self._byteorder == "big":
            np_dtype = np_dtype.newbyteorder(">")
        start = self._storage_bytes[ref.storage.key][0] + ref.offset * dt.itemsize
        mapped = np.memmap(self._file, dtype=np_dtype, mode="r", offset=start, shape=(ref.span(),))
        strides = tuple(s * dt.itemsize for s in ref.stride)
        view = np.lib.stride_tricks.as_strided(mapped, shape=ref.shape, strides=strides, writeable=False)
        values = np.asarray(view, order="C")  # copies only when the tensor is a strided view
        if not values.dtype.isnative:
            values = values.astype(values.dtype.newbyteorder("="))
        if ref.conjugate:
            values = np.conj(values)
        if ref.negative:
            # bfloat16 is held as its bits: flip the sign bit.
            values = values ^ np.uint16(0x8000) if dt.name == "bfloat16" else np.negative(values)
        if dt.name == "bfloat16":
            array = mx.array(values, dtype=mx.uint16).view(mx.bfloat16)
        else:
            array = mx.array(values, dtype=dt.mlx)
        del mapped, view, values  # unmap the file now: mx.array copied the bytes
        return array

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "TorchCheckpoint":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TorchCheckpoint({self.path!r}, format={self.format!r}, tensors={len(self._tensors)})"


def open_torch_checkpoint(path: PathLike) -> TorchCheckpoint:
    """Open a `torch.save` checkpoint (zip or legacy) for reading tensors without PyTorch.

    Raises CheckpointError (a ValueError) for unreadable files and UnsafeCheckpointError for files
    that reference anything beyond tensors, before any of their code could run.
    """
    return TorchCheckpoint(path)


def iter_torch_checkpoint(path: PathLike) -> Iterator[tuple[str, mx.array]]:
    """Yield `(name, mx.array)` for every tensor, one materialised at a time, in the file's order."""
    with open_torch_checkpoint(path) as checkpoint:
        for key in checkpoint.keys():
            yield key, checkpoint.read(key)
