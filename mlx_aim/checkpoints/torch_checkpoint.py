"""Read PyTorch checkpoints (`torch.save`) without PyTorch and without trusting a byte of them.

Apple ships AIM as `torch.save` pickles, and unpickling runs whatever the file names. This reader
treats the whole file as hostile: it checks the pickle's opcodes before CPython's unpickler sees
them, unpickles with fresh inert stand-ins for the few globals a tensor state dict needs, and reads
each tensor straight from the file at its storage's offset (memory-mapped), one at a time, so a
26 GB checkpoint converts in bounded memory.

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

Guarantees, whatever the file holds:
- **One error type.** Every failure, from opening to `read()`, is a `CheckpointError` (a ValueError)
  that names the file and the record or tensor; `UnsafeCheckpointError` (a subclass) when the file
  asks for something a tensor state dict never needs. No other exception type escapes, MemoryError
  and RecursionError included.
- **Nothing runs, nothing is shared.** Only the globals in `_CALLABLE_GLOBALS` and `_VALUE_GLOBALS`
  resolve, each to a stand-in made anew for every pickle: inert records, and callables that
  validate their arguments and refuse pickle's BUILD. Nothing one file does can reach a later load.
- **Scan before unpickling.** Each pickle is first walked opcode by opcode (`pickletools.genops`) on
  a model of pickle's stack and memo, within fixed budgets: `_MAX_PICKLE_BYTES` bytes,
  `_MAX_PICKLE_OPS` opcodes, `_MAX_MEMO` memo entries (numbered in order, as every pickler does),
  `_MAX_DEPTH` levels of nesting, `_MAX_STACK` stack entries, `_MAX_LITERAL` bytes per string,
  `_MAX_INT_BITS` bits per integer, `_MAX_CONTAINER_ITEMS` items over all containers. Only the
  opcodes `torch.save` writes pass; dict keys must be strings or integers below 2**61 (whose hashes
  cannot be made to collide); BUILD applies only to an OrderedDict the pickle made (the state dict's
  `_metadata`); calls take only their allow-listed arguments. CPython's unpickler sees the bytes
  only after all of that held. An honest checkpoint uses a small part of each budget (figures at
  the budgets below; `tests/test_torch_checkpoint.py` loads honest files with aim-7B's keys and
  with 20,000 tensors, zip and legacy).
- **Bounded walks.** Flattening the unpickled structure expands each container once (shared
  containers reuse that work, a container inside itself is refused) and produces at most
  `_MAX_TENSOR_NAMES` names in total.
- **Bounded zip members.** The central directory may hold at most `_MAX_ZIP_MEMBERS` entries in
  `_MAX_ZIP_DIRECTORY_BYTES` (checked from the end record before `zipfile` parses it). `data.pkl`,
  `byteorder` and `version` may be stored or deflated; each is read with a streaming cap (the
  pickle budget, or 16 bytes) that never trusts the declared size, and its CRC is checked.
  Storages must be stored (as `torch.save` writes them): they are mapped, never inflated. Encrypted
  members and any other compression are refused.
- **No expanded views.** A tensor may touch only bytes its storage has in the file, and may hold no
  more elements than that storage: stride-0 (`expand`) views beyond it are refused (save a
  `.contiguous()` copy). Overlapping views within that cap are materialised. `read()` allocates
  the tensor's logical bytes once (twice only for big-endian files and negative-bit tensors, which
  are converted on the way), never more than the storage's bytes in the file. Shapes are capped
  at `_MAX_DIMS` dimensions of fewer than 2**31 elements each (MLX's int32 shapes).
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
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

# Budgets (see the module docstring). For scale, measured on torch.save files: a state dict with aim-7B's
# 262 backbone keys has a 29 kB pickle of 8,397 opcodes and 2,102 memo entries; 20,000 tensors, 2.1 MB,
# 640,051 opcodes, 160,006 memo entries. These budgets leave room for about 250,000 tensors.
_MAX_PICKLE_BYTES = 64 << 20
_MAX_PICKLE_OPS = 8 << 20
_MAX_MEMO = 2 << 20
_MAX_DEPTH = 100
_MAX_STACK = 1 << 20
_MAX_LITERAL = 16 << 20
_MAX_INT_BITS = 256
_MAX_CONTAINER_ITEMS = 8 << 20
_MAX_PICKLE_LINE = 1 << 20  # longest text line (protocol 0 names and numbers)
_MAX_TENSOR_NAMES = 1 << 20
_MAX_ZIP_MEMBERS = 1 << 17
_MAX_ZIP_DIRECTORY_BYTES = 16 << 20
_MAX_SMALL_RECORD = 16  # `byteorder` and `version`
_MAX_DIMS = 32
_MAX_DIM = (1 << 31) - 1
_MAX_INDEX = 1 << 62  # offsets and strides, in elements
_MAX_KEY_INT = (1 << 61) - 1  # CPython hashes ints modulo this: smaller ones never collide


class CheckpointError(ValueError):
    """The file is not a readable PyTorch tensor checkpoint (the message names the file and record)."""


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

    __slots__ = ()

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


class _Callable(_Inert):
    """Stands in for an allow-listed function or class: calls `function`, refuses BUILD. A new one is
    made for every pickle, so even a change that got past the scan could not outlive its load."""

    __slots__ = ("_function",)

    def __init__(self, function: Callable):
        self._function = function

    def __call__(self, *args):
        return self._function(*args)


_short_repr = reprlib.Repr()
_short_repr.maxstring = _short_repr.maxother = 80


def _short(value) -> str:
    """repr() of an untrusted value, cut short so a hostile file cannot flood the error message."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"<an integer of {value.bit_length()} bits>"  # repr() of a huge int can itself fail
    try:
        return _short_repr.repr(value)
    except Exception:  # a value whose repr fails is described by its type alone
        return f"<{type(value).__name__}>"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_tuple(value, what: str, limit: int) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) > _MAX_DIMS:
        raise _RecordError(f"{what} must be a tuple of at most {_MAX_DIMS} integers, got {_short(value)}")
    if not all(_is_int(v) and 0 <= v <= limit for v in value):
        raise _RecordError(f"{what} must hold integers from 0 to {limit}, got {_short(value)}")
    return tuple(value)


