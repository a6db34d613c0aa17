"""The torch-free, pickle-distrusting checkpoint reader, against files written by the real torch.save."""

import collections
import io
import os
import pickle
import re
import shlex
import struct
import subprocess
import sys
import tarfile
import zipfile

import mlx.core as mx
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
from mlx_aim.checkpoints.torch_checkpoint import (
    CheckpointError, UnsafeCheckpointError, iter_torch_checkpoint, open_torch_checkpoint,
)


# -- helpers -------------------------------------------------------------------------------------


def _as_numpy(array: mx.array) -> np.ndarray:
    # numpy has no bfloat16: compare its bits.
    if array.dtype == mx.bfloat16:
        return np.array(array.view(mx.uint16))
    return np.array(array)


def _assert_same(array: mx.array, tensor) -> None:
    expected = _torch_numpy(tensor)
    actual = _as_numpy(array)
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    np.testing.assert_array_equal(actual, expected)


def _zip_members(path) -> list:
    with zipfile.ZipFile(path) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def _write_zip(path, members) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in members:
            archive.writestr(name, data)


class _CallThenBuild(_Call):
    """Pickles as `fn(*args)` followed by a BUILD opcode that sets `state` on the result."""

    def __init__(self, fn, args, state):
        super().__init__(fn, *args)
        self.state = state

    def __reduce__(self):
        return self.fn, self.args, self.state


def _tensor_record(storage, offset, size, stride, hooks=None):
    hooks = collections.OrderedDict() if hooks is None else hooks
    return _Call(torch._utils._rebuild_tensor_v2, storage, offset, size, stride, False, hooks)


def _vector(storage):
    """A 2-element float tensor record on `storage`."""
    return _tensor_record(storage, 0, (2,), (1,))


def _crafted_zip(path, state, storages: dict, top: str = "archive") -> None:
    """A torch.save-shaped archive around a hand-made pickle (for records torch would not write)."""
    buffer = io.BytesIO()
    _RecordPickler(buffer, protocol=2).dump(state)
    members = [(f"{top}/data.pkl", buffer.getvalue()), (f"{top}/byteorder", b"little")]
    members += [(f"{top}/data/{key}", data) for key, data in storages.items()]
    _write_zip(path, members + [(f"{top}/version", b"3\n")])


def _float_storage(key: str, numel: int) -> _Storage:
    return _Storage("storage", torch.FloatStorage, key, "cpu", numel)


def _reference_state_dict():
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(7, 10, generator=gen)
    base = torch.arange(8, dtype=torch.float32)
    return collections.OrderedDict(
        [
            ("w32", torch.randn(4, 5, generator=gen)),
            ("w16", torch.randn(3, 4, generator=gen).half()),
            ("wbf16", torch.randn(5, 3, generator=gen).bfloat16()),
            ("count", torch.tensor(123456789012, dtype=torch.int64)),  # 0-d
            ("ids", torch.arange(-3, 3, dtype=torch.int64)),
            ("big", big),
            ("view", big[3:, ::2]),  # storage offset and non-contiguous strides
            ("transposed", big.t()),
            ("shared_a", base[:5]),  # two tensors on one storage
            ("shared_b", base[3:]),
            ("param", torch.nn.Parameter(torch.randn(2, 3, generator=gen))),
            ("mask", torch.tensor([True, False, True])),
            ("empty", torch.zeros(0, 4)),
            # A plain dict inside the state dict: flattened to "block.weight", "block.bias".
            ("block", {"weight": torch.randn(2, 2, generator=gen), "bias": torch.zeros(2)}),
        ]
    )


def _flat(state_dict):
    out = {}
    for key, value in state_dict.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_round_trip_matches_torch(tmp_path, legacy):
    state_dict = _reference_state_dict()
    path = tmp_path / "model.pth"
    torch.save(state_dict, path, _use_new_zipfile_serialization=not legacy)
    expected = _flat(torch.load(path, weights_only=True))

    with open_torch_checkpoint(path) as ckpt:
        assert ckpt.format == ("legacy" if legacy else "zip")
        assert ckpt.keys() == list(_flat(state_dict))
        assert ckpt.root_key is None
        assert ckpt.dtype("w32") == "float32"
        assert ckpt.dtype("w16") == "float16"
        assert ckpt.dtype("wbf16") == "bfloat16"
        assert ckpt.dtype("count") == "int64"
        assert ckpt.dtype("mask") == "bool"
        assert ckpt.shape("count") == ()
        assert ckpt.shape("view") == (4, 5)
        assert ckpt.nbytes("view") == 4 * 5 * 4
        for key, tensor in expected.items():
            assert ckpt.shape(key) == tuple(tensor.shape)
            _assert_same(ckpt.read(key), tensor)
        assert ckpt.read("wbf16").dtype == mx.bfloat16
        assert ckpt.read("count").item() == 123456789012


