"""Speed and memory of mlx-aim on this machine, and PyTorch on the same model and weights in the same run.

    mlx-aim benchmark --preset aim-600M --quantize 4 --json
    python scripts/benchmark.py --preset aim-600M --batch-size 2 --compare-torch
    python scripts/benchmark.py --preset aim-small --train --batch-size 4 --compare-torch
    python scripts/benchmark.py --preset aimv2-large-patch14-448 --batch-size 1 --compare-torch
    python scripts/benchmark.py --preset aimv2-large-patch14-native --image-size 448   # 32x32 = 1024 patches
    python scripts/benchmark.py --preset aimv2-large-patch14-224-lit --batch-size 4 --text-batch-size 16 --compare-torch
    python scripts/benchmark.py --memory-suite          # aim-1B float32 / bfloat16 / 4-bit, aim-7B 4-bit
    python scripts/benchmark.py --memory-suite aimv2    # aimv2-3B bfloat16 / 4-bit
    python scripts/benchmark.py --preset aim-600M --finetune lora --batch-size 8 --compare-torch   # a LoRA step
    python scripts/benchmark.py --memory-suite finetune # aim-600M LoRA / full, aim-7B QLoRA 4-bit

`measure` and `memory_suite` return the figures; the command line (`mlx_aim.cli.benchmark`) prints them.

What is measured:
- inference: `model(images)` of AIM's classifier (trunk up to the deepest probe layer, then the probe), random
  weights, a random probe composed on explicitly (or `--weights FOLDER`, loaded with `mlx_aim.load`: a trunk without
  its probe has no logits to time), random normalised images;
- for AIMv2 ("encoder"): the released encoder, `model.extract_features(images)` through every block and the final
  norm (Apple released no heads), against transformers' `Aimv2VisionModel` (its `last_hidden_state`) with
  `--compare-torch`; a native-resolution model takes `image_size` x `image_size` inputs (default 224);
- for AIMv2-LiT, its two towers apart: `embed_images`' work (image encoder, pooling head, projection, unit length) on
  a batch of images, and `embed_texts`' on a batch of texts (random ids, the end token at different places, the
  full 77-token context as the tower always runs it), against transformers' `Aimv2Model` (`get_image_features`,
  `get_text_features`, its text attention made causal as Apple's) on the same random weights;
- `--train`: one pre-training step (`mlx_aim.training.pretrain.TrainStep`: forward, prefix-causal next-patch loss,
  backward, gradient clipping, AdamW), the preset's pixel head included;
- the first call (compilation, first-touch allocation) apart, then `--warmup` more untimed calls, then
  `--repeats` timed calls; medians are reported. With `--compare-torch` the MLX and PyTorch calls alternate
  (A B, B A, ...), so that a change in the machine's load hits both alike;
- achieved GFLOP/s: the matmul FLOPs of the call (dense attention counted whole) over its median time,
  against this machine's float32 matmul peak, measured here: the best of several 2048^3 products;
- peak memory: the process's peak resident set (`ru_maxrss`; includes PyTorch when compared) and MLX's
  peak allocation. `--memory-suite` measures load + one forward per model in a fresh process each, from a
  random-weight folder written tensor by tensor (aim-7B in float32 would not fit in memory).

PyTorch is imported only with `--compare-torch`; `scripts/benchmark.py` imports it before MLX binds its BLAS, so
it runs with its own kernels, as its users have it. The PyTorch models are the repository's references,
`benchmarks/torch_reference.py` (AIM) and `benchmarks/transformers_reference.py` (AIMv2: transformers' model and
the key mapping): `--compare-torch` works from a source checkout (a clone, or `pip install -e`), not from an
installed wheel, which does not ship them.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .. import __version__
from .._blas import blas_info, set_num_threads
from ..backend import native
from .. import platforms
from ..backend import backend_path
from ..models.config import AIMConfig, AIMv2Config, AIMv2LiTConfig, Config, model_config
from ..data import is_native
from ..tasks.encode import peak_memory
from ..checkpoints.loading import load, source_config
from ..models.model import (
    AIMv2, AIMv2LiT, TrunkModel, build_model, check_image_size, dtype_name, normalized, parse_dtype,
)
from ..checkpoints.weights import save_model

PEAK_SIZE = 2048  # the square float32 matmul whose speed stands for this machine's peak
MEMORY_SUITES = {
    "aim": (("aim-1B", "float32", None), ("aim-1B", "bfloat16", None), ("aim-1B", "float32", 4),
            ("aim-7B", "float32", 4)),
    "aimv2": (("aimv2-3B-patch14-224", "bfloat16", None), ("aimv2-3B-patch14-224", "float32", 4)),
    "lit": (("aimv2-large-patch14-224-lit", "float32", None), ("aimv2-large-patch14-224-lit", "float32", 4)),
}
MEMORY_SUITE = MEMORY_SUITES["aim"]
NATIVE_IMAGE_SIZE = 224  # a native-resolution model's benchmark input side, unless image_size says otherwise
REFERENCE_DIR = Path(__file__).resolve().parents[2] / "benchmarks"  # next to mlx_aim/ in a source checkout


class TorchReferenceUnavailable(RuntimeError):
    """`--compare-torch` cannot run here: the repository's PyTorch reference is not next to the package."""