def _tensor_ref(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata, dtype):
    """Validate `_rebuild_tensor_v2/v3`'s arguments (all of them came from the untrusted pickle)."""
    if not isinstance(storage, _StorageRef):
        raise _RecordError(f"tensor storage must be a storage record, got {type(storage).__name__}")
    if not _is_int(storage_offset) or not 0 <= storage_offset <= _MAX_INDEX:
        raise _RecordError(f"storage offset must be an int from 0 to 2**62, got {_short(storage_offset)}")
    shape = _int_tuple(size, "tensor size", _MAX_DIM)
    strides = _int_tuple(stride, "tensor stride", _MAX_INDEX)
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
    if metadata.get("neg", False) and dtype == "bool":
        raise _RecordError("a bool tensor cannot carry the negative bit")
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


def _ordered_dict(*args):
    # torch.save writes `OrderedDict()` and fills it with SETITEMS; arguments would be hashed here,
    # outside the scan's view.
    if args:
        raise _RecordError("OrderedDict is called with arguments")
    return collections.OrderedDict()


# Every global a tensor state dict written by torch.save (checked with 2.13) refers to. Nothing else
# is ever imported. Callables: what REDUCE may call, and what a new stand-in calls in its place.
_CALLABLE_GLOBALS: dict[tuple[str, str], Callable] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}
# Values: storage classes and dtypes, passed as arguments, never called.
_VALUE_GLOBALS: dict[tuple[str, str], Callable[[], _Inert]] = {
    ("torch.storage", "UntypedStorage"): lambda: _StorageType("uint8"),
    **{("torch", cls): (lambda d=dtype: _StorageType(d)) for cls, dtype in _STORAGE_CLASS_DTYPES.items()},
    **{("torch", name): (lambda n=name: _TorchDtype(n)) for name in _DTYPES},
}


def _fresh_globals() -> dict[tuple[str, str], Any]:
    """New stand-ins for every allow-listed global, for one pickle."""
    table: dict[tuple[str, str], Any] = {key: _Callable(fn) for key, fn in _CALLABLE_GLOBALS.items()}
    table.update({key: make() for key, make in _VALUE_GLOBALS.items()})
    return table


# -- scanning: every pickle is checked opcode by opcode before CPython's unpickler sees it ----------


class _Sym:
    """What the scan knows of one value on pickle's stack: its kind, nesting depth, and for strings
    and integers (keys, global names) their value; for tuples, their length."""

    __slots__ = ("kind", "depth", "value")

    def __init__(self, kind: str, depth: int = 0, value=None):
        self.kind, self.depth, self.value = kind, depth, value


_CONSTANTS = {"NONE": "none", "NEWTRUE": "bool", "NEWFALSE": "bool", "FLOAT": "float", "BINFLOAT": "float"}
_INTS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
            "BINUNICODE8"}
_BYTES = {"BINBYTES", "SHORT_BINBYTES", "BINBYTES8"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}