def test_iter_yields_every_tensor_in_order(tmp_path):
    state_dict = _reference_state_dict()
    path = tmp_path / "model.pth"
    torch.save(state_dict, path)
    items = list(iter_torch_checkpoint(path))
    assert [key for key, _ in items] == list(_flat(state_dict))
    for key, array in items:
        _assert_same(array, _flat(state_dict)[key])


def test_wrapped_state_dicts_are_unwrapped_only_when_unambiguous(tmp_path):
    inner = {"trunk.weight": torch.ones(2, 3), "trunk.bias": torch.zeros(3)}
    for wrapper in ("model", "state_dict"):
        path = tmp_path / f"{wrapper}.pth"
        torch.save({wrapper: inner, "epoch": 3, "note": "x"}, path)
        with open_torch_checkpoint(path) as ckpt:
            assert ckpt.root_key == wrapper
            assert ckpt.keys() == ["trunk.weight", "trunk.bias"]

    path = tmp_path / "two.pth"
    torch.save({"model": inner, "ema": {"w": torch.ones(1)}, "epoch": 3}, path)
    with open_torch_checkpoint(path) as ckpt:
        assert ckpt.root_key is None
        assert ckpt.keys() == ["model.trunk.weight", "model.trunk.bias", "ema.w"]


def test_dtypes_written_with_rebuild_tensor_v3_and_lazy_bits(tmp_path):
    # torch.save 2.13 writes uint16/uint32/float8 as untyped storages + _rebuild_tensor_v3, and
    # keeps conj/neg views lazy with a metadata dict.
    complex_values = torch.tensor([1 + 2j, -3 + 0.5j], dtype=torch.complex64)
    state_dict = {
        "u16": torch.tensor([1, 65535, 7], dtype=torch.int32).to(torch.uint16)[1:],
        "u32": torch.tensor([4000000000, 1], dtype=torch.int64).to(torch.uint32),
        "conj": complex_values.conj(),
        "neg": complex_values.clone().conj().imag,  # a float view with the neg bit set
        "f8": torch.zeros(3).to(torch.float8_e4m3fn),
        "c128": torch.zeros(2, dtype=torch.complex128),
    }
    path = tmp_path / "dtypes.pth"
    torch.save(state_dict, path)
    with open_torch_checkpoint(path) as ckpt:
        assert [ckpt.dtype(k) for k in ckpt.keys()] == [
            "uint16", "uint32", "complex64", "float32", "float8_e4m3fn", "complex128"
        ]
        for key in ("u16", "u32", "conj", "neg"):
            _assert_same(ckpt.read(key), state_dict[key])
        for key in ("f8", "c128"):
            with pytest.raises(CheckpointError, match=rf"dtypes\.pth.*'{key}'"):
                ckpt.read(key)


def test_zip_with_any_top_folder_name(tmp_path):
    state_dict = _reference_state_dict()
    source = tmp_path / "source.pth"
    torch.save(state_dict, source)
    members = _zip_members(source)
    top = members[0][0].split("/")[0]
    renamed = tmp_path / "renamed.pth"
    _write_zip(renamed, [("my weights.v2-final" + name[len(top):], data) for name, data in members])
    with open_torch_checkpoint(renamed) as ckpt:
        for key, tensor in _flat(state_dict).items():
            _assert_same(ckpt.read(key), tensor)


def test_big_endian_zip_is_byte_swapped(tmp_path):
    values = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "big_endian.pth"
    _crafted_zip(
        path,
        {"w": _tensor_record(_float_storage("0", 12), 0, (4, 3), (1, 4))},
        {"0": values.numpy().astype(">f4").tobytes()},
    )
    members = [(n, b"big" if n.endswith("byteorder") else d) for n, d in _zip_members(path)]
    _write_zip(path, members)
    with open_torch_checkpoint(path) as ckpt:
        np.testing.assert_array_equal(np.array(ckpt.read("w")), values.numpy().T)


# -- hostile files -------------------------------------------------------------------------------


@pytest.fixture
def marker(tmp_path):
    """A path the payloads try to create; it must never exist."""
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a checkpoint's payload ran"