def _reference(name: str):
    """`benchmarks/{name}.py`, imported from the source checkout this package runs from (not installed)."""
    if not (REFERENCE_DIR / f"{name}.py").is_file():
        raise TorchReferenceUnavailable(
            f"--compare-torch needs the PyTorch reference benchmarks/{name}.py, which is not in an installed "
            f"package: run it from a clone of the mlx-aim repository (looked in {REFERENCE_DIR})")
    if str(REFERENCE_DIR) not in sys.path:
        sys.path.insert(0, str(REFERENCE_DIR))
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise TorchReferenceUnavailable(f"--compare-torch: benchmarks/{name}.py needs {error.name}, a development "
                                        "dependency: pip install -e '.[dev]'") from None


def torch_reference():
    """The repository's PyTorch reference of AIM, `benchmarks/torch_reference.py`."""
    return _reference("torch_reference")


def transformers_reference():
    """The repository's AIMv2 reference, transformers' `Aimv2VisionModel` with the key mapping from ours,
    `benchmarks/transformers_reference.py`."""
    return _reference("transformers_reference")


# ---------------------------------------------------------------------------------------------------
# FLOPs of one call (matmuls only: element-wise work is small next to them and not what BLAS peak measures)


def _block_flops(tokens: int, width: int, hidden: int, mlp_matrices: int = 2) -> int:
    linears = 2 * tokens * width * (3 * width + width + mlp_matrices * hidden)  # qkv, proj, the MLP's
    attention = 2 * 2 * tokens * tokens * width  # q k^T and the weighted sum of v, all heads together
    return linears + attention


def inference_flops(config: AIMConfig, batch_size: int) -> int:
    """Matmul FLOPs of `AIM.__call__` on a batch: patch embedding, blocks up to the deepest probe layer, probe."""
    c, n = config, config.num_patches
    hidden = int(c.width * c.mlp_ratio)
    per_image = 2 * n * c.patch_dim * c.width
    per_image += (c.max_block_id + 1) * _block_flops(n, c.width, hidden)
    per_image += 2 * 2 * n * c.width * c.width + 2 * 2 * n * c.width + 2 * c.width * c.num_classes  # probe
    return batch_size * per_image


def encoder_flops(config: AIMv2Config, batch_size: int, grid: tuple[int, int]) -> int:
    """Matmul FLOPs of AIMv2's `extract_features` on a batch of images of a (rows, cols) patch grid: the patch
    embedding and every block (SwiGLU: three width x hidden_dim matrices)."""
    c, n = config, grid[0] * grid[1]
    per_image = 2 * n * c.patch_size**2 * c.num_channels * c.width
    per_image += c.depth * _block_flops(n, c.width, c.hidden_dim, mlp_matrices=3)
    return batch_size * per_image


def pretraining_flops(config: AIMConfig, batch_size: int, head_rows: Optional[int] = None) -> int:
    """Matmul FLOPs of one pre-training step: forward of every block and the pixel head, backward twice that.
    `head_rows`: the rows the pixel head runs on, over the whole batch (default: every token, as Apple's step)."""
    c, n = config, config.num_patches
    hidden, head_hidden = int(c.width * c.mlp_ratio), int(c.head_width * c.mlp_ratio)
    trunk = batch_size * (2 * n * c.patch_dim * c.width + c.depth * _block_flops(n, c.width, hidden))
    head_row = 2 * c.width * c.head_width + c.head_depth * 2 * 2 * c.head_width * head_hidden
    head_row += 2 * c.head_width * c.patch_dim
    return 3 * (trunk + (batch_size * n if head_rows is None else head_rows) * head_row)


# ---------------------------------------------------------------------------------------------------
# Timing


def torch_synchronizer(device: str) -> Optional[Callable[[], None]]:
    """What waits for PyTorch's queued work on `device` ("cpu", "cuda[:N]" or "mps"): a GPU call returns before its
    kernels finish. None on the CPU, where a call returns when it is done."""
    kind = device.split(":")[0]
    if kind == "cpu":
        return None
    import torch

    if kind == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if kind == "mps":
        return torch.mps.synchronize
    raise ValueError(f"torch device {device!r}: expected cpu, cuda[:N] or mps")


def torch_synced(fn: Callable, device: str) -> Callable:
    """fn, then waiting for `device` to finish (`torch_synchronizer`); fn itself on the CPU."""
    synchronize = torch_synchronizer(device)
    if synchronize is None:
        return fn

    def call():
        out = fn()
        synchronize()
        return out

    return call


def time_calls(fns: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, dict]:
    """Times each zero-argument call: its first call alone, `warmup` - 1 more untimed ones, then `repeats`
    timed rounds in which the calls alternate, reversing the order every round. Returns, per name,
    {"first_s", "times_s", "median_s", "min_s"}; with warmup 0 the first call is the only timing."""
    first = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
        for _ in range(max(warmup - 1, 0)):
            fn()
    times = {name: [] for name in fns}
    if warmup == 0:
        times = {name: [first[name]] for name in fns}
        repeats -= 1
    names = list(fns)
    for r in range(max(repeats, 0)):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: {"first_s": first[name], "times_s": times[name], "median_s": float(np.median(times[name])),
                   "min_s": float(np.min(times[name]))} for name in fns}


