"""Helpers the checkpoint-reader tests share: writing pickles by hand and reading torch's own values."""

import io
import pickle
import pickletools
import struct

import numpy as np
import torch


def torch_numpy(tensor) -> np.ndarray:
    """A tensor's values as numpy, lazy bits resolved; bfloat16 as its uint16 bits (numpy has no bfloat16)."""
    tensor = tensor.detach().resolve_conj().resolve_neg()
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
    if tensor.dtype == torch.uint16:
        return tensor.to(torch.int32).numpy().astype(np.uint16)
    if tensor.dtype == torch.uint32:
        return tensor.to(torch.int64).numpy().astype(np.uint32)
    return tensor.numpy().copy()


def split_legacy(data: bytes):
    """The five pickles of a legacy torch.save stream, and the raw storages after them."""
    stream = io.BytesIO(data)
    pickles = []
    for _ in range(5):
        start = stream.tell()
        for _op in pickletools.genops(stream):
            pass
        pickles.append(data[start : stream.tell()])
    return pickles, data[stream.tell() :]


def global_op(module: str, name: str) -> bytes:
    """Protocol 0's GLOBAL opcode naming `module.name`."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text_op(value: str) -> bytes:
    """BINUNICODE pushing `value`."""
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


class Call:
    """Pickles as a call of `fn(*args)`: how hostile pickles and hand-made records are written."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class Storage:
    """Pickles as a persistent id (`RecordPickler`), as torch.save writes a storage."""

    def __init__(self, *pid):
        self.pid = pid


class RecordPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, Storage) else None