def _touch_command(path) -> str:
    return f"touch {shlex.quote(str(path))}"


def _payloads(path):
    """Hand-written pickles that run `touch path`, and the first global each one needs."""
    command = _touch_command(path)
    system_call = pickle.dumps(_Call(os.system, command), protocol=2)
    # getattr(__import__("os"), "system")(command), with GLOBAL (protocol 2)...
    nested = (
        b"\x80\x02" + _global("builtins", "getattr")
        + b"(" + _global("builtins", "__import__") + b"(" + _text("os") + b"tR"
        + _text("system") + b"tR"
        + b"(" + _text(command) + b"tR."
    )
    # ...and with STACK_GLOBAL (protocol 4).
    nested_v4 = (
        b"\x80\x04" + _text("builtins") + _text("getattr") + b"\x93"
        + b"(" + _text("builtins") + _text("__import__") + b"\x93(" + _text("os") + b"tR"
        + _text("system") + b"tR"
        + b"(" + _text(command) + b"tR."
    )
    # operator.methodcaller("system", command)(importlib.import_module("os"))
    gadget = (
        b"\x80\x02" + _global("operator", "methodcaller") + b"(" + _text("system") + _text(command)
        + b"tR(" + _global("importlib", "import_module") + b"(" + _text("os") + b"tRtR."
    )
    # The same gadget with importlib's global first: memoised, popped, fetched back later.
    gadget_importlib_first = (
        b"\x80\x02" + _global("importlib", "import_module") + b"q\x000"
        + _global("operator", "methodcaller") + b"(" + _text("system") + _text(command)
        + b"tR(h\x00(" + _text("os") + b"tRtR."
    )
    return {
        "os.system": (system_call, f"{os.system.__module__}.system"),
        "nested_getattr_import": (nested, "builtins.getattr"),
        "nested_getattr_import_v4": (nested_v4, "builtins.getattr"),
        "importlib_methodcaller": (gadget, "operator.methodcaller"),
        "importlib_first": (gadget_importlib_first, "importlib.import_module"),
    }


def test_payloads_are_live(tmp_path):
    # The hostile pickles really do run code under the plain pickle module.
    for name, (payload, _) in _payloads(tmp_path / "live").items():
        (tmp_path / "live").unlink(missing_ok=True)
        pickle.loads(payload)
        assert (tmp_path / "live").exists(), name


@pytest.mark.parametrize(
    "name",
    ["os.system", "nested_getattr_import", "nested_getattr_import_v4", "importlib_methodcaller",
     "importlib_first"],
)
def test_hostile_pickle_file_is_refused(tmp_path, marker, name):
    payload, refused = _payloads(marker)[name]
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError, match=rf"checkpoint\.pth: refused global '{refused}'"):
        open_torch_checkpoint(path)


@pytest.mark.parametrize("name", ["os.system", "nested_getattr_import", "importlib_methodcaller"])
def test_hostile_data_pkl_in_zip_is_refused(tmp_path, marker, name):
    payload, refused = _payloads(marker)[name]
    source = tmp_path / "source.pth"
    torch.save({"w": torch.ones(2)}, source)
    path = tmp_path / "checkpoint.pth"
    _write_zip(path, [(n, payload if n.endswith("/data.pkl") else d) for n, d in _zip_members(source)])
    with pytest.raises(UnsafeCheckpointError, match=rf"checkpoint\.pth: refused global '{refused}'"):
        open_torch_checkpoint(path)


def test_hostile_tensor_inside_a_real_state_dict_is_refused(tmp_path, marker):
    path = tmp_path / "checkpoint.pth"
    state = {
        "w": _tensor_record(_float_storage("0", 2), 0, (2,), (1,)),
        "b": _Call(os.system, _touch_command(marker)),
    }
    _crafted_zip(path, state, {"0": np.ones(2, np.float32).tobytes()})
    with pytest.raises(UnsafeCheckpointError, match=f"refused global '{os.system.__module__}.system'"):
        open_torch_checkpoint(path)


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4], ids=["magic", "version", "sys_info", "main", "keys"])
def test_legacy_payload_in_any_of_its_pickles_is_refused(tmp_path, marker, index):
    source = tmp_path / "source.pth"
    torch.save({"w": torch.ones(2), "b": torch.zeros(3)}, source, _use_new_zipfile_serialization=False)
    pickles, storages = _split_legacy(source.read_bytes())
    payload, refused = _payloads(marker)["nested_getattr_import"]
    pickles[index] = payload
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(b"".join(pickles) + storages)
    with pytest.raises(UnsafeCheckpointError, match=rf"checkpoint\.pth: refused global '{refused}'"):
        open_torch_checkpoint(path)