def matmul_peak(size: int = PEAK_SIZE, repeats: int = 5, torch_too: bool = False, torch_device: str = "cpu") -> dict:
    """float32 GFLOP/s of a size^3 matmul, the best of the repeats (a peak: the least disturbed by other
    load): MLX, and PyTorch with `torch_too`."""
    rng = np.random.default_rng(0)
    a_np, b_np = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    a, b = mx.array(a_np), mx.array(b_np)
    fns = {"mlx": lambda: mx.eval(a @ b)}
    if torch_too:
        import torch

        ta, tb = torch.from_numpy(a_np).to(torch_device), torch.from_numpy(b_np).to(torch_device)
        fns["torch"] = torch_synced(lambda: ta @ tb, torch_device)
    timed = time_calls(fns, warmup=1, repeats=repeats)
    return {name: 2 * size**3 / t["min_s"] / 1e9 for name, t in timed.items()}


# ---------------------------------------------------------------------------------------------------
# Models


def float_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters as float32 numpy arrays, quantized linears dequantized (what they multiply by)."""
    flat = dict(tree_flatten(model.parameters()))
    for key in [k for k in flat if k.endswith(".scales")]:
        stem = key[: -len(".scales")]
        module = model
        for part in stem.split("."):
            module = module[int(part)] if isinstance(module, list) else getattr(module, part)
        flat[stem + ".weight"] = mx.dequantize(flat[stem + ".weight"], flat.pop(key), flat.pop(stem + ".biases"),
                                               module.group_size, module.bits)
    return {k: np.array(v.astype(mx.float32)) for k, v in flat.items()}


def weight_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def random_images(config: Config, batch_size: int, seed: int = 0, image_size: Optional[int] = None) -> np.ndarray:
    """Random NHWC images of `image_size` (default: the config's), normalised pixel scale."""
    rng = np.random.default_rng(seed)
    size = image_size or config.image_size
    return rng.standard_normal((batch_size, size, size, config.num_channels), dtype=np.float32)


def write_random_model(folder: str | os.PathLike, config: Config, dtype=None, quantize=None,
                       seed: int = 0, force: bool = False) -> Path:
    """An MLX model folder with random weights, written one tensor at a time (`mlx_aim.checkpoints.weights.save_model`),
    so that a model much larger than memory in float32 (aim-7B) can be written in its quantized form.

    The model is built lazily: each tensor's random initialisation, cast and quantization run only when it
    is written, and it is dropped right after. Quantized like `mlx_aim.convert` (trunk linears only). AIM's with a
    random probe (what the inference measurement times: `load` reads it as a classifier), AIMv2's encoder alone."""
    model = build_model(config.replace(quantization=None), dtype, quantize, seed=seed,
                        probe=isinstance(config, AIMConfig))  # lazy until written
    config = model.config
    flat = dict(tree_flatten(model.parameters()))
    del model  # the dict now holds the only references: each tensor is freed once written
    producers = {k: (v.dtype, tuple(v.shape), (lambda k=k: flat.pop(k))) for k, v in flat.items()}
    note = f"Random weights (seed {seed}) written by mlx_aim.apps.benchmark for speed and memory measurements."
    return save_model(folder, producers, config, force=force, source_note=note)


# ---------------------------------------------------------------------------------------------------
# The two measurements


def _load_model(config: Config, dtype, quantize, weights: Optional[str],
                max_patches: Optional[int] = None) -> tuple[TrunkModel | AIMv2LiT, dict]:
    info = {}
    start = time.perf_counter()
    if weights is not None:
        model = load(weights, dtype=dtype, quantize=quantize)
        info["weights"] = str(weights)
    else:  # AIM's classifier is timed with a random probe, composed on explicitly: speed needs no trained weights
        model = build_model(config, dtype, quantize, seed=0, probe=isinstance(config, AIMConfig))
        info["weights"] = "random"
    if max_patches is not None:
        if not is_native(model.config):
            raise ValueError(f"max_patches={max_patches}: the limit applies to native-resolution models only")
        model.config = model.config.replace(max_patches=max_patches)
    mx.eval(model.parameters())
    info["load_s"] = time.perf_counter() - start
    info["rss_after_load_bytes"] = peak_memory()["peak_rss_bytes"]
    return model, info


def bench_inference(config: Config, batch_size: int, dtype=None, quantize=None, weights: Optional[str] = None,
                    compare_torch: bool = False, warmup: int = 2, repeats: int = 5, compile: bool = False,
                    image_size: Optional[int] = None, max_patches: Optional[int] = None,
                    torch_device: str = "cpu") -> dict:
    """AIM's classifier, or AIMv2's encoder; `image_size` and `max_patches` are a native-resolution model's."""
    model, info = _load_model(config, dtype, quantize, weights, max_patches)
    config = model.config
    if isinstance(config, AIMv2LiTConfig):
        raise ValueError("an AIMv2-LiT has two towers: time them with `bench_lit` (measure does)")
    if isinstance(config, AIMv2Config):
        return _bench_encoder(model, info, batch_size, compare_torch, warmup, repeats, compile, image_size,
                              torch_device)
    images_np = random_images(config, batch_size)
    images = mx.array(images_np)
    # Compiled: the whole forward traced once per input shape, weights captured as constants.
    forward = mx.compile(model.__call__) if compile else model
    fns = {"mlx": lambda: mx.eval(forward(images))}
    result = {"task": "inference", "config": config.name or "custom", "image_size": config.image_size,
              "batch_size": batch_size, "dtype": dtype_name(model.dtype),
              "quantization": config.quantization, "compiled": compile, "weight_bytes": weight_bytes(model), **info,
              "flops": inference_flops(config, batch_size)}
    if compare_torch:
        import torch

        reference = torch_reference()
        torch_dtype = torch.bfloat16 if model.dtype == mx.bfloat16 else torch.float32
        ref = reference.AIMReference.from_config(config).eval()
        reference.load_mlx_weights(ref, float_weights(model)).to(torch_device, torch_dtype)
        images_t = torch.from_numpy(images_np).permute(0, 3, 1, 2).contiguous().to(torch_device, torch_dtype)

        @functools.partial(torch_synced, device=torch_device)
        def torch_call():
            with torch.inference_mode():
                return ref(images_t)

        _add_torch(fns, result, torch_call, torch_dtype, model(images))
    result["timings"] = time_calls(fns, warmup, repeats)
    return result


def _add_torch(fns: dict, result: dict, torch_call: Callable, torch_dtype, ours: mx.array) -> None:
    """Times PyTorch's `torch_call` beside MLX's and records how far its output is from ours (`ours`)."""
    fns["torch"] = torch_call
    result["torch_dtype"] = dtype_name(torch_dtype)
    theirs = torch_call().float().cpu().numpy()
    ours = np.array(ours.astype(mx.float32))
    result["max_rel_diff"] = float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))


