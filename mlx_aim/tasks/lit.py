"""AIMv2-LiT in use: the model with the tokenizer that ships beside it, and unit-length text and image embeddings,
the two things zero-shot classification and photo search compare (their dot product is the cosine similarity
`AIMv2LiT.__call__` scales into logits).

    model, tokenizer = open_lit("aimv2-large-patch14-224-lit")
    texts = embed_texts(model, tokenizer, ["a photo of a cat", "a photo of a dog"])  # (2, 768) float32, unit rows
    images = embed_images(model, batch)                                              # (B, 768), unit rows
    scores = images @ texts.T
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from ..checkpoints.loading import load
from ..checkpoints.sources import ModelSource, tokenizer_folder
from ..models.model import AIMv2LiT, normalized
from ..models.tokenizer import CLIPTokenizer

TEXT_BATCH_SIZE = 64


def load_tokenizer(source: str | os.PathLike | Sequence | ModelSource) -> CLIPTokenizer:
    """The CLIP tokenizer that ships with a LiT source: anything `mlx_aim.load` takes (the released name, a hub repo
    id, a transformers or converted folder), or a loaded LiT's `model.source`; `sources.tokenizer_folder` finds the
    files."""
    return CLIPTokenizer.from_folder(tokenizer_folder(source))


def check_lit(model, name: str = "") -> AIMv2LiT:
    """`model` when it is an AIMv2-LiT; a ValueError naming it otherwise (an image encoder has no text tower)."""
    if not isinstance(model, AIMv2LiT):
        raise ValueError(f"{name or 'the model'} is {type(model).__name__}, not an AIMv2-LiT model: zero-shot "
                         "classification and text search need its text tower (aimv2-large-patch14-224-lit)")
    return model


def check_tokenizer(model: AIMv2LiT, tokenizer: CLIPTokenizer, name: str = "") -> None:
    """Refuses a tokenizer whose ids the model cannot read: a vocabulary larger than its embedding table, or an end
    token other than the one its text tower pools."""
    c = model.config
    if tokenizer.vocab_size > c.vocab_size or tokenizer.eot_id != c.eos_token_id:
        raise ValueError(f"{name or 'the model'}: its tokenizer ({tokenizer.vocab_size} tokens, end token "
                         f"{tokenizer.eot_id}) does not fit its text tower ({c.vocab_size} tokens, pooling token "
                         f"{c.eos_token_id})")


def open_lit(source: str | os.PathLike | Sequence, dtype=None, quantize=None,
             q_group_size: int = 64) -> tuple[AIMv2LiT, CLIPTokenizer]:
    """`mlx_aim.load(source, ...)` and its tokenizer (from the folder the model was read from), checked to be a LiT
    and to fit each other."""
    name = str(source) if isinstance(source, (str, os.PathLike)) else ""
    model = check_lit(load(source, dtype=dtype, quantize=quantize, q_group_size=q_group_size), name)
    tokenizer = load_tokenizer(model.source)
    check_tokenizer(model, tokenizer, name)
    return model, tokenizer


def embed_texts(model: AIMv2LiT, tokenizer: CLIPTokenizer, texts: Sequence[str],
                batch_size: int = TEXT_BATCH_SIZE) -> np.ndarray:
    """(len(texts), projection_dim) float32 unit-length text embeddings, `batch_size` texts per model call."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected a positive integer")
    texts = [texts] if isinstance(texts, str) else list(texts)
    rows = [np.zeros((0, model.config.projection_dim), np.float32)]
    for start in range(0, len(texts), batch_size):
        ids = tokenizer.encode(texts[start:start + batch_size], context_length=model.config.context_length)
        embedding = normalized(model.encode_text(mx.array(trim_padding(ids, model.config.eos_token_id))).astype(
            mx.float32))
        rows.append(np.asarray(embedding))
    return np.concatenate(rows)


def trim_padding(ids: np.ndarray, eos_token_id: int) -> np.ndarray:
    """`ids` without the columns after the last row's end token. The text tower is causal and pools each row's first
    end token, so they change nothing, and a short text (most queries, class prompts) costs a few tokens of work
    instead of the full context length."""
    return ids[:, : int((ids == eos_token_id).argmax(axis=1).max()) + 1]


def embed_images(model: AIMv2LiT, images: mx.array) -> mx.array:
    """(B, H, W, C) images, preprocessed as the checkpoint says -> (B, projection_dim) float32 unit-length
    embeddings (lazy: evaluate them with the rest of the batch's work)."""
    return normalized(model.encode_image(images).astype(mx.float32))


def similarities(image_embeddings: np.ndarray, text_embeddings: np.ndarray,
                 logit_scale: Optional[float] = None) -> np.ndarray:
    """(I, T) cosine similarities of unit-length rows; times `logit_scale` (the model's, for logits as
    `AIMv2LiT.__call__` gives them) when given."""
    scores = np.asarray(image_embeddings, np.float32) @ np.asarray(text_embeddings, np.float32).T
    return scores if logit_scale is None else scores * np.float32(logit_scale)