def test_zip_with_extra_upper_case_data_pkl_is_refused(tmp_path, marker):
    source = tmp_path / "source.pth"
    torch.save({"w": torch.ones(2)}, source)
    members = _zip_members(source)
    top = members[0][0].split("/")[0]
    payload, _ = _payloads(marker)["os.system"]
    path = tmp_path / "checkpoint.pth"
    _write_zip(path, members + [(f"{top}/DATA.PKL", payload)])
    with pytest.raises(UnsafeCheckpointError, match=r"checkpoint\.pth: ambiguous .*DATA\.PKL"):
        open_torch_checkpoint(path)
    # Upper-case only, or tucked into a sub-folder: still no data.pkl that every reader agrees on.
    _write_zip(path, [(n.replace("data.pkl", "DATA.PKL"), d) for n, d in members])
    with pytest.raises(UnsafeCheckpointError, match=r"checkpoint\.pth: ambiguous.*DATA\.PKL"):
        open_torch_checkpoint(path)
    _write_zip(path, members + [(f"{top}/extra/data.pkl", payload)])
    with pytest.raises(UnsafeCheckpointError, match="ambiguous"):
        open_torch_checkpoint(path)


def test_zip_with_two_top_folders_is_refused(tmp_path, marker):
    source = tmp_path / "source.pth"
    torch.save({"w": torch.ones(2)}, source)
    payload, _ = _payloads(marker)["os.system"]
    path = tmp_path / "checkpoint.pth"
    _write_zip(path, _zip_members(source) + [("other/data.pkl", payload)])
    with pytest.raises(UnsafeCheckpointError, match=r"checkpoint\.pth: .*one top folder"):
        open_torch_checkpoint(path)


def test_allow_listed_globals_are_inert(tmp_path):
    path = tmp_path / "checkpoint.pth"
    # Calling a storage class (torch would allocate); reducing a dtype.
    for body in (
        _global("torch", "FloatStorage") + b"(" + _text("x") + b"tR",
        _global("torch", "float32") + b")R",
    ):
        _write_zip(path, [("archive/data.pkl", b"\x80\x02" + body + b".")])
        with pytest.raises(CheckpointError, match=r"checkpoint\.pth: 'archive/data\.pkl'"):
            open_torch_checkpoint(path)


def test_records_cannot_be_modified_after_validation(tmp_path):
    path = tmp_path / "checkpoint.pth"
    args = (_float_storage("0", 4), 0, (2,), (1,), False, collections.OrderedDict())
    record = _CallThenBuild(torch._utils._rebuild_tensor_v2, args, {"shape": (10**9,)})
    _crafted_zip(path, {"w": record}, {"0": bytes(16)})
    # The scan refuses it before unpickling; the record itself would refuse too (below).
    with pytest.raises(UnsafeCheckpointError, match=r"checkpoint\.pth: .*BUILD sets the state of a tensor"):
        open_torch_checkpoint(path)


def test_stand_ins_are_new_for_every_pickle_and_refuse_build():
    from mlx_aim.checkpoints import torch_checkpoint as tc

    first, second = tc._fresh_globals(), tc._fresh_globals()
    assert first.keys() == second.keys()
    for key in first:
        assert first[key] is not second[key], key
        with pytest.raises(tc._RecordError, match="tries to modify"):
            first[key].__setstate__({"__defaults__": (None,)})
    rebuild = first[("torch._utils", "_rebuild_tensor_v2")]
    with pytest.raises(AttributeError):
        rebuild.__defaults__ = (None,)  # slots: no attribute to set on the stand-in


