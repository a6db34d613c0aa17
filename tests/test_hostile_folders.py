"""Hostile model folders: an honest tiny folder with one file made hostile, loaded, classified from or opened as a LiT,
each case in its own child under a memory bound and a time limit (hostile_cases.py, the checkpoint suite's harness).

Every file a downloaded folder can hold is tried: the `model.safetensors` header, the shard index, `config.json`,
`preprocessor_config.json`, the tokenizer files and a probe head file. Each case asserts one error type (ValueError,
naming the file), no signal, no hang, peak memory growth under 300 MB, and that nothing outside the folder was opened
(Python-level opens: a file of the workshop outside the case's folder, or /etc/passwd). Reproduce one case with
`pytest tests/test_hostile_folders.py -k NAME`.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import hostile_cases
from conftest import tiny_config
from lit_helpers import write_tiny_lit
from mlx_aim.apps.benchmark import write_random_model
from mlx_aim.checkpoints.weights import save_model
from test_hostile_checkpoints import _subprocess_env

DEEP = 200_000  # JSON nesting far past Python's recursion limit
HUGE_JSON = 80 << 20  # past any JSON file a model folder needs (CLIP's tokenizer.json is about 3.6 MB)


class Workshop:
    """The honest folders every case copies, an image to classify, and files outside every case's folder."""

    def __init__(self, root: Path):
        self.root = root
        self.aim = write_random_model(root / "honest-aim", tiny_config(), seed=0)
        weights = mx.load(str(self.aim / "model.safetensors"))
        self.sharded = save_model(root / "honest-sharded", weights, tiny_config(), max_shard_bytes=200_000)
        self.lit = write_tiny_lit(root / "honest-lit")
        self.image = root / "image.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), np.uint8)).save(self.image)
        self.outside = root / "outside"
        self.outside.mkdir()
        for shard in self.sharded.glob("*.safetensors"):  # honest shards, outside the folder that names them
            shutil.copy(shard, self.outside / shard.name)
        self.count = 0

    def copy(self, honest: Path) -> Path:
        self.count += 1
        folder = self.root / f"case{self.count}-{honest.name}"
        shutil.copytree(honest, folder, symlinks=True)
        return folder


# -- editing one file --------------------------------------------------------------------------------


def _edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    result = edit(data)
    path.write_text(json.dumps(data if result is None else result))


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write_header(path: Path, header: dict, body: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _safetensors(edit: Callable[[dict, bytes], tuple]):
    def build(w: Workshop) -> dict:
        folder = w.copy(w.aim)
        path = folder / "model.safetensors"
        header, body = _header(path)
        header, body = edit(header, body)
        _write_header(path, header, body)
        return {"path": folder}

    return build


def _raw(path_in_folder: str, content: bytes, honest: str = "aim", action: str = "load"):
    def build(w: Workshop) -> dict:
        folder = w.copy(getattr(w, honest))
        (folder / path_in_folder).write_bytes(content)
        return {"path": folder, "action": action}

    return build


def _json_edit(path_in_folder: str, edit: Callable[[dict], object], honest: str = "aim", action: str = "load"):
    def build(w: Workshop) -> dict:
        folder = w.copy(getattr(w, honest))
        _edit_json(folder / path_in_folder, edit)
        return {"path": folder, "action": action}

    return build


def _index_entry(value: Callable[[Workshop], str]):
    """The sharded folder's index with every tensor of its first shard mapped to `value(w)` (an honest copy of that
    shard outside the folder, where the value names one: the load would succeed from it)."""

    def build(w: Workshop) -> dict:
        folder = w.copy(w.sharded)
        index = folder / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        first = sorted(set(data["weight_map"].values()))[0]
        data["weight_map"] = {k: (value(w) if v == first else v) for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))
        return {"path": folder}

    return build


def _outside_shard(w: Workshop) -> Path:
    return sorted(w.outside.glob("*.safetensors"))[0]


def _symlinked_shard(w: Workshop) -> dict:
    folder = w.copy(w.sharded)
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.unlink()
    shard.symlink_to(w.outside / shard.name)
    return {"path": folder}


def _preprocessor(settings: dict):
    """A preprocessor_config.json beside the honest AIM, then an image classified with it."""

    def build(w: Workshop) -> dict:
        folder = w.copy(w.aim)
        base = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 16},
                "do_center_crop": True, "crop_size": {"height": 16, "width": 16}}
        (folder / "preprocessor_config.json").write_text(json.dumps({**base, **settings}))
        return {"path": folder, "action": "classify"}

    return build


