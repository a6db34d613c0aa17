"""Zero-shot classification with AIMv2-LiT (apple/ml-aim, `aim-v2/aim/v2/torch/models.py`, `AIMv2LiT`): label names
become class embeddings through prompt templates, and an image's class scores are its cosine similarities to them
times the model's logit scale, as CLIP classifies, with no probe to train.

- Templates: `default_templates()` (CLIP's 80 ImageNet prompt templates, shipped as `clip_imagenet_templates.txt`),
  `read_templates(path)` (one per line, `{}` where the label goes).
- Labels: `read_labels(path)` (one per line), `check_labels`.
- `class_embeddings`: per label, the mean of its templates' unit-length text embeddings, re-normalised (CLIP's
  prompt ensembling).
- `ZeroShotHead`: those class embeddings with the logit scale, the labels, the templates and the model they came
  from (`build_head`); `save` writes a safetensors head file, `read_zero_shot_head` reads it back, and
  `is_zero_shot_head` tells it from a probe head file by its metadata.
- `ZeroShotClassifier`: a LiT's image side with a head, shaped as `classify.classify` takes a model
  (`config.num_classes`, `classifier(images) -> logits`); `open_zero_shot` opens a saved head
  on its LiT without the text tower (`load(..., text_tower=False)`), so classifying costs what the image side does.

    model, tokenizer = open_lit("aimv2-large-patch14-224-lit")
    head = build_head(model, tokenizer, ["cat", "dog", "car"])
    result = classify(ZeroShotClassifier(model, head), ["photos/"], labels=head.classes)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..fileio import atomic_file, parse_json
from .lit import TEXT_BATCH_SIZE, embed_images, embed_texts
from ..checkpoints.loading import load
from ..models.model import AIMv2LiT
from ..models.tokenizer import CLIPTokenizer
from ..checkpoints.weights import read_safetensors

HEAD_FORMAT = "mlx-aim-zero-shot-head"  # a head file's metadata "format": what tells it from a probe head
HEAD_VERSION = "1"
TEMPLATES_FILE = "clip_imagenet_templates.txt"  # in the package, beside imagenet_classes.txt
LABEL_SLOT = "{}"
COMMENT = "#"  # a template file's comment lines (the shipped file's attribution)


# ---------------------------------------------------------------------------------------------------
# Templates and labels


def _template_lines(text: str, where: str) -> list[str]:
    templates = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(COMMENT):
            continue
        if LABEL_SLOT not in line:
            raise ValueError(f"{where}, line {number}: {line!r} has no {LABEL_SLOT} where the label goes")
        templates.append(line)
    if not templates:
        raise ValueError(f"{where}: no templates (one a line, with {LABEL_SLOT} where the label goes)")
    return templates


def read_templates(path: str | os.PathLike) -> list[str]:
    """Prompt templates from a text file: one a line, `{}` where the label goes; blank lines and lines starting
    with `#` are skipped. A line without `{}` is refused with the file and line number."""
    return _template_lines(_read_text(path), str(path))


def default_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates ("a bad photo of a {}.", ...): the common practice for LiT and CLIP
    zero-shot, Apple having specified none."""
    text = resources.files("mlx_aim").joinpath(TEMPLATES_FILE).read_text(encoding="utf-8")
    return _template_lines(text, f"mlx_aim/{TEMPLATES_FILE}")


def check_templates(templates: Sequence[str]) -> list[str]:
    """`templates` as a list, each holding `{}`; a ValueError names the first that does not."""
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not templates:
        raise ValueError(f"templates: none given (each a string with {LABEL_SLOT} where the label goes)")
    for i, template in enumerate(templates):
        if not isinstance(template, str) or LABEL_SLOT not in template:
            raise ValueError(f"templates[{i}] = {template!r}: expected a string with {LABEL_SLOT} where the label goes")
    return templates


def check_labels(labels: Sequence[str], where: str = "labels") -> list[str]:
    """`labels` as a list of distinct, non-empty names; a ValueError names the first that is not."""
    labels = list(labels)
    if not labels:
        raise ValueError(f"{where}: no labels")
    seen = {}
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"{where}: label {i + 1} is {label!r}; expected a non-empty name")
        if label in seen:
            raise ValueError(f"{where}: label {label!r} is given twice (labels {seen[label] + 1} and {i + 1})")
        seen[label] = i
    return labels