@pytest.mark.parametrize(
    "record, message",
    [
        (
            [
                _tensor_record(_float_storage("0", 4), 0, (2,), (1,)),
                _tensor_record(_Storage("storage", torch.LongStorage, "0", "cpu", 2), 0, (2,), (1,)),
            ],
            "described twice differently",
        ),
        (_tensor_record("not a storage", 0, (2,), (1,)), "storage"),
        (_tensor_record(_float_storage("0", 4), -1, (2,), (1,)), "offset"),
        (_tensor_record(_float_storage("0", 4), 0, (2, 2), (1,)), "differ in length"),
        (_tensor_record(_float_storage("0", 4), 0, (2,), (-1,)), "stride"),
        (_tensor_record(_float_storage("0", 4), 0, (2,), (1,), hooks={"h": 1}), "hooks"),
        (_vector(_Storage("storage", torch.FloatStorage, "../0", "cpu", 4)), "plain name"),
        (_vector(_Storage("storage", torch.FloatStorage, "0", "cpu")), "malformed"),
        (_vector(_Storage("module", torch.FloatStorage, "0", "cpu", 4)), "persistent"),
        (_vector(_Storage("storage", torch.float32, "0", "cpu", 4)), "not a storage class"),
    ],
)
def test_malformed_tensor_records_are_refused(tmp_path, record, message):
    path = tmp_path / "checkpoint.pth"
    _crafted_zip(path, {"w": record}, {"0": bytes(16)})
    with pytest.raises(CheckpointError, match=rf"checkpoint\.pth: .*{message}"):
        open_torch_checkpoint(path)


# -- broken files --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "offset, size, stride",
    [(0, (5,), (1,)), (3, (2,), (1,)), (0, (2, 2), (3, 1)), (4, (), ())],
    ids=["size", "offset", "stride", "0-d"],
)
def test_tensor_past_its_storage_is_an_error(tmp_path, offset, size, stride):
    path = tmp_path / "checkpoint.pth"
    record = _tensor_record(_float_storage("0", 4), offset, size, stride)
    _crafted_zip(path, {"w": record}, {"0": bytes(16)})
    with pytest.raises(CheckpointError, match=r"checkpoint\.pth: tensor 'w' .* storage '0'"):
        open_torch_checkpoint(path)


def test_tensor_at_the_end_of_its_storage_is_fine(tmp_path):
    path = tmp_path / "checkpoint.pth"
    values = np.arange(4, dtype=np.float32)
    record = _tensor_record(_float_storage("0", 4), 1, (3,), (1,))
    _crafted_zip(path, {"w": record}, {"0": values.tobytes()})
    with open_torch_checkpoint(path) as ckpt:
        np.testing.assert_array_equal(np.array(ckpt.read("w")), values[1:])


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_files_are_errors(tmp_path, legacy):
    source = tmp_path / "source.pth"
    torch.save(_reference_state_dict(), source, _use_new_zipfile_serialization=not legacy)
    data = source.read_bytes()
    path = tmp_path / "cut.pth"
    for cut in (1, 4, 20, 200, len(data) // 2, len(data) - 300, len(data) - 8, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"cut\.pth"):
            open_torch_checkpoint(path)


def test_missing_zip_storage_record_is_an_error(tmp_path):
    source = tmp_path / "source.pth"
    torch.save({"a": torch.ones(2), "b": torch.zeros(3)}, source)
    path = tmp_path / "checkpoint.pth"
    _write_zip(path, [(n, d) for n, d in _zip_members(source) if not n.endswith("/data/1")])
    with pytest.raises(CheckpointError, match=r"checkpoint\.pth: tensor 'b' needs record '.*/data/1'"):
        open_torch_checkpoint(path)


def test_missing_legacy_storage_is_an_error(tmp_path):
    source = tmp_path / "source.pth"
    torch.save({"a": torch.ones(2), "b": torch.zeros(3)}, source, _use_new_zipfile_serialization=False)
    pickles, storages = _split_legacy(source.read_bytes())
    keys = pickle.loads(pickles[4])
    pickles[4] = pickle.dumps(keys[:1], protocol=2)
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(b"".join(pickles) + storages)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pth: tensor '[ab]' needs storage .*missing"):
        open_torch_checkpoint(path)


def test_compressed_storage_record_is_an_error(tmp_path):
    source = tmp_path / "source.pth"
    torch.save({"a": torch.ones(64)}, source)
    path = tmp_path / "checkpoint.pth"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in _zip_members(source):
            compression = zipfile.ZIP_DEFLATED if "/data/" in name else zipfile.ZIP_STORED
            archive.writestr(name, data, compression)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pth: storage '.*/data/0' is compressed"):
        open_torch_checkpoint(path)


def test_not_a_checkpoint_is_an_error(tmp_path):
    rng = np.random.default_rng(0)
    cases = {
        "empty.pth": b"",
        "random.pth": b"\x13" + rng.bytes(4096),
        # Random bytes behind a pickle header, and a pickle that is not torch's.
        "random_pickle.pth": b"\x80\x02" + rng.bytes(4096),
        "other_pickle.pth": pickle.dumps({"a": 1}, protocol=2),
        "empty.zip": b"PK\x05\x06" + bytes(18),
        "safetensors_like.pth": struct.pack("<Q", 20) + b'{"w": {"dtype": 1}}  ',
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=re.escape(name)):
            open_torch_checkpoint(path)
    with pytest.raises(CheckpointError, match="missing.pth"):
        open_torch_checkpoint(tmp_path / "missing.pth")


def test_tar_checkpoint_is_an_error(tmp_path):
    path = tmp_path / "old.pth"
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("storages")
        info.size = 4
        archive.addfile(info, io.BytesIO(b"\x80\x02K\x00"))
    with pytest.raises(CheckpointError, match=r"old\.pth: a tar checkpoint"):
        open_torch_checkpoint(path)


def test_unknown_key_and_closed_checkpoint(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"w": torch.ones(2)}, path)
    ckpt = open_torch_checkpoint(path)
    with pytest.raises(KeyError, match="nope"):
        ckpt.read("nope")
    ckpt.close()
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.read("w")