class _PickleScan:
    """A model of pickle's stack machine over the opcodes `torch.save` writes, within the budgets.

    It raises UnsafeCheckpointError for anything a tensor state dict never needs (a global beyond
    the allow-list, an opcode torch.save does not write, BUILD on anything but the pickle's own
    OrderedDict) and CheckpointError when a budget is exceeded or the stream is malformed.
    """

    def __init__(self, path: str, what: str, globals_allowed: bool, persistent: bool):
        self.path, self.what = path, what
        self.globals_allowed, self.persistent = globals_allowed, persistent
        self.stack: list[_Sym] = []
        self.marks: list[int] = []  # stack heights at each MARK
        self.memo: list[_Sym] = []
        self.items = 0

    # errors
    def unsafe(self, message: str):
        return UnsafeCheckpointError(f"{self.path}: {self.what}: {message}")

    def corrupt(self, message: str):
        return CheckpointError(f"{self.path}: {self.what}: {message}")

    def over(self, what: str, limit: int):
        return CheckpointError(
            f"{self.path}: {self.what}: more than {limit:,} {what}, past the reader's budget "
            "(an honest tensor checkpoint needs a small part of it)"
        )

    # stack
    def push(self, sym: _Sym) -> None:
        if len(self.stack) >= _MAX_STACK:
            raise self.over("values on the pickle stack", _MAX_STACK)
        self.stack.append(sym)

    def top(self) -> _Sym:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise self.corrupt("stack underflow")
        return self.stack[-1]

    def pop(self) -> _Sym:
        sym = self.top()
        self.stack.pop()
        return sym

    def pop_mark(self) -> list[_Sym]:
        if not self.marks:
            raise self.corrupt("an opcode needs a MARK that is not there")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def count(self, n: int) -> None:
        self.items += n
        if self.items > _MAX_CONTAINER_ITEMS:
            raise self.over("items in containers", _MAX_CONTAINER_ITEMS)

    def nested(self, depth: int) -> int:
        if depth > _MAX_DEPTH:
            raise self.over("levels of nesting", _MAX_DEPTH)
        return depth

    def container(self, kind: str, items: list[_Sym], value=None) -> _Sym:
        self.count(len(items))
        return _Sym(kind, self.nested(1 + max((s.depth for s in items), default=0)), value)

    def add_to(self, target: _Sym, items: list[_Sym], kinds: tuple) -> None:
        if target.kind not in kinds:
            raise self.unsafe(f"adds items to a {target.kind}")
        self.count(len(items))
        target.depth = self.nested(max([target.depth] + [1 + s.depth for s in items]))

    def check_keys(self, pairs: list[_Sym]) -> None:
        if len(pairs) % 2:
            raise self.corrupt("a dict is built from an odd number of values")
        for key in pairs[::2]:
            if key.kind == "str" or (key.kind == "int" and abs(key.value) < _MAX_KEY_INT):
                continue
            # Only strings (randomised hashes) and small ints (distinct hashes) are keys: anything
            # else could be hashed into a crash (deep tuples) or quadratic time (colliding ints).
            shown = _short(key.value) if key.kind == "int" else f"a {key.kind}"
            raise self.unsafe(f"a dict key is {shown}; state dicts have string or small integer keys")

    def global_(self, module, name) -> _Sym:
        key = (module, name)
        if not self.globals_allowed or (key not in _CALLABLE_GLOBALS and key not in _VALUE_GLOBALS):
            shown = f"{module}.{name}"
            raise UnsafeCheckpointError(
                f"{self.path}: refused global '{shown[:200]}' in the {self.what} "
                "(only tensor state dicts are allowed)"
            )
        return _Sym("global", 0, key)

    def step(self, name: str, arg) -> bool:
        """Applies one opcode; True at STOP."""
        if name in _CONSTANTS:
            self.push(_Sym(_CONSTANTS[name]))
        elif name in _INTS:
            if isinstance(arg, bool):  # protocol 0 writes True/False as INT 01/00
                self.push(_Sym("bool"))
            elif arg.bit_length() > _MAX_INT_BITS:
                raise self.corrupt(f"an integer of {arg.bit_length()} bits (at most {_MAX_INT_BITS})")
            else:
                self.push(_Sym("int", 0, arg))
        elif name in _STRINGS or name in _BYTES:
            if len(arg) > _MAX_LITERAL:
                raise self.over("bytes in one string", _MAX_LITERAL)
            self.push(_Sym("str", 0, arg if len(arg) <= 1024 else None) if name in _STRINGS else _Sym("bytes"))
        elif name == "MARK":
            if len(self.marks) >= _MAX_DEPTH:
                raise self.over("open MARKs", _MAX_DEPTH)
            self.marks.append(len(self.stack))
        elif name == "EMPTY_TUPLE":
            self.push(self.container("tuple", [], 0))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            items = [self.pop() for _ in range(int(name[-1]))][::-1]
            self.push(self.container("tuple", items, len(items)))
        elif name == "TUPLE":
            items = self.pop_mark()
            self.push(self.container("tuple", items, len(items)))
        elif name in ("EMPTY_LIST", "EMPTY_DICT"):
            self.push(_Sym("list" if name == "EMPTY_LIST" else "dict", 1))
        elif name == "LIST":
            self.push(self.container("list", self.pop_mark()))
        elif name == "DICT":
            items = self.pop_mark()
            self.check_keys(items)
            self.push(self.container("dict", items))
        elif name == "APPEND":
            value = self.pop()
            self.add_to(self.top(), [value], ("list",))
        elif name == "APPENDS":
            items = self.pop_mark()
            self.add_to(self.top(), items, ("list",))
        elif name == "SETITEM":
            value, key = self.pop(), self.pop()
            self.check_keys([key, value])
            self.add_to(self.top(), [key, value], ("dict", "odict"))
        elif name == "SETITEMS":
            items = self.pop_mark()
            self.check_keys(items)
            self.add_to(self.top(), items, ("dict", "odict"))
        elif name == "POP":
            if len(self.stack) > (self.marks[-1] if self.marks else 0):
                self.stack.pop()
            elif self.marks:  # pickle's POP drops an empty MARK
                self.marks.pop()
            else:
                raise self.corrupt("stack underflow")
        elif name == "POP_MARK":
            self.pop_mark()
        elif name == "DUP":
            self.push(self.top())
        elif name in _PUTS or name == "MEMOIZE":
            index = len(self.memo) if name == "MEMOIZE" else arg
            if not _is_int(index) or not 0 <= index <= len(self.memo):
                # Every pickler numbers memo entries 0, 1, 2, ...: a jump would size the memo by it.
                raise self.unsafe(f"memo index {_short(index)} skips ahead of the {len(self.memo)} entries")
            if index == len(self.memo):
                if index >= _MAX_MEMO:
                    raise self.over("memo entries", _MAX_MEMO)
                self.memo.append(self.top())
            else:
                self.memo[index] = self.top()
        elif name in _GETS:
            if not _is_int(arg) or not 0 <= arg < len(self.memo):
                raise self.corrupt(f"memo index {_short(arg)} was never stored")
            self.push(self.memo[arg])
        elif name == "GLOBAL":
            module, _, attr = arg.partition(" ")
            self.push(self.global_(module, attr))
        elif name == "STACK_GLOBAL":
            attr, module = self.pop(), self.pop()
            if module.kind != "str" or attr.kind != "str" or module.value is None or attr.value is None:
                raise self.unsafe("STACK_GLOBAL names a global with something other than two short strings")
            self.push(self.global_(module.value, attr.value))
        elif name == "REDUCE":
            args, function = self.pop(), self.pop()
            if function.kind != "global" or function.value not in _CALLABLE_GLOBALS:
                shown = ".".join(function.value) if function.kind == "global" else f"a {function.kind}"
                raise self.unsafe(f"calls {shown}, which a state dict never calls")
            if args.kind != "tuple":
                raise self.unsafe(f"calls {'.'.join(function.value)} with a {args.kind} for arguments")
            if function.value == ("collections", "OrderedDict"):
                if args.value:
                    raise self.unsafe("calls OrderedDict with arguments")
                self.push(_Sym("odict", 1))
            else:
                self.push(_Sym("tensor", 1))
        elif name == "BINPERSID":
            pid = self.pop()
            if not self.persistent or pid.kind != "tuple":
                raise self.unsafe(f"a persistent id (a {pid.kind}) where no storage can be")
            self.push(_Sym("storage", 1))
        elif name == "BUILD":
            state = self.pop()
            target = self.top()
            # torch.save's only BUILD sets a state dict's `_metadata`; on an allow-listed global it
            # would rewrite the reader's own objects.
            if target.kind != "odict" or state.kind != "dict":
                raise self.unsafe(f"BUILD sets the state of a {target.kind} from a {state.kind}")
        elif name == "PROTO":
            if not 0 <= arg <= pickle.HIGHEST_PROTOCOL:
                raise self.corrupt(f"unknown pickle protocol {_short(arg)}")
        elif name == "FRAME":
            pass  # protocol 4 framing: a length hint the unpickler checks itself
        elif name == "STOP":
            if self.marks or len(self.stack) != 1:
                raise self.corrupt("STOP with a stack other than one value")
            return True
        else:
            # OBJ, INST, NEWOBJ(_EX), EXT1/2/4, sets, bytearrays, out-of-band buffers, text PERSID.
            raise self.unsafe(f"opcode {name}, which torch.save never writes")
        return False


