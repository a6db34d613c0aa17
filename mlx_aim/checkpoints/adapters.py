"""Adapter folders, mlx-lm's convention: `adapters.safetensors` (the LoRA factors under their model paths, plus the
probe's `head.*` when the adapted model has one) and `adapter_config.json` (mode, rank, alpha, dropout, keys, layers,
and the base model's identity: its config and a digest of it, and the head's class count).

`save_adapters` writes one, each file atomically; `apply_adapters` (what `load(base, adapters=FOLDER)` calls) puts one on
a loaded base after checking that the folder was made for that base (its config's digest) and that every tensor has
the shape the base gives it. The folder is untrusted: its files are read through `fileio.confined` and
`read_json_object`, and every key of its config is checked before it is used.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..fileio import atomic_file, confined, read_json_object, write_json
from ..models.config import Config
from ..models.lora import adapter_parameters, apply_lora, lora_settings
from ..models.model import Probed, build_probe, with_probe
from .weights import read_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
# What an adapter_config.json must hold (other keys, a training run's settings say, are kept and ignored).
REQUIRED_KEYS = ("mode", "rank", "alpha", "dropout", "keys", "layers", "base_config", "base_digest", "num_classes")
# Left out of a base's identity: a probe's class count is the head's (saved with the adapters), and adapters trained
# on a quantized base apply to its float weights and back (QLoRA's adapters are float, as mlx-lm's).
_NOT_IDENTITY = ("num_classes", "quantization")


def base_identity(config: Config) -> dict:
    """The base model's config as adapters are tied to it: its dict without the head's class count and the
    quantization."""
    return {k: v for k, v in config.to_dict().items() if k not in _NOT_IDENTITY}


def config_digest(identity: dict) -> str:
    """sha256 of the identity dict's canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _describe(identity: dict, digest: str) -> str:
    fields = ", ".join(f"{k}={identity[k]}" for k in ("model_type", "width", "depth", "num_heads") if k in identity)
    return f"{fields} (config digest {digest[:12]})"


def save_adapters(folder: str | os.PathLike, model: nn.Module, adapter_config: Optional[dict] = None) -> Path:
    """Writes `model`'s adapters (`apply_lora`) to `folder`: adapters.safetensors (the factors, and `head.*` when the
    model carries a probe) and adapter_config.json (`adapter_config`'s keys, such as a training run's settings, with
    the adapters' settings and the base's identity, which it may repeat but not contradict). Each file is written
    atomically; the folder is created if need be."""
    settings = lora_settings(model)
    if settings is None:
        raise ValueError("save_adapters: this model has no LoRA adapters (apply_lora puts them on)")
    identity = base_identity(model.config)
    recorded = {**settings.to_dict(), "base_config": identity, "base_digest": config_digest(identity),
                "num_classes": model.config.num_classes if isinstance(model, Probed) else None}
    given = dict(adapter_config or {})
    clash = sorted(k for k in given if k in recorded and json.loads(json.dumps(given[k])) != recorded[k])
    if clash:
        raise ValueError(f"save_adapters: adapter_config says {', '.join(f'{k}={given[k]!r}' for k in clash)}, "
                         f"but the model's adapters have {', '.join(f'{k}={recorded[k]!r}' for k in clash)}")
    tensors = adapter_parameters(model)
    if isinstance(model, Probed):
        tensors.update({f"head.{k}": v for k, v in tree_flatten(model.head.parameters())})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / ADAPTER_WEIGHTS) as tmp:
        mx.save_safetensors(str(tmp), tensors, metadata={"format": "mlx"})
    write_json(folder / ADAPTER_CONFIG, {**given, **recorded})
    return folder


def read_adapter_config(folder: Path) -> dict:
    """A folder's adapter_config.json, every required key present and of the right kind, else ValueError naming
    the file and the key."""
    path = confined(folder, ADAPTER_CONFIG)
    config = read_json_object(path)
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)} (an adapter config records {', '.join(REQUIRED_KEYS)})")
    if config["mode"] != "lora":
        raise ValueError(f"{path}: mode {config['mode']!r}: only 'lora' adapters are read here")
    kinds = {"rank": int, "alpha": (int, float), "dropout": (int, float), "keys": list, "layers": list,
             "base_config": dict, "base_digest": str, "num_classes": (int, type(None))}
    for key, kind in kinds.items():
        if isinstance(config[key], bool) or not isinstance(config[key], kind):
            raise ValueError(f"{path}: {key}={config[key]!r} is not of the kind an adapter config holds")
    if config_digest(config["base_config"]) != config["base_digest"]:
        raise ValueError(f"{path}: base_digest does not match its base_config (the file was edited or damaged)")
    return config


def apply_adapters(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """`model` (a loaded base) with the adapters in `folder` put on it (`apply_lora` with the folder's settings, then
    its tensors loaded; a `head.*` in the folder composes or replaces the probe). Refuses, naming the folder's base and
    the loaded one, adapters made for another base (another config digest) or whose tensors' keys or shapes differ
    from those the base gives."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: adapter folder not found (it holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = read_adapter_config(folder)
    identity = base_identity(model.config)
    digest = config_digest(identity)
    theirs = _describe(config["base_config"], config["base_digest"])
    ours = _describe(identity, digest)
    if digest != config["base_digest"]:
        differ = sorted(k for k in {*identity, *config["base_config"]} if identity.get(k) != config["base_config"].get(k))
        raise ValueError(f"{folder}: adapters for the base {theirs}, not for the loaded base {ours} "
                         f"(they differ in {', '.join(differ)})")
    tensors = read_safetensors(confined(folder, ADAPTER_WEIGHTS))
    has_head = any(k.startswith("head.") for k in tensors)
    if has_head and config["num_classes"] is None:
        raise ValueError(f"{folder}: {ADAPTER_WEIGHTS} holds head.* tensors but {ADAPTER_CONFIG} has no num_classes")
    try:
        apply_lora(model, config["rank"], config["alpha"], config["dropout"], config["keys"], layers=config["layers"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{folder}: its settings do not fit the loaded base {ours}: {e}") from e
    if has_head and not (isinstance(model, Probed) and model.config.num_classes == config["num_classes"]):
        model = with_probe(model, build_probe(model.config, config["num_classes"]))
    expected = adapter_parameters(model)
    if has_head:
        expected.update({f"head.{k}": v for k, v in tree_flatten(model.head.parameters())})
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != tuple(expected[k].shape))
    if missing or extra or wrong:
        detail = "; ".join(part for part in (
            missing and f"missing {missing[:4]}", extra and f"unexpected {extra[:4]}",
            wrong and "shapes " + ", ".join(f"{k} {tuple(tensors[k].shape)} (expected {tuple(expected[k].shape)})"
                                            for k in wrong[:4])) if part)
        raise ValueError(f"{folder}: adapters for the base {theirs} do not fit the loaded base {ours}: {detail}")
    model.load_weights(list(tensors.items()), strict=False)  # keys and shapes checked above
    mx.eval(model.parameters())
    return model.eval()