def _bench_encoder(model: AIMv2, info: dict, batch_size: int, compare_torch: bool, warmup: int, repeats: int,
                   compile: bool, image_size: Optional[int], torch_device: str = "cpu") -> dict:
    """AIMv2's encoder (every block, the final norm) against transformers' `Aimv2VisionModel` on its weights."""
    config = model.config
    size = (image_size or NATIVE_IMAGE_SIZE) if config.native else config.image_size
    images_np = random_images(config, batch_size, image_size=size)
    images = mx.array(images_np)
    check_image_size(images, config)  # before any timing: a size the model refuses is an error, not a number

    def encode(x):
        return model.extract_features(x)[0]

    encode = mx.compile(encode) if compile else encode
    fns = {"mlx": lambda: mx.eval(encode(images))}
    grid = (size // config.patch_size, size // config.patch_size)
    result = {"task": "encoder", "config": config.name or "custom", "image_size": size, "native": config.native,
              "num_patches": grid[0] * grid[1], "batch_size": batch_size, "dtype": dtype_name(model.dtype),
              "quantization": config.quantization, "compiled": compile, "weight_bytes": weight_bytes(model), **info,
              "flops": encoder_flops(config, batch_size, grid)}
    if compare_torch:
        import torch

        reference = transformers_reference()
        torch_dtype = torch.bfloat16 if model.dtype == mx.bfloat16 else torch.float32
        ref = reference.load_mlx_weights(reference.build_reference(config), float_weights(model))
        ref = ref.to(torch_device, torch_dtype)
        images_t = torch.from_numpy(images_np).permute(0, 3, 1, 2).contiguous().to(torch_device, torch_dtype)

        @functools.partial(torch_synced, device=torch_device)
        def torch_call():
            with torch.inference_mode():
                return ref(pixel_values=images_t).last_hidden_state

        _add_torch(fns, result, torch_call, torch_dtype, encode(images))
    result["timings"] = time_calls(fns, warmup, repeats)
    return result


def random_token_ids(config: AIMv2LiTConfig, batch_size: int, seed: int = 0) -> np.ndarray:
    """(B, context_length) ids below the end token, each row with an end token at a different place."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.eos_token_id, (batch_size, config.context_length)).astype(np.int32)
    ids[np.arange(batch_size), np.arange(batch_size) % (config.context_length - 1) + 1] = config.eos_token_id
    return ids


def text_flops(config: AIMv2LiTConfig, batch_size: int) -> int:
    """Matmul FLOPs of the text tower on a batch: every block over the full context, and the projection."""
    c = config
    per_text = c.text_depth * _block_flops(c.context_length, c.text_width, c.text_hidden_dim, mlp_matrices=3)
    return batch_size * (per_text + 2 * c.text_width * c.projection_dim)


def bench_lit(config: Optional[AIMv2LiTConfig], batch_size: int, text_batch_size: int, dtype=None, quantize=None,
              weights: Optional[str] = None, compare_torch: bool = False, warmup: int = 2,
              repeats: int = 5, torch_device: str = "cpu") -> list[dict]:
    """AIMv2-LiT's image tower on `batch_size` images and its text tower on `text_batch_size` texts, two runs; with
    `compare_torch`, transformers' `Aimv2Model` on the same random weights (drawn by transformers)."""
    if compare_torch:
        if quantize or weights:
            raise ValueError("compare_torch with AIMv2-LiT times transformers' random weights: no quantize, no weights")
        import torch

        reference = transformers_reference()
        ref = reference.build_lit_reference(config)
        start = time.perf_counter()
        model = build_model(config)
        model.load_weights(reference.lit_weights(ref), strict=True)
        if dtype is not None:
            model.set_dtype(parse_dtype(dtype))
        mx.eval(model.parameters())
        info = {"weights": "random (transformers' initialisation)", "load_s": time.perf_counter() - start,
                "rss_after_load_bytes": peak_memory()["peak_rss_bytes"]}
        torch_dtype = torch.bfloat16 if model.dtype == mx.bfloat16 else torch.float32
        ref = ref.to(torch_device, torch_dtype)
    else:
        model, info = _load_model(config, dtype, quantize, weights)
    if not isinstance(model, AIMv2LiT):
        raise ValueError(f"{weights}: not an AIMv2-LiT model")
    c = model.config
    images_np, ids_np = random_images(c.image, batch_size), random_token_ids(c, text_batch_size)
    images, ids = mx.array(images_np), mx.array(ids_np)
    common = {"config": c.name or "custom", "dtype": dtype_name(model.dtype), "quantization": c.quantization,
              "compiled": False, "weight_bytes": weight_bytes(model), **info}
    image_run = {"task": "lit image tower", "image_size": c.image.image_size, "batch_size": batch_size, **common,
                 "flops": encoder_flops(c.image, batch_size, (c.image.grid_size,) * 2)}
    text_run = {"task": "lit text tower (texts)", "image_size": None, "context_length": c.context_length,
                "batch_size": text_batch_size, **common, "flops": text_flops(c, text_batch_size)}

    def image_side():
        return normalized(model.encode_image(images).astype(mx.float32))

    def text_side():
        return normalized(model.encode_text(ids).astype(mx.float32))

    runs = []
    for run, ours, torch_side in ((image_run, image_side, "image"), (text_run, text_side, "text")):
        fns = {"mlx": lambda ours=ours: mx.eval(ours())}
        if compare_torch:
            if torch_side == "image":
                pixels = torch.from_numpy(images_np).permute(0, 3, 1, 2).contiguous().to(torch_device, torch_dtype)

                @functools.partial(torch_synced, device=torch_device)
                def torch_call(pixels=pixels):
                    with torch.inference_mode():
                        out = ref.get_image_features(pixel_values=pixels).pooler_output
                        return torch.nn.functional.normalize(out.float(), dim=-1)
            else:
                tokens = torch.from_numpy(ids_np.astype(np.int64)).to(torch_device)

                @functools.partial(torch_synced, device=torch_device)
                def torch_call(tokens=tokens):
                    with torch.inference_mode():
                        out = ref.get_text_features(input_ids=tokens).pooler_output
                        return torch.nn.functional.normalize(out.float(), dim=-1)

            _add_torch(fns, run, torch_call, torch_dtype, ours())
        run["timings"] = time_calls(fns, warmup, repeats)
        runs.append(run)
    return runs


TORCH_COUNTED_ROWS = "torch counted rows"  # the pre-training benchmark's torch step with its head on the counted rows


def bench_pretraining(config: AIMConfig, batch_size: int, dtype: str = "float32", compare_torch: bool = False,
                      warmup: int = 2, repeats: int = 5, torch_device: str = "cpu") -> dict:
    """One pre-training step (`TrainStep`, compiled; its pixel head runs on the rows the loss counts, padded to
    `objective.counted_rows`' length). With `compare_torch`, `benchmarks/torch_reference.py`'s `PretrainStep` on the
    same weights twice: as Apple's step (the head on every token: "torch", the ratio's reference) and with its head on
    the counted rows only (`TORCH_COUNTED_ROWS`, like with like). `flops` is Apple's step's work; each step's GFLOP/s
    counts its own (`flops_by_framework`)."""
    from ..models.objective import counted_rows
    from ..training.pretrain import TrainConfig, TrainStep, make_optimizer, step_prefix_len

    model = build_model(config, seed=0, pretraining=True)
    mx.eval(model.parameters())  # initialised here, not in the first timed call
    train_config = TrainConfig(steps=1000, batch_size=batch_size, dtype=dtype)
    optimizer = make_optimizer(train_config)
    optimizer.init(model.trainable_parameters())
    step = TrainStep(model, optimizer, train_config)
    images_np = random_images(config, batch_size)
    prefix = step_prefix_len(0, 1, batch_size, config.num_patches, "prefix")
    num_targets = int((config.num_patches - prefix).sum())
    fns = {"mlx": lambda: step(images_np, prefix, num_targets)}
    result = {"task": "pretraining step", "config": config.name or "custom", "image_size": config.image_size,
              "batch_size": batch_size, "dtype": dtype, "quantization": None,
              "head": f"{config.head_depth} blocks x {config.head_width}",
              "weight_bytes": weight_bytes(model), "flops": pretraining_flops(config, batch_size)}
    rows, _ = counted_rows(prefix, config.num_patches)
    result["head_rows"] = {"counted": num_targets, "mlx": len(rows), "all": batch_size * config.num_patches}
    result["flops_by_framework"] = {"mlx": pretraining_flops(config, batch_size, len(rows)),
                                    TORCH_COUNTED_ROWS: pretraining_flops(config, batch_size, num_targets)}
    if compare_torch:
        import torch

        reference = torch_reference()
        torch_dtype = torch.bfloat16 if dtype == "bfloat16" else None
        images_t = torch.from_numpy(images_np).permute(0, 3, 1, 2).contiguous().to(torch_device)
        prefix_t = torch.from_numpy(prefix.astype(np.int64)).to(torch_device)
        weights = float_weights(model)
        torch_steps = {name: reference.PretrainStep(
            reference.load_mlx_weights(reference.AIMPretrainingReference(config), weights).to(torch_device),
            dtype=torch_dtype, counted_rows=on_counted_rows)
            for name, on_counted_rows in (("torch", False), (TORCH_COUNTED_ROWS, True))}
        # The same step on the same weights: the first losses agree (each computed before its own update).
        ours, _ = step(images_np, prefix, num_targets)
        result["first_losses"] = {"mlx": float(ours)}
        for name, torch_step in torch_steps.items():
            fns[name] = torch_synced(functools.partial(torch_step, images_t, prefix_t), torch_device)
            result["first_losses"][name] = float(torch_step(images_t, prefix_t)[0])
        result["torch_dtype"] = "bfloat16 autocast" if dtype == "bfloat16" else "float32"
    result["timings"] = time_calls(fns, warmup, repeats)
    return result


FINETUNE_CLASSES = 1000  # the fine-tuning benchmark's probe: ImageNet's classes, as the paper's Table 8


def finetune_flops(config: AIMConfig, batch_size: int, mode: str) -> int:
    """A fine-tuning step's matmul FLOPs: the forward, the backward's input gradients and, in full mode, its weight
    gradients (3x the forward; LoRA's 2x, the adapters' own products left out)."""
    return (3 if mode == "full" else 2) * inference_flops(config, batch_size)


def bench_finetune(config: Optional[AIMConfig], batch_size: int, mode: str = "lora", dtype: str = "float32",
                   quantize=None, weights: Optional[str] = None, grad_checkpoint: bool = False,
                   compare_torch: bool = False, warmup: int = 2, repeats: int = 5, torch_device: str = "cpu") -> dict:
    """One fine-tuning step (`mlx_aim.training.finetune.make_step`, compiled): LoRA (rank 8 on qkv and proj, the
    probe trained with it; with `quantize`, QLoRA) or full (every weight, drop path off so that both frameworks do
    the same work), on random images and labels. With `compare_torch`, `benchmarks/torch_reference.py`'s
    `FinetuneStep` on the same weights and adapters, alternating: the first losses agree (the adapters' B is 0)."""
    from ..models.lora import trainable_parameters
    from ..training.finetune import FinetuneConfig, finetune_model, make_optimizer, make_step
    from ..training.optim import Schedule

    if mode not in ("lora", "full"):
        raise ValueError(f"finetune mode {mode!r}: expected 'lora' or 'full'")
    if mode == "full" and quantize:
        raise ValueError("a full fine-tune trains every weight of a float model: pass no quantize (QLoRA is lora)")
    trunk, info = _load_model(config, None, quantize, weights)  # float32: the recipe's dtype casts the frozen base
    config = trunk.config
    quantize = config.quantization  # a quantized folder is QLoRA too
    if not isinstance(config, AIMConfig):
        raise ValueError(f"the fine-tuning benchmark times AIM trunks; got {type(config).__name__}")
    recipe = FinetuneConfig(fine_tune_type=mode, drop_path=0.0, steps=1000, lr=1e-4, dtype=dtype,
                            grad_checkpoint=grad_checkpoint)
    model = finetune_model(trunk, FINETUNE_CLASSES, recipe)
    optimizer = make_optimizer(model, recipe, Schedule(recipe.steps, recipe.lr, recipe.lr, 0))
    model.train()
    step = make_step(model, optimizer, recipe.label_smoothing, dtype=parse_dtype(dtype))
    images_np = random_images(config, batch_size)
    labels_np = np.random.default_rng(1).integers(0, FINETUNE_CLASSES, batch_size)
    images, labels = mx.array(images_np), mx.array(labels_np)

    def mlx_step():
        loss = step(images, labels)
        mx.eval(loss, model.state, optimizer.state)
        return loss

    result = {"task": f"fine-tuning step ({'QLoRA' if quantize else mode})", "config": config.name or "custom",
              "image_size": config.image_size, "batch_size": batch_size, "dtype": dtype,
              "quantization": config.quantization, "grad_checkpoint": grad_checkpoint,
              "trainable_parameters": trainable_parameters(model), "weight_bytes": weight_bytes(model), **info,
              "flops": finetune_flops(config, batch_size, mode)}
    fns = {"mlx": mlx_step}
    if compare_torch:
        import torch

        if quantize:
            raise ValueError("compare_torch: PyTorch has no quantized CPU step to compare QLoRA with")
        reference = torch_reference()
        ref = reference.AIMReference.from_config(config.replace(num_classes=FINETUNE_CLASSES))
        if mode == "lora":
            ref = reference.add_lora(ref)
        reference.load_mlx_weights(ref, float_weights(model)).to(torch_device)
        torch_step = reference.FinetuneStep(ref, lr=recipe.lr, dtype=torch.bfloat16 if dtype == "bfloat16" else None,
                                            layer_decay=recipe.layer_decay if mode == "full" else None)
        images_t = torch.from_numpy(images_np).permute(0, 3, 1, 2).contiguous().to(torch_device)
        labels_t = torch.from_numpy(labels_np).to(torch_device)
        fns["torch"] = torch_synced(lambda: torch_step(images_t, labels_t), torch_device)
        # The same step on the same weights: the first two losses agree (the second after one update of each).
        losses = [(float(mlx_step()), float(fns["torch"]())) for _ in range(2)]
        result["first_losses"] = {"mlx": losses[0][0], "torch": losses[0][1]}
        result["second_losses"] = {"mlx": losses[1][0], "torch": losses[1][1]}
        result["torch_dtype"] = "bfloat16 autocast" if dtype == "bfloat16" else "float32"
    result["timings"] = time_calls(fns, warmup, repeats)
    return result


def _rows(result: dict, peak: dict) -> None:
    flops = result.get("flops_by_framework", {})  # where a framework's step does other work than `flops`
    for name, t in result["timings"].items():
        t["images_per_s"] = result["batch_size"] / t["median_s"]
        t["gflops"] = flops.get(name, result["flops"]) / t["median_s"] / 1e9
        t["percent_of_peak"] = 100 * t["gflops"] / peak["mlx"]
    t = result["timings"]
    if "torch" in t:
        result["ratio_mlx_over_torch"] = t["mlx"]["images_per_s"] / t["torch"]["images_per_s"]
    if TORCH_COUNTED_ROWS in t:
        result["ratio_mlx_over_torch_counted_rows"] = t["mlx"]["images_per_s"] / t[TORCH_COUNTED_ROWS]["images_per_s"]


def machine_info() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            **platforms.probe_cpu_record(), "python": platform.python_version(), "mlx": mx.__version__,
            "mlx_aim": __version__, "device": str(mx.default_device()), "backend_path": backend_path()}
    if native.available():
        info["native_threads"] = native.num_threads()
    elif native.unavailable_reason():
        info["native_unavailable"] = native.unavailable_reason()
    blas = blas_info()
    keys = ("loaded", "name", "path", "binding", "core", "threads")
    info["blas"] = {k: blas.get(k) for k in keys if blas.get(k) is not None}
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = os.getloadavg()[0]
    for var in ("MLX_AIM_BLAS", "MLX_AIM_CPU_WORKAROUNDS", "MLX_AIM_NATIVE", "MLX_AIM_NATIVE_THREADS",
                "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_CORETYPE"):
        if os.environ.get(var):
            info.setdefault("env", {})[var] = os.environ[var]
    return info