class _PickleBytes:
    """Feeds one pickle from a file to the scan and keeps its bytes for the unpickler, refusing to
    read past `_MAX_PICKLE_BYTES` or the end of the file."""

    def __init__(self, file, end: int, path: str, what: str):
        self._file, self._end, self._path, self._what = file, end, path, what
        self.data = bytearray()

    def _room(self, n: int) -> int:
        if len(self.data) + n > _MAX_PICKLE_BYTES:
            raise CheckpointError(
                f"{self._path}: {self._what}: longer than the reader's budget of {_MAX_PICKLE_BYTES:,} bytes"
            )
        return min(n, max(self._end - self._file.tell(), 0))

    def read(self, n: int) -> bytes:
        chunk = self._file.read(self._room(n))
        self.data += chunk
        return chunk

    def readline(self) -> bytes:
        line = self._file.readline(self._room(_MAX_PICKLE_LINE))
        self.data += line
        return line


def _scan_pickle(source: _PickleBytes, path: str, what: str, globals_allowed: bool, persistent: bool):
    scan = _PickleScan(path, what, globals_allowed, persistent)
    ops = 0
    try:
        for opcode, arg, _ in pickletools.genops(source):
            ops += 1
            if ops > _MAX_PICKLE_OPS:
                raise scan.over("opcodes", _MAX_PICKLE_OPS)
            if scan.step(opcode.name, arg):
                return bytes(source.data)
    except CheckpointError:
        raise
    except Exception as exc:  # genops: unknown opcode, truncated argument, malformed text number
        raise CheckpointError(f"{path}: {what} is truncated or corrupt ({_describe(exc)})") from exc
    raise CheckpointError(f"{path}: {what} ends without STOP")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200] + '...' if len(text) > 200 else text}"


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed globals, to new stand-ins, never `find_class`."""

    def __init__(self, file, path: str, allowed: dict, load_storage: Optional[Callable[[Any], _StorageRef]]):
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


def _load_pickle(source: _PickleBytes, path: str, what: str, load_storage=None):
    """Scan one pickle, then unpickle exactly the scanned bytes with fresh stand-ins."""
    header = load_storage is None  # the legacy header pickles hold plain values only
    data = _scan_pickle(source, path, what, globals_allowed=not header, persistent=not header)
    allowed = {} if header else _fresh_globals()
    unpickler = _RestrictedUnpickler(io.BytesIO(data), path, allowed, load_storage)
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except _RecordError as exc:
        raise CheckpointError(f"{path}: {what}: {exc}") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: {what} is truncated or corrupt ({_describe(exc)})") from exc


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
        if not isinstance(key, str) or not key or len(key) > 256 or "/" in key or "\\" in key or key in (".", ".."):
            raise _RecordError(f"storage key {_short(key)} is not a plain name")
        if not isinstance(location, (str, bytes)):
            raise _RecordError(f"storage location {_short(location)} is not a device name")
        if not _is_int(numel) or not 0 <= numel <= _MAX_INDEX:
            raise _RecordError(f"storage {_short(key)} size {_short(numel)} is not an int from 0 to 2**62")
        if self.legacy and pid[5] is not None:
            raise _RecordError(f"storage {_short(key)} is a view (PyTorch < 0.4 files): unsupported")
        ref = _StorageRef(key, storage_type.dtype, numel)
        seen = self.refs.setdefault(key, ref)
        if seen != ref:
            raise _RecordError(f"storage {_short(key)} is described twice differently: {seen} and {ref}")
        return ref


# -- walking the unpickled object into tensor names ------------------------------------------------


class _Walk:
    """Flattens nested dicts, lists and tuples into dotted tensor names. Each container is expanded
    once (a shared one reuses its names), one inside itself is refused, and at most
    `_MAX_TENSOR_NAMES` names are produced over the whole walk."""

    def __init__(self, path: str):
        self.path = path
        self.done: dict[int, dict[str, _TensorRef]] = {}  # id(container) -> its names, relative
        self.keep: list = []  # the containers in `done`, so their ids stay theirs
        self.active: set[int] = set()
        self.produced = 0

    def names(self, obj, where: str, depth: int = 0) -> dict[str, _TensorRef]:
        """Tensor names inside `obj`, relative to it ("" for `obj` itself)."""
        if isinstance(obj, _TensorRef):
            return {"": obj}
        if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
            return {}  # plain metadata such as an epoch counter: not a tensor
        if not isinstance(obj, (dict, list, tuple)):
            raise CheckpointError(f"{self.path}: '{where}' holds a {type(obj).__name__}, not a tensor")
        if id(obj) in self.done:
            return self.done[id(obj)]
        if id(obj) in self.active:
            raise CheckpointError(f"{self.path}: '{where}' contains itself")
        if depth > _MAX_DEPTH:
            raise CheckpointError(f"{self.path}: '{where}' is nested more than {_MAX_DEPTH} levels deep")
        self.active.add(id(obj))
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        out: dict[str, _TensorRef] = {}
        for key, value in items:
            name = _key_name(key, self.path)
            for sub, ref in self.names(value, f"{where}.{name}" if where else name, depth + 1).items():
                full = f"{name}.{sub}" if sub else name
                if full in out:
                    raise CheckpointError(f"{self.path}: two tensors are both named '{full}'")
                self.produced += 1
                if self.produced > _MAX_TENSOR_NAMES:
                    raise CheckpointError(
                        f"{self.path}: more than {_MAX_TENSOR_NAMES:,} tensor names (shared containers "
                        "repeated past the reader's budget)"
                    )
                out[full] = ref
        self.active.discard(id(obj))
        self.done[id(obj)] = out
        self.keep.append(obj)
        return out


def _tensor_refs(obj, path: str) -> tuple[dict[str, _TensorRef], Optional[str]]:
    """Flatten the unpickled object into dotted names; unwrap a single wrapped state dict."""
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, expected a state dict (a dict of tensors)"
        )
    walk = _Walk(path)
    per_entry = {key: walk.names(value, _key_name(key, path), 1) for key, value in obj.items()}
    holders = [key for key, sub in per_entry.items() if sub]
    if not any(isinstance(value, _TensorRef) for value in obj.values()) and len(holders) == 1:
        if isinstance(obj[holders[0]], dict):
            return dict(per_entry[holders[0]]), _key_name(holders[0], path)
    return walk.names(obj, ""), None


def _key_name(key, path: str) -> str:
    if isinstance(key, str):
        return key
    if _is_int(key) and abs(key) < _MAX_KEY_INT:  # e.g. an optimizer's per-parameter state
        return str(key)
    raise CheckpointError(f"{path}: dict key {_short(key)} is not a string or a small integer")


# -- the zip archive --------------------------------------------------------------------------------


def _zip_directory_size(file, size: int, path: str) -> tuple[int, int]:
    """(entries, bytes) of the central directory, from the end records (zip64 too), so that a hostile
    directory is refused before `zipfile` builds an object per entry."""
    tail_len = min(size, 22 + 0xFFFF)
    file.seek(size - tail_len)
    tail = file.read(tail_len)
    at = len(tail) - 22 if tail[-22:-18] == b"PK\x05\x06" else tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        raise CheckpointError(f"{path}: truncated or corrupt zip archive (no end of central directory)")
    entries, directory_bytes = struct.unpack("<10xHL6x", tail[at:at + 22])
    if entries == 0xFFFF or directory_bytes == 0xFFFFFFFF:
        locator = tail[at - 20:at] if at >= 20 else b""
        if locator[:4] == b"PK\x06\x07":
            (record_at,) = struct.unpack("<8xQ4x", locator)
            if record_at <= size - 56:
                file.seek(record_at)
                record = file.read(56)
                if record[:4] == b"PK\x06\x06":
                    entries, directory_bytes = struct.unpack("<32xQQ8x", record)
    return entries, directory_bytes


def _decode_zip_name(raw: bytes, flags: int) -> str:
    return raw.decode("utf-8" if flags & 0x800 else "cp437")


class TorchCheckpoint:
    """A PyTorch checkpoint opened for reading tensors one at a time (see the module docstring).

    Opening checks and unpickles only the (small) pickle and locates every storage; `read` maps one
    tensor's bytes and copies them into an MLX array. Use as a context manager, or call `close()`.
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
            self._open()
        except CheckpointError:
            self._file.close()
            raise
        except Exception as exc:  # the one error type, whatever a hostile file provoked (MemoryError too)
            self._file.close()
            raise CheckpointError(f"{self.path}: unreadable checkpoint ({_describe(exc)})") from exc
        except BaseException:
            self._file.close()
            raise

    def _open(self) -> None:
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

    # -- opening ---------------------------------------------------------------------------------

    def _open_zip(self):
        path = self.path
        entries, directory_bytes = _zip_directory_size(self._file, self._size, path)
        if entries > _MAX_ZIP_MEMBERS or directory_bytes > _MAX_ZIP_DIRECTORY_BYTES:
            raise CheckpointError(
                f"{path}: the zip directory lists {entries:,} members in {directory_bytes:,} bytes, past the "
                f"reader's budget ({_MAX_ZIP_MEMBERS:,} members, {_MAX_ZIP_DIRECTORY_BYTES:,} bytes)"
            )
        try:
            archive = zipfile.ZipFile(self._file)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as exc:
            raise CheckpointError(f"{path}: truncated or corrupt zip archive ({_describe(exc)})") from exc
        with archive:
            obj, refs = self._read_zip_directory(archive)
        for key in refs:
            info = self._zip_members.get(f"{self._zip_top}/data/{key}")
            if info is not None:
                self._storage_bytes[key] = (self._storage_offset(info), info.file_size)
        self._storage_members = {key: f"record '{self._zip_top}/data/{key}'" for key in refs}
        return obj

    def _read_zip_directory(self, archive: zipfile.ZipFile):
        """Check the members, read the byte order, and unpickle `<top>/data.pkl`."""
        path = self.path
        infos = archive.infolist()
        names = [info.filename for info in infos]
        if not names:
            raise CheckpointError(f"{path}: empty zip archive, not a torch.save file")
        if len(infos) > _MAX_ZIP_MEMBERS:
            raise CheckpointError(f"{path}: more than {_MAX_ZIP_MEMBERS:,} zip members")
        encrypted = [info.filename for info in infos if info.flag_bits & 0x1]
        if encrypted:
            raise UnsafeCheckpointError(f"{path}: encrypted zip members {_short(encrypted)}")
        tops = {name.split("/", 1)[0] for name in names}
        if len(tops) != 1 or any("/" not in name for name in names):
            raise UnsafeCheckpointError(
                f"{path}: a torch.save archive has one top folder; found {_short(sorted(tops))}"
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
                f"{path}: ambiguous archive members {_short(sorted(set(clashes + extra_pickles)))}"
            )
        by_name = {info.filename: info for info in infos}
        if f"{top}/data.pkl" not in by_name:
            raise CheckpointError(f"{path}: zip archive without '{top}/data.pkl': not a torch.save file")
        if f"{top}/byteorder" in by_name:
            raw = self._read_record(by_name[f"{top}/byteorder"], _MAX_SMALL_RECORD)
            byteorder = raw.decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(
                    f"{path}: unknown byte order {_short(byteorder)} in '{top}/byteorder'"
                )
            self._byteorder = byteorder
        table = _StorageTable(legacy=False)
        what = f"'{top}/data.pkl'"
        data = self._read_record(by_name[f"{top}/data.pkl"], _MAX_PICKLE_BYTES)
        source = _PickleBytes(io.BytesIO(data), len(data), path, what)
        obj = _load_pickle(source, path, what, table)
        self._zip_top, self._zip_members = top, by_name
        return obj, table.refs

    def _member_start(self, info: zipfile.ZipInfo) -> int:
        """Where a member's (compressed) bytes start: after its local header, which must agree."""
        name = f"'{info.filename}'"
        self._file.seek(info.header_offset)
        header = self._file.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: corrupt zip local header for {name}")
        flags, method = struct.unpack("<HH", header[6:10])
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        if flags & 0x1 or method != info.compress_type:
            raise UnsafeCheckpointError(
                f"{self.path}: the local header of {name} disagrees with the directory (flags, method)"
            )
        raw = self._file.read(name_len)
        try:
            local_name = _decode_zip_name(raw, flags)
        except UnicodeDecodeError:
            local_name = None
        if local_name != info.orig_filename:
            raise UnsafeCheckpointError(
                f"{self.path}: zip local header names {_short(raw)} where the directory names {name}"
            )
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.compress_size > self._size:
            raise CheckpointError(f"{self.path}: truncated: {name} runs past the end of the file")
        return start

    def _storage_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a storage's bytes start; storages are mapped from the file, so they must be stored."""
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointError(
                f"{self.path}: storage '{info.filename}' is compressed; torch.save stores storages "
                "uncompressed, and the reader maps them from the file"
            )
        return self._member_start(info)

    def _read_record(self, info: zipfile.ZipInfo, limit: int) -> bytes:
        """A small member's bytes (stored or deflated), never more than `limit`, CRC checked."""
        name = f"'{info.filename}'"
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CheckpointError(
                f"{self.path}: {name} uses zip compression method {info.compress_type}; only stored "
                "(what torch.save writes) and deflated members are read"
            )
        if info.file_size > limit:
            raise CheckpointError(f"{self.path}: {name} declares {info.file_size:,} bytes, more than "
                                  f"the {limit:,} it can need")
        self._file.seek(self._member_start(info))
        left = info.compress_size
        if info.compress_type == zipfile.ZIP_STORED:
            data = self._file.read(min(left, limit + 1))
        else:
            inflater, out = zlib.decompressobj(-zlib.MAX_WBITS), bytearray()
            while left and not inflater.eof:
                chunk = self._file.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
                # max_length: inflate at most one byte past the limit, whatever the stream claims.
                out += inflater.decompress(chunk, limit + 1 - len(out))
                if len(out) > limit or inflater.unconsumed_tail:
                    raise CheckpointError(f"{self.path}: {name} inflates past the {limit:,} bytes it can need")
            if not inflater.eof:
                raise CheckpointError(f"{self.path}: {name} is a truncated deflate stream")
            data = bytes(out)
        if len(data) != info.file_size or zlib.crc32(data) != info.CRC:
            raise CheckpointError(f"{self.path}: {name} is corrupt (its size or CRC-32 does not match)")
        return data

    def _open_legacy(self):
        path = self.path
        self._file.seek(0)

        def load(what, load_storage=None):
            return _load_pickle(_PickleBytes(self._file, self._size, path, what), path, what, load_storage)

        magic = load("magic number pickle")
        if magic != _LEGACY_MAGIC_NUMBER:
            raise CheckpointError(
                f"{path}: not a PyTorch checkpoint (a pickle without torch's magic number)"
            )
        version = load("protocol version pickle")
        if version != _LEGACY_PROTOCOL_VERSION:
            raise CheckpointError(f"{path}: unsupported legacy protocol version {_short(version)}")
        sys_info = load("sys info pickle")
        if not isinstance(sys_info, dict):
            raise CheckpointError(f"{path}: corrupt sys info pickle ({type(sys_info).__name__})")
        table = _StorageTable(legacy=True)
        obj = load("main pickle", table)
        storage_keys = load("storage key pickle")
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
        if _DTYPES.get(ref.dtype) is None:
            raise CheckpointError(f"{self.path}: tensor '{key}' has unknown dtype {_short(ref.dtype)}")
        if ref.numel == 0:
            return
        itemsize = _DTYPES[ref.dtype].itemsize
        available = min(storage.nbytes, self._storage_bytes[storage.key][1])
        if ref.numel > available // itemsize:
            raise CheckpointError(
                f"{self.path}: tensor '{key}' (shape {ref.shape}, stride {ref.stride}) holds {ref.numel:,} "
                f"elements, more than the {available // itemsize:,} its storage {storage.key!r} has: an "
                "expanded (stride 0) or overlapping view; save a .contiguous() copy instead"
            )
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
        try:
            return self._read(ref, dt)
        except Exception as exc:  # e.g. the file shrank since it was opened, or memory ran out
            raise CheckpointError(f"{self.path}: tensor '{key}': cannot read ({_describe(exc)})") from exc

    def _read(self, ref: _TensorRef, dt: _DType) -> mx.array:
        if ref.numel == 0:
            return mx.zeros(ref.shape, dtype=dt.mlx)
        # "<" or "|" -> ">" for files saved on a big-endian machine (zip format only).
        np_dtype = np.dtype(dt.numpy)
        if self._byteorder == "big":
            np_dtype = np_dtype.newbyteorder(">")
        start = self._storage_bytes[ref.storage.key][0] + ref.offset * dt.itemsize
        mapped = np.memmap(self._file, dtype=np_dtype, mode="r", offset=start, shape=(ref.span(),))
        # A size-1 dimension's stride is never used: zero it, so a huge one cannot overflow numpy.
        strides = tuple(s * dt.itemsize if n > 1 else 0 for n, s in zip(ref.shape, ref.stride))
        values = np.lib.stride_tricks.as_strided(mapped, shape=ref.shape, strides=strides, writeable=False)
        if not values.dtype.isnative or ref.conjugate or ref.negative:
            values = values.astype(values.dtype.newbyteorder("="))  # a copy, converted in place below
            if ref.conjugate:
                np.conjugate(values, out=values)
            if ref.negative:
                if dt.name == "bfloat16":  # held as its bits: flip the sign bit
                    np.bitwise_xor(values, np.uint16(0x8000), out=values)
                else:
                    np.negative(values, out=values)
        # mx.array copies the (possibly strided) view once: the tensor's logical bytes.
        if dt.name == "bfloat16":
            array = mx.array(values, dtype=mx.uint16).view(mx.bfloat16)
        else:
            array = mx.array(values, dtype=dt.mlx)
        del mapped, values  # unmap the file now: mx.array copied the bytes
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