def _head(edit: Callable[[Workshop, Path], None]):
    """The honest AIM loaded with a probe head file (beside it in its folder) made hostile."""

    def build(w: Workshop) -> dict:
        folder = w.copy(w.aim)
        weights = mx.load(str(folder / "model.safetensors"))
        head = folder / "head.safetensors"
        mx.save_safetensors(str(head), {k: v for k, v in weights.items() if k.startswith("head.")})
        edit(w, head)
        return {"path": folder, "head": str(head)}

    return build


def _deep(open_char: str = "[") -> bytes:
    return (open_char * DEEP).encode()


def _huge_json() -> bytes:
    """A JSON object whose parse would cost about 4 bytes of memory per byte of file: past the 300 MB bound."""
    return b'{"pad": [' + b"0," * (HUGE_JSON // 2) + b'0]}'


NOT_UTF8 = b'{"width": "\xff\xfe\xfd"}'

# name -> (build: the case's request fields, expect, what the refusal's message must name)
CASES: dict[str, tuple[Callable[[Workshop], dict], str, Optional[str]]] = {
    # model.safetensors: its header
    "st_header_length_2_63": (lambda w: _raw("model.safetensors", struct.pack("<Q", 1 << 63) + b"{}")(w), "error", "model.safetensors"),
    "st_offsets_past_the_end": (_safetensors(lambda h, b: (
        {**h, _first_tensor(h): {**h[_first_tensor(h)], "data_offsets": [0, len(b) + 4096]}}, b)), "error", "model.safetensors"),
    "st_shape_2_40": (_safetensors(lambda h, b: ({**h, _first_tensor(h): {**h[_first_tensor(h)], "shape": [1 << 40]}},
                                                 b)), "error", "model.safetensors"),
    "st_unknown_dtype": (_safetensors(lambda h, b: ({**h, _first_tensor(h): {**h[_first_tensor(h)], "dtype": "F128"}},
                                                    b)), "error", "model.safetensors"),
    "st_truncated": (_safetensors(lambda h, b: (h, b[: len(b) // 2])), "error", "model.safetensors"),
    "st_empty": (_raw("model.safetensors", b""), "error", "model.safetensors"),
    # model.safetensors.index.json: shard names and the file itself
    "index_parent_shard": (_index_entry(lambda w: f"../{w.outside.name}/{_outside_shard(w).name}"), "error", "index.json"),
    "index_absolute_shard": (_index_entry(lambda w: str(_outside_shard(w))), "error", "index.json"),
    "index_etc_passwd": (_index_entry(lambda w: "/etc/passwd"), "error", "index.json"),
    "index_nul_in_name": (_index_entry(lambda w: "model-00001\x00.safetensors"), "error", "index.json"),
    "index_shard_symlinked_outside": (_symlinked_shard, "error", "index.json"),
    "index_nested_deep": (_raw("model.safetensors.index.json", _deep(), "sharded"), "error", "index.json"),
    "index_not_utf8": (_raw("model.safetensors.index.json", NOT_UTF8, "sharded"), "error", "index.json"),
    "index_huge": (_raw("model.safetensors.index.json", _huge_json(), "sharded"), "error", "index.json"),
    "index_weight_map_list": (_json_edit("model.safetensors.index.json", lambda d: d.update(weight_map=[1, 2]),
                                         "sharded"), "error", "index.json"),
    # config.json: its values and its decoding
    "config_nested_deep": (_raw("config.json", _deep()), "error", "config.json"),
    "config_width_as_string": (_json_edit("config.json", lambda d: d.update(width="64")), "error", "width"),
    "config_depth_as_bool": (_json_edit("config.json", lambda d: d.update(depth=True)), "error", "depth"),
    "config_heads_as_float": (_json_edit("config.json", lambda d: d.update(num_heads=4.0)), "error", "num_heads"),
    "config_patch_as_list": (_json_edit("config.json", lambda d: d.update(patch_size=[4])), "error", "patch_size"),
    "config_eps_nan": (lambda w: _config_text(w, lambda text: text.replace('"norm_eps": 1e-06', '"norm_eps": NaN')),
                       "error", "norm_eps"),
    "config_not_utf8": (_raw("config.json", NOT_UTF8), "error", "config.json"),
    "config_huge": (_raw("config.json", _huge_json()), "error", "config.json"),
    "config_top_level_list": (_raw("config.json", b"[1, 2, 3]"), "error", "config.json"),
    # preprocessor_config.json: what it may ask of an image
    "pre_resize_1e6": (_preprocessor({"size": {"shortest_edge": 10**6}}), "error", "shortest_edge"),
    "pre_crop_1e9": (_preprocessor({"crop_size": {"height": 10**9, "width": 10**9}}), "error", "crop_size"),
    "pre_std_zero": (_preprocessor({"image_std": [0.0, 0.0, 0.0]}), "error", "image_std"),
    "pre_size_as_string": (_preprocessor({"size": {"shortest_edge": "16"}}), "error", "size"),
    "pre_nested_deep": (_raw("preprocessor_config.json", _deep(), "aim", "classify"), "error", "preprocessor_config.json"),
    # tokenizer files of a LiT
    "tok_vocab_nested_deep": (_raw("vocab.json", _deep("["), "lit", "lit"), "error", "vocab.json"),
    "tok_vocab_not_utf8": (_raw("vocab.json", NOT_UTF8, "lit", "lit"), "error", "vocab.json"),
    "tok_vocab_huge": (_raw("vocab.json", _huge_json(), "lit", "lit"), "error", "vocab.json"),
    "tok_vocab_list": (_raw("vocab.json", b"[1, 2]", "lit", "lit"), "error", "vocab.json"),
    "tok_merges_binary": (_raw("merges.txt", bytes(range(256)) * 64, "lit", "lit"), "error", "merges.txt"),
    "tok_tokenizer_json_garbage": (_raw("tokenizer.json", b'{"model": {"type": "BPE", "vocab": 7}}', "lit", "lit"),
                                   "error", "tokenizer.json"),
    # a probe head file
    "head_header_length_2_63": (_head(lambda w, p: p.write_bytes(struct.pack("<Q", 1 << 63) + b"{}")), "error", "head.safetensors"),
    "head_truncated": (_head(lambda w, p: p.write_bytes(p.read_bytes()[:100])), "error", "head.safetensors"),
    "head_wrong_keys": (_head(lambda w, p: p.write_bytes(_renamed_head(p))), "error", "head.safetensors"),
    # honest folders pass the same harness
    "honest_aim_load": (lambda w: {"path": w.copy(w.aim)}, "ok", None),
    "honest_sharded_load": (lambda w: {"path": w.copy(w.sharded)}, "ok", None),
    "honest_classify": (_preprocessor({}), "ok", None),
    "honest_lit": (lambda w: {"path": w.copy(w.lit), "action": "lit"}, "ok", None),
    "honest_head": (_head(lambda w, p: None), "ok", None),
}


def _config_text(w: Workshop, edit: Callable[[str], str]) -> dict:
    folder = w.copy(w.aim)
    text = (folder / "config.json").read_text()
    assert edit(text) != text
    (folder / "config.json").write_text(edit(text))
    return {"path": folder}


def _renamed_head(path: Path) -> bytes:
    header, body = _header(path)
    renamed = {("trunk." + k if k != "__metadata__" else k): v for k, v in header.items()}
    text = json.dumps(renamed).encode()
    return struct.pack("<Q", len(text)) + text + body


# -- running them ----------------------------------------------------------------------------------


def _selected(request) -> set:
    """The cases the session selected (all, or those a -k picked)."""
    names = {item.callspec.params.get("case") for item in request.session.items
             if getattr(item, "module", None) is request.module and hasattr(item, "callspec")}
    names.discard(None)
    return names or set(CASES)


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> dict:
    """name -> failure line or None, for every selected case, all run in one harness server."""
    w = Workshop(tmp_path_factory.mktemp("hostile-folders"))
    logs = w.root / "logs"
    logs.mkdir()
    requests = []
    for name in sorted(_selected(request)):
        build, expect, match = CASES[name]
        fields = build(w)
        folder = Path(fields["path"])
        allowed = [str(folder), str(w.image)]
        requests.append({"action": "load", **fields, "name": name, "path": str(folder), "expect": expect,
                         "match": match, "error_type": "builtins.ValueError", "image": str(w.image), "log": str(logs / f"{name}.txt"),
                         "confine": {"root": str(w.root), "allowed": allowed, "forbidden": ["/etc/passwd"]}})
    requests_path, results_path = w.root / "requests.pkl", w.root / "results.pkl"
    requests_path.write_bytes(pickle.dumps(requests))
    done = subprocess.run([sys.executable, hostile_cases.__file__, str(requests_path), str(results_path)],
                          env=_subprocess_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=len(requests) * hostile_cases.TIMEOUT_S + 120)
    assert done.returncode == 0, f"the harness server failed:\n{done.stderr[-3000:]}"
    records = pickle.loads(results_path.read_bytes())
    return {req["name"]: hostile_cases.failure(req, rec) for req, rec in zip(requests, records)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_folder(outcomes, case):
    assert outcomes[case] is None, outcomes[case]