def measure(
    *,
    preset: str = "aim-600M",
    config: Optional[Config] = None,
    weights: Optional[str] = None,
    image_size: Optional[int] = None,
    max_patches: Optional[int] = None,
    dtype=None,
    quantize=None,
    batch_size: int = 2,
    text_batch_size: int = 16,
    train: bool = False,
    train_only: bool = False,
    train_batch_size: Optional[int] = None,
    finetune: Optional[str] = None,
    grad_checkpoint: bool = False,
    compare_torch: bool = False,
    torch_device: str = "cpu",
    threads: Optional[int] = None,
    compile: bool = False,
    warmup: int = 2,
    repeats: int = 5,
) -> dict:
    """The benchmark as one JSON-ready dict: the machine, its matmul peak, one run per measurement
    (inference, or AIMv2's encoder, unless `train_only`; one pre-training step with `train` or `train_only`),
    peak memory.

    `config`: a model config instead of `preset`'s; `weights`: an MLX model folder (or anything `mlx_aim.load`
    takes) instead of random weights; `image_size`: the model's (for a native-resolution model, the side of its
    square inputs, default `NATIVE_IMAGE_SIZE`); `max_patches`: a native model's guard; `quantize`: 4 or 8 bits, or
    a quantization dict, for inference; `threads`: BLAS (and torch) threads; `text_batch_size`: an AIMv2-LiT's
    texts per call (its image tower takes `batch_size`); `torch_device`: where PyTorch runs with `compare_torch`
    ("cpu", or "cuda" to compare MLX's CUDA backend with PyTorch's); `finetune` ("lora" or "full"): time one
    fine-tuning step instead (`bench_finetune`; with `quantize`, QLoRA; `grad_checkpoint` recomputes block
    activations in its backward pass)."""
    if min(batch_size, text_batch_size, repeats) < 1 or warmup < 0 or (threads is not None and threads < 1):
        raise ValueError(f"batch_size={batch_size}, text_batch_size={text_batch_size}, repeats={repeats}, "
                         f"warmup={warmup}, threads={threads}: expected batch sizes, repeats and threads >= 1, "
                         "warmup >= 0")
    if finetune and (train or train_only):
        raise ValueError("finetune times a fine-tuning step alone: pass train=False and train_only=False")
    if (train or train_only) and (quantize or weights):
        raise ValueError("train=True times pre-training a fresh float model: pass no quantize and no weights")
    input_size = None
    if weights is None:
        config = config or model_config(preset)
        if isinstance(config, AIMv2LiTConfig) and (image_size or max_patches):
            raise ValueError("image_size, max_patches: the AIMv2-LiT's image tower has a fixed size")
        if image_size and is_native(config):
            input_size = image_size
        elif image_size:
            config = config.replace(image_size=image_size)
        if (train or train_only) and isinstance(config, AIMv2Config):
            raise ValueError(f"train=True: {config.name or 'AIMv2'} has no pre-training model here (AIMv2 was "
                             "pre-trained with a multimodal decoder Apple did not release); time its encoder")
    else:
        config, input_size = None, image_size
    result = {"machine": machine_info()}
    if compare_torch:
        result["machine"]["torch"] = torch_reference().torch_info()
    if threads:
        set_num_threads(threads)
        if native.available():
            native.set_num_threads(threads)
        if compare_torch:
            import torch

            torch.set_num_threads(threads)
        result["machine"]["threads"] = threads
        result["machine"]["blas"]["threads"] = threads
        if compare_torch:
            result["machine"]["torch"]["threads"] = threads
    peak = matmul_peak(repeats=repeats, torch_too=compare_torch, torch_device=torch_device)
    result["matmul_peak_gflops"] = peak
    runs = []
    lit = isinstance(config if weights is None else source_config(weights), AIMv2LiTConfig)
    if lit and (train or train_only):
        raise ValueError("train=True: AIMv2-LiT has no pre-training model here; time its two towers")
    if finetune:
        if lit or isinstance(config, AIMv2Config):
            raise ValueError("finetune: the fine-tuning benchmark times AIM trunks (its PyTorch reference is AIM's)")
        runs.append(bench_finetune(config, batch_size, finetune, dtype or "float32", quantize, weights,
                                   grad_checkpoint, compare_torch=compare_torch, warmup=warmup, repeats=repeats,
                                   torch_device=torch_device))
    elif lit:
        runs += bench_lit(config, batch_size, text_batch_size, dtype, quantize, weights, compare_torch, warmup,
                          repeats, torch_device)
    elif not train_only:
        runs.append(bench_inference(config, batch_size, dtype, quantize, weights, compare_torch, warmup, repeats,
                                    compile, input_size, max_patches, torch_device))
    if train or train_only:
        runs.append(bench_pretraining(config, train_batch_size or batch_size, dtype or "float32", compare_torch,
                                      warmup, repeats, torch_device))
    for r in runs:
        _rows(r, peak)
    result["runs"] = runs
    result["memory"] = peak_memory()
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_1min_after"] = os.getloadavg()[0]
    return result


