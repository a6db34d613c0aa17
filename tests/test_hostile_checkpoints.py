"""Hostile and corrupt `torch.save` files (issue 11): each one runs in its own child (forked or spawned), under an
address-space or resident-memory limit and a timeout (see hostile_cases.py), and must end in a CheckpointError or in a
correct, bounded read; nothing may crash, hang, flood memory, raise another exception type, or change how
an honest file loads later in the same process. Then a seeded mutation fuzz of honest files, loads of
hub-style folders through `mlx_aim.load`, and the converter's command line.

The defect classes of the audit, one test function each: poisoning allow-listed globals with BUILD; C
stack overflow from deep tuples that get hashed; exponential walks over shared containers; memory floods
from tiny files (memo indices, zip bombs, expanded views, hash-colliding keys); foreign exception types.
Every case's file is built once per module, in this process; the cases run in one harness server.
Reproduce one case with `pytest tests/test_hostile_checkpoints.py -k NAME`: the module builds and runs
only the selected cases (a fuzz family reruns as a whole; its failures name seed, operation and offset).
"""

from __future__ import annotations

import bz2
import collections
import concurrent.futures
import functools
import importlib.util
import io
import json
import lzma
import os
import pickle
import random
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from checkpoint_crafting import Call as _Call  # noqa: E402
from checkpoint_crafting import RecordPickler as _RecordPickler  # noqa: E402
from checkpoint_crafting import Storage as _Storage  # noqa: E402
from checkpoint_crafting import global_op as _global  # noqa: E402
from checkpoint_crafting import split_legacy as _split_legacy  # noqa: E402
from checkpoint_crafting import text_op as _text  # noqa: E402
from checkpoint_crafting import torch_numpy as _torch_numpy  # noqa: E402
import hostile_cases  # noqa: E402  (tests/ is on sys.path, as for conftest)

ROOT = Path(__file__).resolve().parents[1]
TINY_HUB = {"img_size": 16, "patch_size": 4, "embed_dim": 64, "num_blocks": 4, "num_heads": 4}
GiB = 1 << 30
MiB = 1 << 20
# The inflated sizes of the zip bombs: past the children's 1.5 GiB address-space headroom, except LZMA,
# whose stream costs ~3 s per GiB to make (deflate and bzip2 streams are assembled from one block).
BOMB_BYTES = 3 * GiB
LZMA_BOMB_BYTES = 1 * GiB
DEEP = 1_000_000  # nesting of the deep tuples: far past the C stack (8 MB) when hashed recursively
FUZZ_MUTANTS = 120  # per family


# -- pickles by hand -----------------------------------------------------------------------------

PROTO2 = b"\x80\x02"
STOP = b"."


def _stack_global(module: str, name: str) -> bytes:  # protocol 4's STACK_GLOBAL
    return _text(module) + _text(name) + b"\x93"


def _ops(value) -> bytes:
    """The opcodes that push `value` (a plain value: no PROTO, no STOP)."""
    return pickle.dumps(value, protocol=2)[2:-1]


def _long_binput(index: int) -> bytes:
    return b"r" + struct.pack("<I", index)


def _long_binget(index: int) -> bytes:
    return b"j" + struct.pack("<I", index)


def _record_pickle(state) -> bytes:
    buffer = io.BytesIO()
    _RecordPickler(buffer, protocol=2).dump(state)
    return buffer.getvalue()


_STORAGE_CLASSES = {
    "float32": "FloatStorage", "float16": "HalfStorage", "float64": "DoubleStorage", "int64": "LongStorage",
    "int32": "IntStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
}


def _tensor(key: str, dtype: str, numel: int, offset, shape, stride, metadata=None, legacy=False):
    """A `_rebuild_tensor_v2` record on storage `key`, with any offset, shape, stride and metadata."""
    pid = ("storage", getattr(torch, _STORAGE_CLASSES[dtype]), key, "cpu", numel) + ((None,) if legacy else ())
    args = (_Storage(*pid), offset, tuple(shape), tuple(stride), False, collections.OrderedDict())
    return _Call(torch._utils._rebuild_tensor_v2, *args + ((metadata,) if metadata is not None else ()))


def _contiguous(shape) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


# -- zip archives by hand ------------------------------------------------------------------------


@dataclass
class _Member:
    """One archive member, its data as it lies in the file (already compressed for other methods)."""

    name: str
    data: bytes
    method: int = 0  # 0 stored, 8 deflate, 12 bzip2, 14 lzma, or anything
    crc: Optional[int] = None  # default: CRC-32 of `data` (right for stored members)
    size: Optional[int] = None  # declared uncompressed size, default len(data)
    flags: int = 0x800  # UTF-8 names, as torch.save writes


def _zip(members: list) -> bytes:
    """A zip archive (sizes under 4 GiB, so no zip64), written field by field: sizes, CRCs, flags and
    methods are whatever the members say, true or not."""
    out, central = bytearray(), bytearray()
    for m in members:
        name = m.name.encode()
        crc = zlib.crc32(m.data) if m.crc is None else m.crc
        size = len(m.data) if m.size is None else m.size
        version = {12: 46, 14: 63}.get(m.method, 20)
        flags = m.flags | (0x2 if m.method == 14 else 0)  # zipfile marks LZMA streams with an end marker
        offset = len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", version, flags, m.method, 0, 0x21, crc, len(m.data),
                           size, len(name), 0)
        out += name + m.data
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, version, flags, m.method, 0, 0x21, crc,
                               len(m.data), size, len(name), 0, 0, 0, 0, 0, offset)
        central += name
    directory = len(out)
    out += central
    out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), directory, 0)
    return bytes(out)


def _zip_members(data: bytes) -> list:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [_Member(info.filename, archive.read(info)) for info in archive.infolist()]


def _replace(members: list, suffix: str, **changes) -> list:
    """The members with the one whose name ends in `suffix` changed."""
    hits = [m for m in members if m.name.endswith(suffix)]
    assert len(hits) == 1, (suffix, [m.name for m in members])
    return [_Member(**{**m.__dict__, **changes}) if m is hits[0] else m for m in members]


def _state_zip(state, storages: dict, top: str = "archive") -> bytes:
    """A torch.save-shaped archive around a hand-made state (records from `_tensor`)."""
    members = [_Member(f"{top}/data.pkl", _record_pickle(state)), _Member(f"{top}/byteorder", b"little")]
    members += [_Member(f"{top}/data/{key}", data) for key, data in storages.items()]
    return _zip(members + [_Member(f"{top}/version", b"3\n")])


# -- compressed streams, and bombs assembled from one compressed block ---------------------------


def _deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