def read_labels(path: str | os.PathLike) -> list[str]:
    """Labels from a text file, one a line (surrounding spaces dropped), blank lines ignored; a label given twice
    is refused with the file and both line numbers."""
    labels, lines = [], {}
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        label = line.strip()
        if not label:
            continue
        if label in lines:
            raise ValueError(f"{path}, line {number}: label {label!r} is also on line {lines[label]}")
        lines[label] = number
        labels.append(label)
    if not labels:
        raise ValueError(f"{path}: no labels (one a line)")
    return labels


def _read_text(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def prompts(label: str, templates: Sequence[str]) -> list[str]:
    """The texts of one label: each template with the label where `{}` is."""
    return [template.replace(LABEL_SLOT, label) for template in templates]


# ---------------------------------------------------------------------------------------------------
# Class embeddings and the head


def class_embeddings(model: AIMv2LiT, tokenizer: CLIPTokenizer, labels: Sequence[str],
                     templates: Optional[Sequence[str]] = None, batch_size: int = TEXT_BATCH_SIZE,
                     progress: bool = False) -> np.ndarray:
    """(len(labels), projection_dim) float32 unit rows: for each label the mean of its prompts' unit-length text
    embeddings (`lit.embed_texts`), re-normalised. `templates`: default `default_templates()`."""
    labels = check_labels(labels)
    templates = check_templates(default_templates() if templates is None else templates)
    per_call = max(1, batch_size // len(templates))  # labels whose prompts fill about one text batch
    rows = []
    with tqdm(total=len(labels), desc="labels", unit="label", disable=not progress or None) as bar:
        for start in range(0, len(labels), per_call):
            chunk = labels[start:start + per_call]
            texts = [text for label in chunk for text in prompts(label, templates)]
            embedded = embed_texts(model, tokenizer, texts, batch_size).reshape(len(chunk), len(templates), -1)
            rows.append(embedded.mean(axis=1))
            bar.update(len(chunk))
    mean = np.concatenate(rows)
    return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)


def _architecture(config: dict) -> dict:
    """A LiT config's dict without what does not change the embeddings' meaning (names, quantization)."""
    drop = ("name", "quantization")
    config = json.loads(json.dumps(config))  # as a head file stores it: tuples become lists
    out = {k: v for k, v in config.items() if k not in drop}
    if isinstance(out.get("image"), dict):
        out["image"] = {k: v for k, v in out["image"].items() if k not in drop}
    return out


@dataclass
class ZeroShotHead:
    """A zero-shot classifier's text side, computed once: unit class embeddings (C, projection_dim) and the logit
    scale, with the labels, the templates and the model (its name and config) they were computed with."""

    class_embeddings: np.ndarray
    logit_scale: float
    classes: list[str]
    templates: list[str]
    model: str
    model_config: dict

    @property
    def projection_dim(self) -> int:
        return int(self.class_embeddings.shape[1])

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the head as safetensors (tensors `class_embeddings`, `logit_scale`; the rest as metadata),
        atomically."""
        path = Path(path)
        metadata = {
            "format": HEAD_FORMAT, "version": HEAD_VERSION, "classes": json.dumps(self.classes),
            "templates": json.dumps(self.templates), "model": self.model,
            "model_config": json.dumps(self.model_config), "projection_dim": str(self.projection_dim),
        }
        tensors = {"class_embeddings": mx.array(self.class_embeddings.astype(np.float32)),
                   "logit_scale": mx.array(np.float32(self.logit_scale))}
        with atomic_file(path) as tmp:
            mx.save_safetensors(str(tmp), tensors, metadata=metadata)
        return path

    def check_fits(self, model: AIMv2LiT, where: str = "the zero-shot head", model_name: str = "") -> None:
        """Refuses a model whose image embeddings are not those the head was computed for: another projection
        size, or another LiT architecture; the message names `where` (the head file) and what to do."""
        name = model_name or model.config.name or "the model"
        again = f"compute the head with it (`mlx-aim zero-shot --model {model_name or 'MODEL'} ... --save-head`)"
        if model.config.projection_dim != self.projection_dim:
            raise ValueError(f"{where}: class embeddings of size {self.projection_dim} (computed with {self.model}), "
                             f"but {name} embeds images in {model.config.projection_dim} dimensions; {again}")
        mine, theirs = _architecture(self.model_config), _architecture(model.config.to_dict())
        if mine != theirs:
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(f"{where}: computed with {self.model}, a LiT of another architecture than {name} "
                             f"(differs in {', '.join(changed)}); {again}")


def build_head(model: AIMv2LiT, tokenizer: CLIPTokenizer, labels: Sequence[str],
               templates: Optional[Sequence[str]] = None, model_name: str = "",
               batch_size: int = TEXT_BATCH_SIZE, progress: bool = False) -> ZeroShotHead:
    """The zero-shot head of `labels` (`class_embeddings`), with the model's logit scale."""
    templates = check_templates(default_templates() if templates is None else templates)
    embeddings = class_embeddings(model, tokenizer, labels, templates, batch_size, progress)
    return ZeroShotHead(embeddings, float(model.logit_scale.astype(mx.float32)), list(labels), templates,
                        model_name or model.config.name or "", model.config.to_dict())


def _metadata(path: str | os.PathLike) -> dict:
    return read_safetensors(path, return_metadata=True)[1]


def is_zero_shot_head(path: str | os.PathLike) -> bool:
    """Whether a head file is a zero-shot head (its safetensors metadata says so); False for a probe head (a
    safetensors or PyTorch file with `head.*` keys). A missing file raises FileNotFoundError, a `.safetensors` file
    that is not one a ValueError naming it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: head file not found")
    if Path(path).suffix != ".safetensors":  # a PyTorch probe head, read by `load(..., head=...)`
        return False
    return _metadata(path).get("format") == HEAD_FORMAT


def read_zero_shot_head(path: str | os.PathLike) -> ZeroShotHead:
    """A head file written by `ZeroShotHead.save`; a ValueError naming the file when it is not one."""
    arrays, metadata = read_safetensors(path, return_metadata=True)
    if metadata.get("format") != HEAD_FORMAT:
        raise ValueError(f"{path}: not a zero-shot head file (metadata format {metadata.get('format')!r}, expected "
                         f"{HEAD_FORMAT!r}: `mlx-aim zero-shot --save-head` writes them)")
    try:
        classes, templates, model_config = (parse_json(metadata[key], repr(key))
                                            for key in ("classes", "templates", "model_config"))
        embeddings = np.asarray(arrays["class_embeddings"].astype(mx.float32))
        logit_scale = float(arrays["logit_scale"].astype(mx.float32).item())
        model = metadata.get("model", "")
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: a zero-shot head file without a readable {e}") from None
    if embeddings.ndim != 2 or embeddings.shape[0] != len(classes):
        raise ValueError(f"{path}: class_embeddings of shape {embeddings.shape} for {len(classes)} classes")
    return ZeroShotHead(embeddings, logit_scale, [str(c) for c in classes], [str(t) for t in templates], model,
                        model_config)


# ---------------------------------------------------------------------------------------------------
# The classifier


class ZeroShotClassifier:
    """A LiT's image side with a zero-shot head, shaped as `classify.classify` takes a model: `config` is the
    image encoder's with `num_classes` the head's label count (what preprocessing reads), and `classifier(images)`
    gives (B, C) logits, logit_scale × the cosine similarity of each image to each class embedding (softmax over
    them: the label probabilities). Its classes come from text: it has no probe to train."""

    def __init__(self, model: AIMv2LiT, head: ZeroShotHead, where: str = "the zero-shot head", model_name: str = ""):
        head.check_fits(model, where, model_name)
        self.model, self.head = model, head
        self.classes = list(head.classes)
        self.config = model.config.image.replace(num_classes=len(self.classes),
                                                 quantization=model.config.quantization)
        self.scaled_classes = mx.array(head.class_embeddings * np.float32(head.logit_scale))  # (C, P)

    @property
    def dtype(self) -> mx.Dtype:
        return self.model.dtype

    @property
    def source(self):
        """Where the LiT came from (`load` records it: `sources.ModelSource`)."""
        return self.model.source

    def __call__(self, images: mx.array) -> mx.array:
        """(B, H, W, C) preprocessed images -> (B, num_classes) float32 logits."""
        return embed_images(self.model, images) @ self.scaled_classes.T


def open_zero_shot(source: str | os.PathLike | Sequence, head: str | os.PathLike, dtype=None, quantize=None,
                   q_group_size: int = 64) -> ZeroShotClassifier:
    """A saved zero-shot head (`ZeroShotHead.save`) on the LiT `source` (anything `mlx_aim.load` takes), its text
    tower neither read nor held. A ValueError naming the head file when `source` is no LiT or does not fit it."""
    saved = read_zero_shot_head(head)
    name = str(source) if isinstance(source, (str, os.PathLike)) else ""
    model = load(source, dtype=dtype, quantize=quantize, q_group_size=q_group_size, text_tower=False)
    if not isinstance(model, AIMv2LiT):
        raise ValueError(f"{head}: a zero-shot head, for the AIMv2-LiT it was computed with ({saved.model}); "
                         f"{name or 'the model'} is {type(model).__name__}, which has no text tower: give it a probe "
                         "head instead, or classify with the LiT")
    return ZeroShotClassifier(model, saved, str(head), name)