# ---------------------------------------------------------------------------------------------------
# Memory: load + one forward, each model in a fresh process


FINETUNE_MEMORY_SUITE = (
    # (preset, mode, bits, batch, grad_checkpoint): the fine-tuning issue's three figures
    ("aim-600M", "lora", None, 8, False),
    ("aim-600M", "full", None, 8, False),
    ("aim-7B", "lora", 4, 1, True),
)


def _child_json(cmd: list[str], what: str) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run for {what} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _write_random_folder(folder: Path, preset: str, dtype: str, bits: Optional[int]) -> float:
    """Writes a random-weight folder in a child process (so that writing leaves nothing behind in this one's memory);
    returns the seconds it took."""
    start = time.perf_counter()
    code = ("import sys; from mlx_aim.apps.benchmark import write_random_model; "
            "from mlx_aim.models.config import model_config; "
            "write_random_model(sys.argv[1], model_config(sys.argv[2]), sys.argv[3], int(sys.argv[4]) or None)")
    subprocess.run([sys.executable, "-c", code, str(folder), preset, dtype, str(bits or 0)], check=True)
    return time.perf_counter() - start


def finetune_memory_suite(specs: Sequence[tuple] = FINETUNE_MEMORY_SUITE, work_dir: Optional[str] = None,
                          steps: int = 1) -> list[dict]:
    """For each (preset, mode, bits, batch, grad_checkpoint): write a random-weight float32 (or `bits`-bit) folder,
    then in a fresh process load it and take `steps` compiled fine-tuning steps (`bench_finetune`: LoRA rank 8 with
    the probe, QLoRA on a quantized folder, or full); report the peak resident memory. Each folder is deleted once
    measured."""
    rows = []
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="mlx_aim_memory-") as tmp:
        for preset, mode, bits, batch, checkpointed in specs:
            folder = Path(tmp) / f"{preset}-q{bits or 0}"
            write_s = _write_random_folder(folder, preset, "float32", bits)
            disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            cmd = [sys.executable, "-m", "mlx_aim.cli.benchmark", "--weights", str(folder), "--finetune", mode,
                   "--batch-size", str(batch), "--warmup", "0", "--repeats", str(steps), "--json"]
            child = _child_json(cmd + (["--grad-checkpoint"] if checkpointed else []), folder.name)
            run_ = child["runs"][0]
            rows.append({"preset": preset, "mode": "QLoRA" if bits else mode, "bits": bits, "batch_size": batch,
                         "grad_checkpoint": checkpointed, "image_size": run_["image_size"],
                         "weight_bytes_on_disk": disk, "write_s": write_s, "load_s": run_["load_s"],
                         "trainable_parameters": run_["trainable_parameters"],
                         "first_step_s": run_["timings"]["mlx"]["first_s"],
                         "step_s": run_["timings"]["mlx"]["median_s"],
                         "peak_rss_bytes": child["memory"]["peak_rss_bytes"],
                         "peak_mlx_bytes": child["memory"]["peak_mlx_bytes"]})
            shutil.rmtree(folder)
    return rows