def _deflate_bomb(prefix: bytes, chunk: int, chunks: int, suffix: bytes) -> bytes:
    """Raw deflate of prefix + chunks * chunk zero bytes + suffix. After a full flush the compressor
    starts afresh, so every zero chunk compresses to the same bytes: one is made, then repeated."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert block == again
    return head + block * chunks + compressor.compress(suffix) + compressor.flush()


_BZ_BLOCK_MAGIC = 0x314159265359
_BZ_END_MAGIC = 0x177245385090


def _bz2_block(data: bytes) -> tuple:
    """(bits, bit count, CRC) of the one block bzip2 makes of `data` (a stream without its header and end)."""
    stream = bz2.compress(data, 9)
    total, value = len(stream) * 8, int.from_bytes(stream, "big")

    def bits(start, count):
        return (value >> (total - start - count)) & ((1 << count) - 1)

    assert bits(32, 48) == _BZ_BLOCK_MAGIC
    for pad in range(8):
        end = total - pad - 32 - 48
        if bits(end, 48) == _BZ_END_MAGIC and bits(end + 48, 32) == bits(80, 32):  # one block: same CRC
            return bits(32, end - 32), end - 32, bits(80, 32)
    raise AssertionError("bzip2 made more than one block")


def _bz2_stream(blocks: list) -> bytes:
    """One bzip2 stream of the given blocks (bit-aligned, so spliced as bits; the stream CRC combines)."""
    value, count, combined = int.from_bytes(b"BZh9", "big"), 32, 0
    for bits, length, crc in blocks:
        value, count = (value << length) | bits, count + length
        combined = (((combined << 1) | (combined >> 31)) & 0xFFFFFFFF) ^ crc
    value, count = (((value << 48) | _BZ_END_MAGIC) << 32) | combined, count + 80
    pad = -count % 8
    return (value << pad).to_bytes((count + pad) // 8, "big")


def _lzma_bomb(prefix: bytes, zeros: int, suffix: bytes) -> bytes:
    """What zipfile writes for an LZMA member (its 4-byte header, the filter properties, a raw LZMA1
    stream), made with the fastest settings: the properties say all a decoder needs."""
    lzma_filter = {"id": lzma.FILTER_LZMA1, "preset": 0}
    props = lzma._encode_filter_properties(lzma_filter)
    compressor = lzma.LZMACompressor(lzma.FORMAT_RAW, filters=[lzma_filter])
    parts = [struct.pack("<BBH", 9, 4, len(props)) + props, compressor.compress(prefix)]
    chunk = bytes(64 * MiB)
    for _ in range(zeros // len(chunk)):
        parts.append(compressor.compress(chunk))
    parts.append(compressor.compress(bytes(zeros % len(chunk)) + suffix))
    parts.append(compressor.flush())
    return b"".join(parts)


def _gf2_times(matrix: list, vector: int) -> int:
    total, row = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector, row = vector >> 1, row + 1
    return total


def _crc_after_zeros(crc: int, count: int) -> int:
    """zlib.crc32(bytes(count), crc) without touching gigabytes: the CRC register is linear in the zero
    bytes fed to it, so the operator for `count` of them is a 32x32 bit matrix raised by squaring
    (as zlib's crc32_combine does)."""
    register = crc ^ 0xFFFFFFFF
    operator = [0xEDB88320] + [1 << k for k in range(31)]  # one zero bit
    for _ in range(3):  # -> one zero byte
        operator = [_gf2_times(operator, row) for row in operator]
    while count:
        if count & 1:
            register = _gf2_times(operator, register)
        operator = [_gf2_times(operator, row) for row in operator]
        count >>= 1
    return register ^ 0xFFFFFFFF


class _Bomb:
    """A member's content, prefix + `zeros` zero bytes + suffix, as a deflate, bzip2 or lzma stream."""

    CHUNK = 32 * MiB  # zero bytes per bzip2 block (one block: 658 kB after bzip2's run-length step)

    def __init__(self, prefix: bytes, zeros: int, suffix: bytes = b""):
        assert zeros % self.CHUNK == 0
        self.prefix, self.zeros, self.suffix = prefix, zeros, suffix
        self.size = len(prefix) + zeros + len(suffix)
        self.crc = zlib.crc32(suffix, _crc_after_zeros(zlib.crc32(prefix), zeros))
        self._streams: dict = {}

    def prefetch(self, method: int, pool: concurrent.futures.Executor) -> None:
        if method not in self._streams:
            self._streams[method] = pool.submit(self._make, method)

    def stream(self, method: int) -> bytes:
        if method not in self._streams:
            self._streams[method] = self._make(method)
        made = self._streams[method]
        return made.result() if isinstance(made, concurrent.futures.Future) else made

    def _make(self, method: int) -> bytes:
        if method == 8:
            return _deflate_bomb(self.prefix, self.CHUNK, self.zeros // self.CHUNK, self.suffix)
        if method == 12:
            blocks = [_bz2_block(self.prefix)] + [_bz2_zero_block()] * (self.zeros // self.CHUNK)
            return _bz2_stream(blocks + ([_bz2_block(self.suffix)] if self.suffix else []))
        assert method == 14
        return _lzma_bomb(self.prefix, self.zeros, self.suffix)


@functools.lru_cache(maxsize=None)
def _bz2_zero_block() -> tuple:
    return _bz2_block(bytes(_Bomb.CHUNK))


def test_bomb_streams_inflate_to_what_they_claim():
    # The assembled streams, small: the same code makes the gigabyte ones.
    prefix, suffix, chunk = b"\x80\x02X\x00\x00\x10\x00", b".", 1 * MiB
    expected = prefix + bytes(3 * chunk) + suffix
    assert zlib.decompress(_deflate_bomb(prefix, chunk, 3, suffix), -15) == expected
    zero = _bz2_block(bytes(chunk))
    stream = _bz2_stream([_bz2_block(prefix), zero, zero, zero, _bz2_block(suffix)])
    assert bz2.decompress(stream) == expected
    lzma_member = _lzma_bomb(prefix, 3 * chunk, suffix)
    props_size = struct.unpack("<H", lzma_member[2:4])[0]
    lzma_filter = lzma._decode_filter_properties(lzma.FILTER_LZMA1, lzma_member[4 : 4 + props_size])
    decoded = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[lzma_filter]).decompress(lzma_member[4 + props_size:])
    assert decoded == expected
    for count in (0, 1, 7, 3 * chunk + 5):
        assert _crc_after_zeros(zlib.crc32(prefix), count) == zlib.crc32(bytes(count), zlib.crc32(prefix))


# -- honest files --------------------------------------------------------------------------------


def _honest_state_dict(legacy: bool):
    gen = torch.Generator().manual_seed(0)
    # A module's state dict: an OrderedDict whose `_metadata` pickle sets with BUILD. Its values come from
    # `gen` (not the global RNG), so that the files, and the fuzz's mutants of them, are the same every run.
    module = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4))
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=gen))
    state_dict = module.state_dict()
    big = torch.randn(6, 8, generator=gen)
    extra = {
        "f32_special": torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, 3.4e38]),
        "f16": torch.randn(3, 4, generator=gen).half(),
        "bf16": torch.randn(5, 3, generator=gen).bfloat16(),
        "f64": torch.randn(4, generator=gen).double(),
        "i64": torch.tensor([-(2**63), -1, 0, 1, 2**63 - 1, 123456789012]),
        "i32": torch.tensor([-(2**31), 7, 2**31 - 1], dtype=torch.int32),
        "i8": torch.tensor([-128, 5, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 200, 255], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "view": big[2:, 1::3],  # a storage offset and strides
        "transposed": big.t(),
        # PyTorch's lazy negative bit, saved as metadata {'neg': True} on the stored (positive) values.
        "neg_f32": torch._neg_view(torch.randn(4, generator=gen)),
        "neg_i64": torch._neg_view(torch.arange(-2, 3)),
        "neg_bf16": torch._neg_view(torch.randn(3, generator=gen).bfloat16()),
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=gen)),
        "empty": torch.zeros(0, 3),
        "block": {"weight": torch.randn(2, 2, generator=gen), "bias": torch.zeros(2)},
    }
    if not legacy:  # the legacy format cannot hold uint16 (torch 2.13); the zip format writes _rebuild_tensor_v3
        extra["u16"] = torch.tensor([1, 65535, 7], dtype=torch.int32).to(torch.uint16)
    state_dict.update(extra)
    assert state_dict["neg_f32"].is_neg() and state_dict["neg_i64"].is_neg()
    return state_dict


def _expected(path) -> dict:
    """key -> (dtype name, values) as torch.load reads the file, flattened as the reader names keys."""
    out = {}
    for key, value in torch.load(path, weights_only=True).items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, tensor in items:
            out[key if sub is None else f"{key}.{sub}"] = (str(tensor.dtype).split(".")[-1], _torch_numpy(tensor))
    return out


# -- the cases -----------------------------------------------------------------------------------


@dataclass
class _Case:
    group: str
    build: Callable  # (workshop) -> path
    expect: str = "error"  # "error": a CheckpointError; "ok": success; "either"
    action: str = "open"  # or "load": mlx_aim.load on a hub-style folder
    values: Optional[Callable] = None  # (workshop) -> {key: array}: checked where a read succeeds
    max_cpu_seconds: Optional[float] = None  # CPU time, which load on the machine does not stretch