# -- memory --------------------------------------------------------------------------------------

_PEAK_RSS_SCRIPT = """
import sys
import mlx.core as mx
from mlx_aim import platforms
from mlx_aim.checkpoints.torch_checkpoint import open_torch_checkpoint

def peak_mb():
    return platforms.peak_rss_bytes() / 2**20

mx.eval(mx.array([1.0]) + 1)
start = peak_mb()
with open_torch_checkpoint(sys.argv[1]) as ckpt:
    small = ckpt.read("small")
    mx.eval(small)
    after_small = peak_mb()
    big = ckpt.read("big")
    mx.eval(big)
    after_big = peak_mb()
print(start, after_small, after_big)
"""


def test_reading_one_tensor_reads_only_that_tensor(tmp_path):
    path = tmp_path / "large.pth"
    big_mb, other_mb = 120, 80
    torch.save(
        {
            "other": torch.full((other_mb * 2**18,), 2.0),
            "big": torch.full((big_mb * 2**18,), 1.0),
            "small": torch.arange(1000, dtype=torch.float32),
        },
        path,
    )
    assert path.stat().st_size > (big_mb + other_mb) * 2**20
    # Linux hands a process the parent's memory high-water mark at exec; this pytest (torch loaded,
    # 200 MB just saved) would hide everything. So measure in a grandchild of a tiny interpreter.
    launcher = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", launcher, sys.executable, "-c", _PEAK_RSS_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    start, after_small, after_big = map(float, result.stdout.split())
    # Opening and reading the small tensor touches none of the 200 MB of storages...
    assert after_small - start < 25, result.stdout
    # ...while the same measurement does see a real read (the test can fail).
    assert after_big - after_small > big_mb * 0.9, result.stdout


def _aim_backbone_keys(depth: int) -> list[str]:
    block = ("attn.qkv.weight", "attn.proj.weight", "norm_1.weight", "norm_1.bias", "norm_2.weight", "norm_2.bias",
             "mlp.fc1.weight", "mlp.fc2.weight")
    keys = [f"preprocessor.patchifier.{name}" for name in ("proj.weight", "proj.bias", "norm.weight", "norm.bias")]
    keys += [f"trunk.blocks.{i}.{name}" for i in range(depth) for name in block]
    return keys + ["trunk.post_trunk_norm.weight", "trunk.post_trunk_norm.bias"]


@pytest.mark.parametrize("what, keys", [
    ("aim-7B backbone keys", _aim_backbone_keys(32)),
    ("20,000 tensors, wrapped as a training checkpoint", [f"layers.{i}.weight" for i in range(20000)]),
])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_honest_checkpoints_fit_the_scan_budgets(tmp_path, what, keys, legacy):
    """The hostile-input budgets (opcodes, memo, nesting, names) leave honest files of this size alone."""
    generator = torch.Generator().manual_seed(0)
    state = collections.OrderedDict((key, torch.randn(2, 3, generator=generator)) for key in keys)
    wrapped = len(keys) > 1000
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "step": 7} if wrapped else state, path,
               _use_new_zipfile_serialization=not legacy)
    with open_torch_checkpoint(path) as checkpoint:
        assert checkpoint.keys() == keys
        assert checkpoint.root_key == ("model" if wrapped else None)
        for key in (keys[0], keys[len(keys) // 2], keys[-1]):
            _assert_same(checkpoint.read(key), state[key])