def memory_suite(specs: Sequence[tuple[str, str, Optional[int]]] = MEMORY_SUITE, work_dir: Optional[str] = None,
                 batch_size: int = 1) -> list[dict]:
    """For each (preset, dtype, bits): write a random-weight folder, then in a fresh process load it with
    `mlx_aim.load` and run one forward; report its peak resident memory against the weight bytes on disk.
    Each folder is deleted once measured."""
    rows = []
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="mlx_aim_memory-") as tmp:
        for preset, dtype, bits in specs:
            folder = Path(tmp) / f"{preset}-{dtype}-q{bits or 0}"
            write_s = _write_random_folder(folder, preset, dtype, bits)
            disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            cmd = [sys.executable, "-m", "mlx_aim.cli.benchmark", "--weights", str(folder), "--batch-size",
                   str(batch_size), "--warmup", "0", "--repeats", "1", "--json"]
            child = _child_json(cmd, folder.name)
            run_ = child["runs"][0]
            rows.append({"preset": preset, "dtype": dtype, "bits": bits, "weight_bytes_on_disk": disk,
                         "weight_bytes_in_memory": run_["weight_bytes"], "write_s": write_s,
                         "load_s": run_["load_s"], "rss_after_load_bytes": run_["rss_after_load_bytes"],
                         "forward_s": run_["timings"]["mlx"]["median_s"], "batch_size": batch_size,
                         "peak_rss_bytes": child["memory"]["peak_rss_bytes"],
                         "peak_mlx_bytes": child["memory"]["peak_mlx_bytes"]})
            shutil.rmtree(folder)
    return rows