CASES: dict = {}


def _case(group, name, build, expect="error", action="open", values=None, max_cpu_seconds=None):
    assert name not in CASES, name
    CASES[name] = _Case(group, build, expect, action, values, max_cpu_seconds)


@dataclass
class _Workshop:
    """Where the case files are made: the honest files, their parts, and helpers to write variants."""

    root: Path
    honest_zip: Path = None
    honest_legacy: Path = None
    marker: Path = None
    _bombs: dict = field(default_factory=dict)

    def write(self, name: str, data: bytes) -> str:
        path = self.root / f"{name}.pth"
        path.write_bytes(data)
        return str(path)

    def zip_members(self) -> list:
        return _zip_members(self.honest_zip.read_bytes())

    def zip_with(self, pickle_bytes: bytes, method: int = 0) -> bytes:
        """The honest archive with its data.pkl replaced (and compressed with `method`)."""
        data = {0: pickle_bytes, 8: _deflate(pickle_bytes)}[method]
        members = _replace(self.zip_members(), "/data.pkl", data=data, method=method, crc=zlib.crc32(pickle_bytes),
                           size=len(pickle_bytes))
        return _zip(members)

    def with_data_pkl(self, name: str, pickle_bytes: bytes, method: int = 0) -> str:
        return self.write(name, self.zip_with(pickle_bytes, method))

    def legacy_with(self, name: str, index: int, pickle_bytes: bytes) -> str:
        """The honest legacy stream with its pickle number `index` (0 magic, 1 version, 2 sys info, 4 storage
        keys) replaced. (A hand-made main pickle goes into `legacy_stream`, with storage keys to match.)"""
        pickles, storages = _split_legacy(self.honest_legacy.read_bytes())
        pickles[index] = pickle_bytes
        return self.write(name, b"".join(pickles) + storages)

    def payload(self) -> bytes:
        """Opcodes that call os.system (the file must be refused, and this never runs)."""
        return _global(os.system.__module__, "system") + b"(" + _text(f"touch '{self.marker}'") + b"tR"

    def legacy_stream(self, main_pickle: bytes, storages: dict = None) -> bytes:
        """A legacy stream around a hand-made main pickle; storages: key -> (raw bytes, element count)."""
        storages = storages or {}
        head = [pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2), pickle.dumps(1001, protocol=2),
                pickle.dumps({"protocol_version": 1001, "little_endian": True,
                              "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)]
        tail = pickle.dumps(list(storages), protocol=2)
        body = b"".join(struct.pack("<q", numel) + data for data, numel in storages.values())
        return b"".join(head) + main_pickle + tail + body

    def hub_folder(self, name: str, weights: bytes) -> str:
        folder = self.root / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(TINY_HUB))
        (folder / "pytorch_model.bin").write_bytes(weights)
        return str(folder)

    def bomb(self, prefix: bytes, zeros: int, suffix: bytes = b"") -> _Bomb:
        key = (prefix, zeros, suffix)
        if key not in self._bombs:
            self._bombs[key] = _Bomb(prefix, zeros, suffix)
        return self._bombs[key]


# 1. Poisoning: BUILD on an allow-listed global changes the object every later load resolves to.

_NEG = ({"neg": True},)
_POISONS = {
    # target global, BUILD state
    "v2_defaults_neg": (_global("torch._utils", "_rebuild_tensor_v2"), (None, {"__defaults__": _NEG})),
    "v2_defaults_garbage": (_global("torch._utils", "_rebuild_tensor_v2"), (None, {"__defaults__": ("x",)})),
    "v2_kwdefaults": (_global("torch._utils", "_rebuild_tensor_v2"),
                      (None, {"__kwdefaults__": {"metadata": {"neg": True}}})),
    "v2_code": (_global("torch._utils", "_rebuild_tensor_v2"), (None, {"__code__": 0})),
    "v2_dict_entry": (_global("torch._utils", "_rebuild_tensor_v2"), {"__wrapped__": 1, "poisoned": True}),
    "v2_name": (_global("torch._utils", "_rebuild_tensor_v2"), (None, {"__qualname__": "x", "__name__": "y"})),
    "v2_stack_global": (_stack_global("torch._utils", "_rebuild_tensor_v2"), (None, {"__defaults__": _NEG})),
    "v3_defaults_neg": (_global("torch._utils", "_rebuild_tensor_v3"), (None, {"__defaults__": _NEG})),
    "parameter_defaults": (_global("torch._utils", "_rebuild_parameter"),
                           (None, {"__defaults__": (False, collections.OrderedDict())})),
    "ordered_dict_slots": (_global("collections", "OrderedDict"), (None, {"fromkeys": None})),
    "ordered_dict_dict": (_global("collections", "OrderedDict"), {"fromkeys": None}),
    "float_storage_slots": (_global("torch", "FloatStorage"), (None, {"dtype": "float64"})),
    "float_storage_dict": (_global("torch", "FloatStorage"), {"dtype": "int32"}),
    "bfloat16_storage": (_global("torch", "BFloat16Storage"), (None, {"dtype": "float16"})),
    "untyped_storage": (_global("torch.storage", "UntypedStorage"), (None, {"dtype": "int8"})),
    "float32_dtype": (_global("torch", "float32"), (None, {"name": "int32"})),
    "uint16_dtype": (_global("torch", "uint16"), (None, {"name": "int16"})),
}


def _poison_ops(name: str) -> bytes:
    target, state = _POISONS[name]
    return target + _ops(state) + b"b0"  # BUILD, then POP the poisoned object


def _poison_then_payload(name):
    def build(w: _Workshop):
        proto = b"\x80\x04" if name == "v2_stack_global" else PROTO2
        return w.with_data_pkl(f"poison_{name}", proto + _poison_ops(name) + w.payload() + STOP)
    return build


for _name in _POISONS:
    _case("poisoning", _name, _poison_then_payload(_name))


def _poison_then_honest(name):
    # No payload: the rest of data.pkl is the honest state dict (memo indices are put again before use).
    def build(w: _Workshop):
        honest_pickle = [m for m in w.zip_members() if m.name.endswith("/data.pkl")][0].data
        return w.with_data_pkl(f"poison_{name}_honest", PROTO2 + _poison_ops(name) + honest_pickle[2:])
    return build


for _name in ("v2_defaults_neg", "v2_defaults_garbage", "v3_defaults_neg", "float_storage_slots", "float32_dtype"):
    _case("poisoning", f"{_name}_then_honest_state_dict", _poison_then_honest(_name), expect="either")

_case("poisoning", "legacy_v2_defaults_neg",
      lambda w: w.write("poison_legacy", w.legacy_stream(PROTO2 + _poison_ops("v2_defaults_neg") + w.payload() + STOP)))
_case("poisoning", "legacy_float_storage",
      lambda w: w.write("poison_legacy_fs", w.legacy_stream(
          PROTO2 + _poison_ops("float_storage_slots") + w.payload() + STOP)))


# 2. C stack overflow: hashing a tuple nested a million deep recurses in C.

_DEEP_TUPLE = b")" + b"\x85" * DEEP  # EMPTY_TUPLE, then TUPLE1 a million times
_DEEP_KEY_DICT = PROTO2 + b"}" + _DEEP_TUPLE + _text("v") + b"s" + STOP  # {deep: "v"}

_case("stack", "deep_tuple_key_deflated", lambda w: w.with_data_pkl("deep_key_deflated", _DEEP_KEY_DICT, method=8))
_case("stack", "deep_tuple_key_stored", lambda w: w.with_data_pkl("deep_key_stored", _DEEP_KEY_DICT))
_case("stack", "deep_tuple_key_legacy", lambda w: w.write("deep_key_legacy", w.legacy_stream(_DEEP_KEY_DICT)))
_case("stack", "deep_tuple_key_legacy_sys_info", lambda w: w.legacy_with("deep_key_sys_info", 2, _DEEP_KEY_DICT))
_case("stack", "deep_tuple_key_nested", lambda w: w.with_data_pkl(
    "deep_key_nested", PROTO2 + b"}" + _text("model") + b"}" + _DEEP_TUPLE + b"K\x01ss" + STOP, method=8))
# {"w": {deep}} and {"w": frozenset({deep})} (protocol 4's EMPTY_SET/ADDITEMS and FROZENSET)
_case("stack", "deep_tuple_in_set", lambda w: w.with_data_pkl(
    "deep_set", b"\x80\x04}" + _text("w") + b"\x8f(" + _DEEP_TUPLE + b"\x90s" + STOP, method=8))
_case("stack", "deep_tuple_in_frozenset", lambda w: w.with_data_pkl(
    "deep_frozenset", b"\x80\x04}" + _text("w") + b"(" + _DEEP_TUPLE + b"\x91s" + STOP, method=8))
# Deep values that nothing hashes: freeing them and walking them must not overflow either.
_case("stack", "deep_tuple_value", lambda w: w.with_data_pkl(
    "deep_value", PROTO2 + b"}" + _text("w") + _DEEP_TUPLE + b"s" + STOP, method=8))
_case("stack", "deep_list_value", lambda w: w.with_data_pkl(
    "deep_list", PROTO2 + b"}" + _text("w") + b"]" * DEEP + b"a" * (DEEP - 1) + b"s" + STOP, method=8))


# 3. Exponential walks: level k holds level k-1 twice (shared through the memo), 2**levels leaves.

def _doubling_tuples(levels: int, leaf: bytes = b"]") -> bytes:
    return leaf + b"2\x86" * levels  # DUP, TUPLE2


def _doubling_lists(levels: int, leaf: bytes = b"](K\x01e") -> bytes:
    ops = leaf
    for k in range(levels):  # memo it, pop it, then [it, it] through BINGET
        ops += _long_binput(k) + b"0](" + _long_binget(k) * 2 + b"e"
    return ops


def _doubling_dicts(levels: int, leaf: bytes = b"}") -> bytes:
    ops = leaf
    for k in range(levels):
        ops += _long_binput(k) + b"0}(" + _text("a") + _long_binget(k) + _text("b") + _long_binget(k) + b"u"
    return ops


def _one_tensor_storage() -> dict:
    return {"0": np.arange(2, dtype=np.float32).tobytes()}


def _tensor_ops(legacy=False) -> bytes:
    """The opcodes of a 2-element float tensor record on storage '0'. Its memo entries are used within
    these opcodes only, so the doubling levels may put theirs over them."""
    return _record_pickle(_tensor("0", "float32", 2, 0, (2,), (1,), legacy=legacy))[2:-1]


def _state_with(value_ops: bytes, wrap: Optional[str] = None) -> bytes:
    inner = b"}" + _text("w") + value_ops + b"s"
    return PROTO2 + (b"}" + _text(wrap) + inner + b"s" if wrap else inner) + STOP


_case("exponential", "tuples_dup_40", lambda w: w.with_data_pkl("expo_tuples", _state_with(_doubling_tuples(40))),
      expect="either")
_case("exponential", "lists_binget_36", lambda w: w.with_data_pkl("expo_lists", _state_with(_doubling_lists(36))),
      expect="either")
_case("exponential", "dicts_binget_32", lambda w: w.with_data_pkl("expo_dicts", _state_with(_doubling_dicts(32))),
      expect="either")
_case("exponential", "dicts_wrapped_model_32",
      lambda w: w.with_data_pkl("expo_wrapped", _state_with(_doubling_dicts(32), wrap="model")), expect="either")
_case("exponential", "tensor_leaves_30", lambda w: w.write("expo_tensor", _zip([
    _Member("archive/data.pkl", _state_with(_doubling_lists(30, leaf=b"](" + _tensor_ops() + b"e"))),
    _Member("archive/byteorder", b"little"), _Member("archive/data/0", _one_tensor_storage()["0"]),
    _Member("archive/version", b"3\n")])), expect="either")
_case("exponential", "tensor_leaves_dicts_30", lambda w: w.write("expo_tensor_dicts", _zip([
    _Member("archive/data.pkl", _state_with(_doubling_dicts(30, leaf=b"}" + _text("t") + _tensor_ops() + b"s"))),
    _Member("archive/byteorder", b"little"), _Member("archive/data/0", _one_tensor_storage()["0"]),
    _Member("archive/version", b"3\n")])), expect="either")
_case("exponential", "legacy_tuples_dup_40",
      lambda w: w.write("expo_legacy", w.legacy_stream(_state_with(_doubling_tuples(40)))), expect="either")


# 4a. Memory floods through the memo: CPython's memo is an array as long as the largest index put.

def _memo_case(name, ops: bytes, legacy_index: Optional[int] = None):
    pickle_bytes = PROTO2 + b"}" + ops + STOP

    def build(w: _Workshop):
        if legacy_index == 3:
            return w.write(f"memo_{name}", w.legacy_stream(pickle_bytes))
        if legacy_index is not None:
            return w.legacy_with(f"memo_{name}", legacy_index, pickle_bytes)
        return w.with_data_pkl(f"memo_{name}", pickle_bytes)

    _case("memory", f"memo_{name}", build)


_memo_case("long_binput_2p28", _long_binput(1 << 28))
_memo_case("long_binput_2p26", _long_binput(1 << 26))
_memo_case("long_binput_2p25", _long_binput(1 << 25))
_memo_case("put_text_2p27", b"p134217728\n")
_memo_case("ladder", b"".join(_long_binput(1 << k) for k in range(16, 28)))
_memo_case("legacy_magic_long_binput_2p27", _long_binput(1 << 27), legacy_index=0)
_memo_case("legacy_main_long_binput_2p26", _long_binput(1 << 26), legacy_index=3)
_case("memory", "memo_memoize_4M", lambda w: w.with_data_pkl(
    "memo_memoize", b"\x80\x04}" + b"\x94" * (4 << 20) + STOP, method=8), expect="either")
_case("memory", "memo_get_missing", lambda w: w.with_data_pkl("memo_get", PROTO2 + _long_binget(1 << 30) + STOP))


# 4b. Zip bombs: members that inflate to gigabytes from a few kB (or MB for deflate, ~1000:1 at best).

_METHODS = {"deflate": 8, "bzip2": 12, "lzma": 14}


def _bomb_zip(w: _Workshop, name: str, suffix: str, bomb: _Bomb, method: int, declared: Optional[int] = None,
              crc: Optional[int] = None) -> str:
    members = _replace(w.zip_members(), suffix, data=bomb.stream(method), method=method,
                       size=bomb.size if declared is None else declared, crc=bomb.crc if crc is None else crc)
    return w.write(name, _zip(members))


def _bomb_bytes(method: int) -> int:
    return LZMA_BOMB_BYTES if method == 14 else BOMB_BYTES


def _pickle_bomb(w: _Workshop, method: int) -> _Bomb:
    # PROTO 2, BINUNICODE of (almost) the whole member, STOP: the unpickler asks for it in one read.
    return w.bomb(PROTO2 + b"X" + struct.pack("<I", _bomb_bytes(method)), _bomb_bytes(method), STOP)


def _little_bomb(w: _Workshop, method: int) -> _Bomb:
    # "little" and zeros: byteorder's content first; as a storage or version it is just as good.
    return w.bomb(b"little", _bomb_bytes(method))


def _prefetch_lzma_bombs(w: _Workshop, pool) -> None:
    for bomb in (_pickle_bomb(w, 14), _little_bomb(w, 14)):
        bomb.prefetch(14, pool)


for _method_name, _method in _METHODS.items():
    _case("memory", f"bomb_data_pkl_{_method_name}", lambda w, m=_method, n=_method_name: _bomb_zip(
        w, f"bomb_pkl_{n}", "/data.pkl", _pickle_bomb(w, m), m))
    # The declared size lies (1 MiB, with the CRC of the first MiB): the stream inflates far past it.
    _case("memory", f"bomb_data_pkl_{_method_name}_size_lies", lambda w, m=_method, n=_method_name: _bomb_zip(
        w, f"bomb_pkl_lie_{n}", "/data.pkl", _pickle_bomb(w, m), m, declared=MiB,
        crc=_crc_after_zeros(zlib.crc32(_pickle_bomb(w, m).prefix), MiB - len(_pickle_bomb(w, m).prefix))))
    _case("memory", f"bomb_byteorder_{_method_name}", lambda w, m=_method, n=_method_name: _bomb_zip(
        w, f"bomb_byteorder_{n}", "/byteorder", _little_bomb(w, m), m))
    # Declared as 16 bytes: "little" and ten NULs, which no reader may take for a byte order.
    _case("memory", f"bomb_byteorder_{_method_name}_size_lies", lambda w, m=_method, n=_method_name: _bomb_zip(
        w, f"bomb_byteorder_lie_{n}", "/byteorder", _little_bomb(w, m), m, declared=16,
        crc=zlib.crc32(b"little" + bytes(10))))
    _case("memory", f"bomb_storage_{_method_name}", lambda w, m=_method, n=_method_name: _bomb_zip(
        w, f"bomb_storage_{n}", "/data/0", _little_bomb(w, m), m))
    # torch.load never reads `version` beyond a few bytes; a reader may ignore it, but not inflate it.
    _case("memory", f"bomb_version_{_method_name}", lambda w, m=_method, n=_method_name: _bomb_zip(
        w, f"bomb_version_{n}", "/version", _little_bomb(w, m), m),
        expect="either")


# 4c. Views that expand a tiny storage: stride 0, or rows overlapping by all but one element.

def _view_zip(w: _Workshop, name: str, dtype: str, numel: int, shape, stride, legacy=False) -> str:
    storage = np.arange(numel).astype(dtype).tobytes()
    record = _tensor("0", dtype, numel, 0, shape, stride, legacy=legacy)
    if legacy:
        itemsize = np.dtype(dtype).itemsize
        return w.write(name, w.legacy_stream(_record_pickle({"w": record}), {"0": (storage, len(storage) // itemsize)}))
    return w.write(name, _state_zip({"w": record}, {"0": storage}))


def _view_values(dtype, numel, shape, stride):
    base = np.arange(numel).astype(dtype)
    itemsize = base.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(base, shape=shape, strides=[s * itemsize for s in stride])
    return lambda w: {"w": np.ascontiguousarray(view)}


_VIEWS = {
    # name: dtype, storage elements, shape, stride; expect either: refused, or read exactly within the bounds
    "stride0_1e10": ("float32", 1, (100_000, 100_000), (0, 0)),
    "stride0_rows_1GiB": ("float32", 256, (1 << 20, 256), (0, 1)),
    "stride0_int64_3d": ("int64", 4, (1 << 14, 1 << 14, 4), (0, 0, 1)),
    "overlap_400MB": ("float32", 100_999, (100_000, 1000), (1, 1)),
    "overlap_1GB_int64": ("int64", 125_999, (125_000, 1000), (1, 1)),
    "stride0_small": ("float32", 16, (3, 16), (0, 1)),  # what `expand` saves: small, must read exactly if read
    "overlap_small": ("float32", 6, (4, 3), (1, 1)),
}
for _name, (_dtype, _numel, _shape, _stride) in _VIEWS.items():
    _small = int(np.prod(_shape)) < 1000
    _case("memory", f"view_{_name}", lambda w, a=(_dtype, _numel, _shape, _stride), n=_name: _view_zip(
        w, f"view_{n}", *a), expect="either", values=_view_values(_dtype, _numel, _shape, _stride) if _small else None)
_case("memory", "view_legacy_stride0_1e10", lambda w: _view_zip(
    w, "view_legacy", "float32", 1, (100_000, 100_000), (0, 0), legacy=True), expect="either")


# 4d. Hash floods: CPython hashes an int modulo 2**61 - 1, so these keys all land in one bucket chain.

# 48,000 keys (670 kB) took the old reader 27 s on the development machine, quadratic in the count; the
# audit's 186 kB file, 16,000 keys here, 2.6 s. Honest work on such a file takes well under a second.
_COLLISIONS = 48_000
_HASH_SECONDS = 5.0


def _colliding(n: int = _COLLISIONS, sign: int = 1) -> list:
    return [sign * (12345 + i * ((1 << 61) - 1)) for i in range(n)]


def _dict_ops(keys: list, wrap=lambda k: _ops(k)) -> bytes:
    ops = [b"}"]
    for start in range(0, len(keys), 1000):  # SETITEMS in batches, as pickle writes them
        ops.append(b"(" + b"".join(wrap(k) + b"K\x00" for k in keys[start : start + 1000]) + b"u")
    return b"".join(ops)


def _hash_case(name, build):
    _case("memory", name, build, expect="either", max_cpu_seconds=_HASH_SECONDS)


_hash_case("hash_int_keys", lambda w: w.with_data_pkl("hash_keys", PROTO2 + _dict_ops(_colliding()) + STOP))
_case("memory", "hash_int_keys_audit_size", lambda w: w.with_data_pkl(
    "hash_keys_16k", PROTO2 + _dict_ops(_colliding(16_000)) + STOP), expect="either", max_cpu_seconds=1.5)
_hash_case("hash_negative_int_keys", lambda w: w.with_data_pkl(
    "hash_negative", PROTO2 + _dict_ops(_colliding(sign=-1)) + STOP))
_hash_case("hash_tuple_keys", lambda w: w.with_data_pkl(
    "hash_tuples", PROTO2 + _dict_ops(_colliding(), wrap=lambda k: _ops(k) + b"\x85") + STOP))
_hash_case("hash_nested_keys", lambda w: w.with_data_pkl(
    "hash_nested", PROTO2 + b"}" + _text("model") + _dict_ops(_colliding()) + b"s" + STOP))
_hash_case("hash_frozenset", lambda w: w.with_data_pkl(
    "hash_frozenset", b"\x80\x04}" + _text("w") + b"(" + b"".join(_ops(k) for k in _colliding()) + b"\x91s" + STOP))
_hash_case("hash_legacy_int_keys", lambda w: w.write(
    "hash_legacy", w.legacy_stream(PROTO2 + _dict_ops(_colliding()) + STOP)))


# 5. Foreign exception types: each must surface as a CheckpointError.

def _flag_encrypted(w: _Workshop, name: str, suffix: str) -> str:
    members = w.zip_members()
    hit = [m for m in members if m.name.endswith(suffix)][0]
    return w.write(name, _zip(_replace(members, suffix, flags=hit.flags | 0x1)))


_case("foreign", "zip_encrypted_data_pkl", lambda w: _flag_encrypted(w, "encrypted_pkl", "/data.pkl"))
_case("foreign", "zip_encrypted_byteorder", lambda w: _flag_encrypted(w, "encrypted_byteorder", "/byteorder"))
_case("foreign", "zip_encrypted_storage", lambda w: _flag_encrypted(w, "encrypted_storage", "/data/0"))

_LZMA_HEADER = struct.pack("<BBH", 9, 4, 5) + lzma._encode_filter_properties({"id": lzma.FILTER_LZMA1})


def _compressed_member(w: _Workshop, name: str, suffix: str, method: int, data: bytes) -> str:
    original = [m for m in w.zip_members() if m.name.endswith(suffix)][0].data
    members = _replace(w.zip_members(), suffix, data=data, method=method, crc=zlib.crc32(original),
                       size=len(original))
    return w.write(name, _zip(members))


_GARBAGE = bytes(random.Random(11).randrange(256) for _ in range(256))
_case("foreign", "lzma_garbage_data_pkl", lambda w: _compressed_member(
    w, "lzma_garbage_pkl", "/data.pkl", 14, _LZMA_HEADER + _GARBAGE))
_case("foreign", "lzma_garbage_byteorder", lambda w: _compressed_member(
    w, "lzma_garbage_byteorder", "/byteorder", 14, _LZMA_HEADER + _GARBAGE))
_case("foreign", "lzma_bad_properties", lambda w: _compressed_member(
    w, "lzma_bad_props", "/data.pkl", 14, struct.pack("<BBH", 9, 4, 5) + b"\xff" * 5 + _GARBAGE))
_case("foreign", "lzma_truncated_data_pkl", lambda w: _compressed_member(
    w, "lzma_truncated", "/data.pkl", 14, _lzma_bomb(b"", 32 * MiB, b"")[:200]))
_case("foreign", "bzip2_garbage_data_pkl", lambda w: _compressed_member(
    w, "bzip2_garbage", "/data.pkl", 12, b"BZh9" + _GARBAGE))
_case("foreign", "deflate_garbage_data_pkl", lambda w: _compressed_member(
    w, "deflate_garbage", "/data.pkl", 8, _GARBAGE))
_case("foreign", "unknown_method_data_pkl", lambda w: _compressed_member(
    w, "method_99", "/data.pkl", 99, _GARBAGE))


def _flipped_name(w: _Workshop, name: str, suffix: str, where: str) -> str:
    """A real torch.save file with one byte of a member's name made 0xff (invalid UTF-8; the UTF-8 flag
    is set) in its local header, its central directory entry, or both."""
    data = bytearray(w.honest_zip.read_bytes())
    member = [m for m in w.zip_members() if m.name.endswith(suffix)][0].name.encode()
    flip = len(member) - len(suffix) + 1  # the first byte after the top folder's "/"
    changed = 0
    for signature, name_at in ((b"PK\x03\x04", 30), (b"PK\x01\x02", 46)):
        if (signature == b"PK\x03\x04") != (where in ("local", "both")) and where != "both":
            continue
        start = 0
        while (start := data.find(signature, start)) >= 0:
            if data[start + name_at : start + name_at + len(member)] == member:
                data[start + name_at + flip] = 0xFF
                changed += 1
            start += 4
    assert changed == (2 if where == "both" else 1), (name, changed)
    return w.write(name, bytes(data))


for _where in ("local", "central", "both"):
    _case("foreign", f"name_not_utf8_{_where}_data_pkl",
          lambda w, x=_where: _flipped_name(w, f"name_{x}_pkl", "/data.pkl", x))
    _case("foreign", f"name_not_utf8_{_where}_storage",
          lambda w, x=_where: _flipped_name(w, f"name_{x}_storage", "/data/0", x))

_HUGE_INT = 10**5000  # past CPython's 4300-digit limit for int -> str
_case("foreign", "int_key_5000_digits", lambda w: w.with_data_pkl(
    "int_key", PROTO2 + b"}" + _ops(_HUGE_INT) + b"K\x01s" + STOP))
_case("foreign", "int_key_5000_digits_with_tensor", lambda w: w.write("int_key_tensor", _zip([
    _Member("archive/data.pkl", PROTO2 + b"}" + _ops(_HUGE_INT) + _tensor_ops() + b"s" + STOP),
    _Member("archive/byteorder", b"little"), _Member("archive/data/0", _one_tensor_storage()["0"]),
    _Member("archive/version", b"3\n")])))
_case("foreign", "int_key_5000_digits_nested", lambda w: w.with_data_pkl(
    "int_key_nested", PROTO2 + b"}" + _text("model") + b"}" + _ops(-_HUGE_INT) + b"K\x01ss" + STOP))
_case("foreign", "legacy_version_5000_digits", lambda w: w.legacy_with("legacy_version", 1, pickle.dumps(_HUGE_INT, 2)))
_case("foreign", "legacy_magic_5000_digits", lambda w: w.legacy_with("legacy_magic", 0, pickle.dumps(_HUGE_INT, 2)))
_case("foreign", "legacy_storage_key_5000_digits", lambda w: w.legacy_with(
    "legacy_keys", 4, pickle.dumps([_HUGE_INT], 2)))
# A plain huge number among the values is not a key: skipping it is as fine as refusing the file.
_case("foreign", "int_value_5000_digits", lambda w: w.with_data_pkl(
    "int_value", PROTO2 + b"}" + _text("epoch") + _ops(_HUGE_INT) + b"s" + STOP), expect="either")


def _record_zip(w: _Workshop, name: str, dtype: str, numel: int, offset, shape, stride, metadata=None) -> str:
    storage = np.ones(numel, dtype=dtype).tobytes()
    return w.write(name, _state_zip({"w": _tensor("0", dtype, numel, offset, shape, stride, metadata)},
                                    {"0": storage}))


_RECORDS = {
    "stride_2p70_one_element": ("float32", 4, 0, (1,), (1 << 70,)),
    "stride_2p70_two_elements": ("float32", 4, 0, (2,), (1 << 70,)),
    "stride_2p63_empty": ("float32", 4, 0, (0, 2), (1 << 63, 1)),
    "offset_2p70": ("float32", 4, 1 << 70, (1,), (1,)),
    "offset_2p70_empty": ("float32", 4, 1 << 70, (0,), (1,)),
    "zero_size_dim_2p31": ("float32", 4, 0, (0, 1 << 31), (1, 1)),
    "zero_size_dim_2p63": ("float32", 4, 0, (1 << 63, 0), (1, 1)),
    "zero_size_dim_2p100": ("float32", 4, 0, (0, 1 << 100), (1, 1)),
    "dims_65": ("float32", 4, 0, (1,) * 65, (1,) * 65),
    "dims_65_empty": ("float32", 4, 0, (0,) + (1,) * 64, (1,) * 65),
    "dims_1000": ("float32", 4, 0, (1,) * 1000, (1,) * 1000),
}
for _name, _args in _RECORDS.items():
    _case("foreign", _name, lambda w, a=_args, n=_name: _record_zip(w, f"record_{n}", *a))
_case("foreign", "bool_negative_bit", lambda w: _record_zip(w, "bool_neg", "bool", 4, 0, (4,), (1,), {"neg": True}))
_case("foreign", "bool_negative_bit_legacy", lambda w: w.write("bool_neg_legacy", w.legacy_stream(
    _record_pickle({"w": _tensor("0", "bool", 4, 0, (4,), (1,), {"neg": True}, legacy=True)}),
    {"0": (np.ones(4, bool).tobytes(), 4)})))
_case("foreign", "bool_conjugate_bit", lambda w: _record_zip(w, "bool_conj", "bool", 4, 0, (4,), (1,),
                                                              {"conj": True}), expect="either")

# Lengths of 2**62: CPython allocates the bytes object before reading them (a bare MemoryError).
_BIG_LENGTH = struct.pack("<Q", 1 << 62)
_case("foreign", "memory_error_binbytes8", lambda w: w.with_data_pkl("binbytes8", b"\x80\x04\x8e" + _BIG_LENGTH + STOP))
_case("foreign", "memory_error_binunicode8", lambda w: w.with_data_pkl(
    "binunicode8", b"\x80\x04\x8d" + _BIG_LENGTH + STOP))
_case("foreign", "memory_error_bytearray8", lambda w: w.with_data_pkl(
    "bytearray8", b"\x80\x05\x96" + _BIG_LENGTH + STOP))
_case("foreign", "memory_error_legacy_magic_binbytes8", lambda w: w.legacy_with(
    "legacy_binbytes8", 0, b"\x80\x04\x8e" + _BIG_LENGTH + STOP))
_case("foreign", "memory_error_legacy_sys_info_binbytes8", lambda w: w.legacy_with(
    "legacy_sys_binbytes8", 2, b"\x80\x04\x8e" + _BIG_LENGTH + STOP))


# Through mlx_aim.load: a hub-style folder (config.json + pytorch_model.bin).

def _hub_state() -> dict:
    from mlx_aim.models.config import AIMConfig
    from torch_reference import AIMReference

    torch.manual_seed(0)
    return AIMReference.from_config(AIMConfig.from_dict(TINY_HUB)).randomize_norms(0).eval().state_dict()


def _hub_zip(hostile: dict) -> bytes:
    """The tiny hub model's state dict as hand-made float32 records, with `hostile` records put over it."""
    state, storages = {}, {}
    for index, (key, tensor) in enumerate(_hub_state().items()):
        values = tensor.detach().numpy().astype(np.float32)
        storages[str(index)] = values.tobytes()
        state[key] = _tensor(str(index), "float32", values.size, 0, values.shape, _contiguous(values.shape))
    for key, record in hostile.items():
        assert key in state
        state[key] = record
    storages["bad"] = np.ones(64, bool).tobytes()
    return _state_zip(state, storages)


_case("load", "hub_honest", lambda w: w.hub_folder("hub_honest", _hub_zip({})), expect="ok", action="load")
_case("load", "hub_poisoned_v2_defaults", lambda w: w.hub_folder(
    "hub_poison", w.zip_with(PROTO2 + _poison_ops("v2_defaults_neg") + w.payload() + STOP)), action="load")
_case("load", "hub_deep_tuple_key", lambda w: w.hub_folder("hub_deep", w.zip_with(_DEEP_KEY_DICT, 8)), action="load")
_case("load", "hub_encrypted_data_pkl", lambda w: w.hub_folder(
    "hub_encrypted", Path(_flag_encrypted(w, "hub_encrypted_src", "/data.pkl")).read_bytes()), action="load")
_case("load", "hub_int_key_5000_digits", lambda w: w.hub_folder(
    "hub_int_key", w.zip_with(PROTO2 + b"}" + _ops(_HUGE_INT) + b"K\x01s" + STOP)), action="load")
# Read-time defects, behind a complete state dict (load checks every key and shape before reading).
_case("load", "hub_bool_negative_bit", lambda w: w.hub_folder("hub_bool_neg", _hub_zip(
    {"trunk.post_trunk_norm.weight": _tensor("bad", "bool", 64, 0, (64,), (1,), {"neg": True})})), action="load")
_case("load", "hub_stride_2p70", lambda w: w.hub_folder("hub_stride", _hub_zip(
    {"trunk.post_trunk_norm.weight": _tensor("bad", "bool", 64, 0, (64,), (1 << 70,))})), action="load")

# The harness on honest files: opened, read and compared bit for bit.
_case("benign", "honest_zip", lambda w: str(w.honest_zip), expect="ok",
      values=lambda w: {k: v for k, (_, v) in _expected(w.honest_zip).items()})
_case("benign", "honest_legacy", lambda w: str(w.honest_legacy), expect="ok",
      values=lambda w: {k: v for k, (_, v) in _expected(w.honest_legacy).items()})
_case("benign", "honest_zip_deflated_data_pkl", lambda w: w.with_data_pkl(
    "honest_deflated", [m for m in w.zip_members() if m.name.endswith("/data.pkl")][0].data, method=8),
    expect="either", values=lambda w: {k: v for k, (_, v) in _expected(w.honest_zip).items()})


# -- the mutation fuzz ---------------------------------------------------------------------------

FUZZ_FAMILIES = ("zip-raw", "zip-pickle", "legacy-raw", "legacy-pickle")
_MUTATIONS = ("flip", "bit", "run-ff", "run-00", "truncate", "insert", "duplicate")


def _mutate(data: bytes, rng: random.Random, lo: int = 0, hi: Optional[int] = None):
    """One seeded mutation within data[lo:hi]; returns the mutant and what was done."""
    hi = len(data) if hi is None else hi
    op = rng.choice(_MUTATIONS)
    pos = rng.randrange(lo, hi)
    out = bytearray(data)
    if op == "flip":  # 1-4 bytes xor-ed with random non-zero values
        spots = sorted({pos} | {rng.randrange(lo, hi) for _ in range(rng.randrange(0, 4))})
        for spot in spots:
            out[spot] ^= rng.randrange(1, 256)
        return bytes(out), f"flip at {spots}"
    if op == "bit":
        bit = rng.randrange(8)
        out[pos] ^= 1 << bit
        return bytes(out), f"bit {bit} at {pos}"
    if op.startswith("run"):
        n = rng.randint(1, 32)
        out[pos : pos + n] = (b"\xff" if op == "run-ff" else b"\x00") * len(out[pos : pos + n])
        return bytes(out), f"{op} of {n} at {pos}"
    if op == "truncate":
        return data[:pos], f"truncate at {pos}"
    if op == "insert":
        n = rng.randint(1, 16)
        return data[:pos] + bytes(rng.randrange(256) for _ in range(n)) + data[pos:], f"insert {n} at {pos}"
    n = rng.randint(1, 64)
    at = rng.randrange(lo, hi + 1)
    return data[:at] + data[pos : pos + n] + data[at:], f"duplicate {pos}:{pos + n} at {at}"


def _mutants(w: _Workshop, family: str) -> list:
    """(name, path) of the family's mutants; the name holds seed and mutation, to reproduce a failure."""
    zip_data, legacy_data = w.honest_zip.read_bytes(), w.honest_legacy.read_bytes()
    members = _zip_members(zip_data)
    pickles, _ = _split_legacy(legacy_data)
    pickle_end = sum(map(len, pickles))
    folder = w.root / family
    folder.mkdir()
    out = []
    for seed in range(FUZZ_MUTANTS):
        rng = random.Random(f"{family}/{seed}")
        if family == "zip-raw":
            data, what = _mutate(zip_data, rng)
        elif family == "zip-pickle":  # data.pkl mutated, re-zipped with the same member names
            pkl = [m for m in members if m.name.endswith("/data.pkl")][0].data
            mutated, what = _mutate(pkl, rng)
            data = _zip(_replace(members, "/data.pkl", data=mutated))
        elif family == "legacy-raw":
            data, what = _mutate(legacy_data, rng)
        else:  # the five pickles of the legacy stream, storages untouched
            data, what = _mutate(legacy_data, rng, 0, pickle_end)
        path = folder / f"{seed:03d}.pth"
        path.write_bytes(data)
        out.append((f"{family} seed {seed}: {what}", str(path)))
    return out


# -- running the cases ---------------------------------------------------------------------------


def _selected(request) -> tuple:
    """The case names and fuzz families that this session's selected tests need (all, if unclear)."""
    names, families = set(), set()
    for item in request.session.items:
        if getattr(item, "module", None) is not request.module or not hasattr(item, "callspec"):
            continue
        names.add(item.callspec.params.get("case"))
        families.add(item.callspec.params.get("family"))
    names.discard(None)
    families.discard(None)
    if not names and not families:
        return set(CASES), set(FUZZ_FAMILIES)
    return names, families


def _subprocess_env() -> dict:
    """The environment of the harness and of the converter: the mlx_aim this pytest imports comes
    first on their path; no optimized BLAS is loaded (the reader needs none, and forking is simpler
    without its threads)."""
    package = Path(importlib.util.find_spec("mlx_aim").origin).parents[1]
    path = os.pathsep.join([str(package)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return dict(os.environ, PYTHONPATH=path, MLX_AIM_BLAS="0", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")


_ITEMSIZES = {"Float": 4, "Half": 2, "BFloat16": 2, "Double": 8, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
              "Byte": 1, "Bool": 1}


class _StorageLister(pickle.Unpickler):
    """Lists the storages (key, item size, element count) a trusted legacy main pickle names, in order."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if name.endswith("Storage"):
            return name
        return lambda *args: None

    def persistent_load(self, pid):
        self.storages.setdefault(pid[2], (_ITEMSIZES[pid[1][: -len("Storage")]], pid[4]))


def _fixed_legacy_keys(data: bytes) -> bytes:
    """The legacy stream with its storages (keyed by memory addresses, in their sorted order) renamed 0, 1,
    ... in the order the pickle first names them, and laid out in that order: the same bytes every run,
    so that a fuzz seed names the same mutant every run."""
    pickles, raw = _split_legacy(data)
    lister = _StorageLister(pickles[3])
    lister.load()
    blocks, offset = {}, 0
    for key in pickle.loads(pickles[4]):
        itemsize, numel = lister.storages[key]
        assert struct.unpack("<q", raw[offset : offset + 8])[0] == numel
        blocks[key], offset = raw[offset : offset + 8 + itemsize * numel], offset + 8 + itemsize * numel
    assert offset == len(raw)
    for index, key in enumerate(lister.storages):
        pickles[3] = pickles[3].replace(_text(key), _text(str(index)))
    pickles[4] = pickle.dumps([str(index) for index in range(len(lister.storages))], protocol=2)
    return b"".join(pickles) + b"".join(blocks[key] for key in lister.storages)


def _make_workshop(root: Path) -> _Workshop:
    w = _Workshop(root, marker=root / "pwned")
    w.honest_zip, w.honest_legacy = root / "honest.pth", root / "honest_legacy.pth"
    torch.save(_honest_state_dict(legacy=False), w.honest_zip)
    torch.save(_honest_state_dict(legacy=True), w.honest_legacy, _use_new_zipfile_serialization=False)
    as_saved = _expected(w.honest_legacy)
    w.honest_legacy.write_bytes(_fixed_legacy_keys(w.honest_legacy.read_bytes()))
    renamed = _expected(w.honest_legacy)
    assert list(renamed) == list(as_saved)
    assert all(renamed[k][1].tobytes() == as_saved[k][1].tobytes() for k in renamed), "renaming moved storages"
    return w


@pytest.fixture(scope="module")
def workshop(tmp_path_factory) -> _Workshop:
    return _make_workshop(tmp_path_factory.mktemp("hostile"))


def _run_cases(w: _Workshop, names, families) -> tuple:
    """Builds the named cases and the families' mutants, runs them all in one harness server; returns
    (requests, records, groups: group -> names)."""
    honest = [(str(w.honest_zip), _expected(w.honest_zip)), (str(w.honest_legacy), _expected(w.honest_legacy))]
    logs = w.root / "logs"
    logs.mkdir(exist_ok=True)
    requests, groups = [], {}

    def add(name, path, expect, action="open", values=None, group=None, max_cpu_seconds=None):
        requests.append({"name": name, "action": action, "path": path, "expect": expect, "values": values,
                         "honest": honest, "log": str(logs / f"{len(requests)}.txt"), "max_cpu_seconds": max_cpu_seconds})
        groups.setdefault(group, []).append(name)

    # LZMA bombs are the slow streams (~3 s per GiB): made on threads (lzma lets go of the GIL) meanwhile.
    pool = concurrent.futures.ThreadPoolExecutor(2)
    if any(name.startswith("bomb_") and "_lzma" in name for name in names):
        _prefetch_lzma_bombs(w, pool)
    for name, case in CASES.items():
        if name in names:
            path = case.build(w)
            values = case.values(w) if case.values else None
            add(name, path, case.expect, case.action, values, case.group, case.max_cpu_seconds)
    for family in FUZZ_FAMILIES:
        if family in families:
            for name, path in _mutants(w, family):
                add(name, path, "either", group=family)
    pool.shutdown()
    requests_path, results_path = w.root / "requests.pkl", w.root / "results.pkl"
    requests_path.write_bytes(pickle.dumps(requests))
    bound = len(requests) * hostile_cases.TIMEOUT_S / hostile_cases.JOBS + 120
    done = subprocess.run([sys.executable, hostile_cases.__file__, str(requests_path), str(results_path)],
                          env=_subprocess_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=bound)
    assert done.returncode == 0, f"the harness server failed:\n{done.stderr[-3000:]}"
    return requests, pickle.loads(results_path.read_bytes()), groups


@pytest.fixture(scope="module")
def outcomes(request, workshop) -> dict:
    """name -> failure line or None, for every selected case and fuzz mutant."""
    requests, records, groups = _run_cases(workshop, *_selected(request))
    failures = {req["name"]: hostile_cases.failure(req, rec) for req, rec in zip(requests, records)}
    return {"failures": failures, "groups": groups, "marker": workshop.marker}


def _check(outcomes, case: str) -> None:
    failure = outcomes["failures"][case]
    assert not outcomes["marker"].exists(), f"{case}: a payload ran"
    assert failure is None, failure


def _names(group: str) -> list:
    return [name for name, case in CASES.items() if case.group == group]


@pytest.mark.parametrize("case", _names("poisoning"))
def test_poisoning_allow_listed_globals(outcomes, case):
    _check(outcomes, case)


@pytest.mark.parametrize("case", _names("stack"))
def test_deep_nesting_does_not_overflow_the_c_stack(outcomes, case):
    _check(outcomes, case)


@pytest.mark.parametrize("case", _names("exponential"))
def test_shared_containers_are_walked_in_bounded_time(outcomes, case):
    _check(outcomes, case)


@pytest.mark.parametrize("case", _names("memory"))
def test_tiny_files_do_not_flood_memory(outcomes, case):
    _check(outcomes, case)


@pytest.mark.parametrize("case", _names("foreign"))
def test_every_failure_is_a_checkpoint_error(outcomes, case):
    _check(outcomes, case)


@pytest.mark.parametrize("case", _names("load"))
def test_load_of_a_hub_folder(outcomes, case):
    _check(outcomes, case)


@pytest.mark.parametrize("case", _names("benign"))
def test_honest_files_pass_the_harness(outcomes, case):
    _check(outcomes, case)


@pytest.mark.parametrize("family", FUZZ_FAMILIES)
def test_mutation_fuzz(outcomes, family):
    failures = [outcomes["failures"][name] for name in outcomes["groups"][family]]
    failures = [f for f in failures if f is not None]
    assert not failures, f"{len(failures)} of {FUZZ_MUTANTS} mutants failed:\n" + "\n".join(failures[:40])


# -- the command line ----------------------------------------------------------------------------

_CLI_CASES = {
    "encrypted_data_pkl": lambda w: _flag_encrypted(w, "cli_encrypted", "/data.pkl"),
    "lzma_garbage": lambda w: _compressed_member(w, "cli_lzma", "/data.pkl", 14, _LZMA_HEADER + _GARBAGE),
    "int_key_5000_digits": lambda w: w.with_data_pkl("cli_int_key", PROTO2 + b"}" + _ops(_HUGE_INT) + b"K\x01s" + STOP),
    "hub_bool_negative_bit": lambda w: w.hub_folder("cli_hub_bool_neg", _hub_zip(
        {"trunk.post_trunk_norm.weight": _tensor("bad", "bool", 64, 0, (64,), (1,), {"neg": True})})),
}


@pytest.fixture(scope="module")
def cli_runs(request, workshop) -> dict:
    """Runs the selected CLI cases, all at once: name -> (completed process, output folder)."""
    wanted = {item.callspec.params.get("cli_case") for item in request.session.items
              if getattr(item, "module", None) is request.module and hasattr(item, "callspec")}
    wanted = {name for name in wanted if name} or set(_CLI_CASES)
    running = {}
    for name in sorted(wanted):
        source, out = _CLI_CASES[name](workshop), workshop.root / f"cli_out_{name}"
        command = [sys.executable, str(ROOT / "convert" / "convert.py"), source, "--out", str(out)]
        running[name] = (subprocess.Popen(command, env=_subprocess_env(), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out)
    runs = {}
    for name, (process, out) in running.items():
        try:
            stdout, stderr = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        runs[name] = (process.returncode, stdout, stderr, out)
    return runs


@pytest.mark.parametrize("cli_case", list(_CLI_CASES))
def test_convert_cli_reports_one_error_line(cli_runs, cli_case):
    returncode, stdout, stderr, out = cli_runs[cli_case]
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, f"{cli_case}: traceback on stderr:\n{stderr[-2000:]}"
    assert returncode == 2, f"{cli_case}: exit status {returncode}, stderr: {stderr[-500:]}"
    assert len(lines) == 1 and lines[0].startswith("error:"), f"{cli_case}: stderr is not one error line: {lines}"
    assert not out.exists(), f"{cli_case}: left {out}"
