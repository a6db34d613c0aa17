"""Search queries that combine terms: texts, example images and index rows, added or subtracted, each with a weight.

    query = parse_query("2:dog + ./my_dog.jpg - people")
    found = query_vector(query, index, open_model)      # one text-tower pass for all text terms
    hits = index.search(found.vector, top_k=10, threshold=0.2)

Syntax (`parse_query`):

    query   :=  term ( " + " term | " - " term )*
    term    :=  [ weight ":" ] body
    body    :=  text  |  "quoted text"

- An operator is a `+` or `-` with whitespace on both sides: `black-and-white`, `c++` and `-30` are text.
- A weight is a positive finite number up to `MAX_WEIGHT` (`2:cat`, `0.5:beach`, `1e-1:fog`); a term without one
  weighs 1. A prefix that starts with a digit, `.`, `+` or `-` before a `:` is read as a weight and refused when it
  is not one (`0:cat`, `1.2.3:cat`); quote a text that starts that way: `"10:30 am"`, `2:"10:30 am"`.
- Quotes only group: a quoted body keeps its ` + `, ` - ` and `:` as text, and cannot hold a `"` itself.
- A body is an **image** when it is a path that starts with `/`, `./`, `../` or `~/` (`./my_dog.jpg`,
  `"./Summer 2024/beach.heic"` quoted for its spaces), an **index row** when it is `#` and a row number (`#120`, what
  the web page's "more like this" sends), and a **text** otherwise. The test is the spelling alone: parsing never
  touches the file system, so `dog.jpg` is the text "dog.jpg" (write `./dog.jpg` for the file).
- At most `MAX_QUERY_CHARS` characters and `MAX_TERMS` terms.

The query vector (`query_vector`) is the normalised weighted sum of each term's unit embedding,

    q = normalize( sum_i s_i * w_i * e_i / |e_i| ),   s_i = +1 after " + " (and for the first term), -1 after " - ",

with e_i the text tower's embedding of a text, the image tower's of an image, and a row's stored embedding. An image
already in the index, unchanged since (same path, size and modification time), uses its stored row and needs no
model (`SearchIndex.stored_embedding`); the model is opened only for text terms and other images, once.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..data import ImageLoadError, Preprocessing
from ..models.model import AIMv2LiT
from ..models.tokenizer import CLIPTokenizer
from .lit import embed_texts
from .search import SearchIndex, image_embedding

MAX_QUERY_CHARS = 1000  # a CLIP text reads 77 tokens: a longer query is a mistake, or a flood
MAX_TERMS = 16
MAX_WEIGHT = 1000.0  # weights are ratios (the sum is normalised); a larger one is a typo
MAX_ROW_DIGITS = 12
IMAGE_PREFIXES = ("/", "./", "../", "~/")
TEXT, IMAGE, ROW = "text", "image", "row"

_WEIGHT = re.compile(r'([0-9.+-][^\s:"]*):(.*)', re.DOTALL)
_ROW = re.compile(r"#([0-9]+)")

# opener(with_tokenizer) -> (the index's LiT, its tokenizer when asked for, its preprocessing)
ModelOpener = Callable[[bool], tuple[AIMv2LiT, Optional[CLIPTokenizer], Preprocessing]]


class QueryError(ValueError):
    """A query that cannot be answered: the message names the term and what was expected."""


@dataclass(frozen=True)
class Term:
    sign: int  # +1 or -1
    weight: float
    kind: str  # TEXT, IMAGE or ROW
    value: str  # the text, the image's path as written, or the row number's digits
    written: str  # the term as it stood in the query, for messages

    @property
    def row(self) -> int:
        return int(self.value)

    def to_dict(self) -> dict:
        return {"sign": self.sign, "weight": self.weight, "kind": self.kind,
                "value": int(self.value) if self.kind == ROW else self.value}


@dataclass(frozen=True)
class Query:
    text: str  # as given
    terms: tuple[Term, ...]

    @classmethod
    def image(cls, path: str | os.PathLike) -> "Query":
        """A query of one image file, named by any path (`search query --image FILE`), not parsed."""
        path = os.fspath(path)
        return cls(path, (Term(1, 1.0, IMAGE, path, path),))

    def to_dict(self) -> dict:
        return {"text": self.text, "terms": [t.to_dict() for t in self.terms]}


def parse_query(text: str, *, image_paths: bool = True) -> Query:
    """The terms of `text` (module docstring), or a QueryError naming the term at fault. `image_paths=False` refuses
    image terms given by path (the web page takes texts and index rows only)."""
    if not isinstance(text, str):
        raise QueryError(f"expected a query text, got {type(text).__name__}")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"the query is {len(text)} characters long; at most {MAX_QUERY_CHARS} are taken")
    if "\0" in text:
        raise QueryError("the query holds a NUL character")
    terms = [_term(sign, written, n, image_paths) for n, (sign, written) in enumerate(_split(text), 1)]
    if len(terms) > MAX_TERMS:
        raise QueryError(f"the query has {len(terms)} terms; at most {MAX_TERMS} are taken")
    return Query(text, tuple(terms))


def _split(text: str) -> list[tuple[int, str]]:
    """(sign, term as written) for each term: split at each + or - standing alone between spaces, outside quotes."""
    parts, sign, start, quoted = [], 1, 0, False
    for i, c in enumerate(text):
        if c == '"':
            quoted = not quoted
        elif (c in "+-" and not quoted and (i == 0 or text[i - 1].isspace())
              and (i + 1 == len(text) or text[i + 1].isspace())):
            parts.append((sign, text[start:i]))
            sign, start = (1 if c == "+" else -1), i + 1
    if quoted:
        raise QueryError(f"{text!r}: a quote is not closed")
    parts.append((sign, text[start:]))
    return parts


def _term(sign: int, written: str, n: int, image_paths: bool) -> Term:
    written = written.strip()
    where = f"term {n} ({written!r})" if written else f"term {n}"
    weight, body = 1.0, written
    match = _WEIGHT.fullmatch(written)
    if match:
        try:
            weight = float(match.group(1))
        except ValueError:
            weight = math.nan
        if not (0 < weight <= MAX_WEIGHT):
            raise QueryError(f"{where}: {match.group(1)!r} is not a weight; expected a number above 0 and at most "
                             f"{MAX_WEIGHT:g} before the ':' (quote a text that starts so: \"10:30 am\")")
        body = match.group(2).strip()
    if body.startswith('"') and body.endswith('"') and len(body) >= 2 and body.count('"') == 2:
        body = body[1:-1].strip()
    elif '"' in body:
        raise QueryError(f"{where}: a quote inside a term; quote the whole term (after its weight), without quotes "
                         "in it")
    if not body:
        raise QueryError(f"{where} is empty; expected a text, an image path (./photo.jpg) or #ROW between the "
                         "+ and - signs")
    row = _ROW.fullmatch(body)
    if row:
        if len(row.group(1)) > MAX_ROW_DIGITS:
            raise QueryError(f"{where}: row number too long")
        return Term(sign, weight, ROW, str(int(row.group(1))), written)
    if body.startswith(IMAGE_PREFIXES):
        if not image_paths:
            raise QueryError(f"{where}: image files are not taken here; use an indexed photo's row (#ROW, "
                             "\"more like this\")")
        return Term(sign, weight, IMAGE, body, written)
    return Term(sign, weight, TEXT, body, written)


def check_threshold(value) -> float:
    """A score threshold as a float: a cosine similarity, from -1 to 1; QueryError otherwise."""
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        threshold = math.nan
    if not -1 <= threshold <= 1:
        raise QueryError(f"threshold {value!r}: expected a cosine similarity, a number from -1 to 1")
    return threshold


@dataclass
class QueryVector:
    vector: np.ndarray  # (projection_dim,) float32, unit length
    query: Query
    model_loaded: bool  # whether the model was needed (text terms, images not in the index)


def query_vector(query: Query, index: SearchIndex, open_model: ModelOpener, model_name: str = "",
                 check_model: bool = True) -> QueryVector:
    """q = normalize(sum_i s_i w_i e_i / |e_i|) over `query`'s terms (module docstring), with `index`'s stored rows
    for index rows and for unchanged indexed images. `open_model(with_tokenizer)` is called at most once, when a
    text or an image outside the index needs the model; the model is checked to be the index's (unless
    `check_model` is False: a caller that keeps one model checks it once, as the check hashes its weights). A term
    that cannot be embedded (a missing or unreadable image, a row past the end, a zero embedding), or terms that
    cancel out, raise QueryError naming them."""
    embeddings: list[Optional[np.ndarray]] = [None] * len(query.terms)
    texts, images = [], []
    for i, term in enumerate(query.terms):
        if term.kind == ROW:
            try:
                embeddings[i] = index.row_embedding(term.row)
            except IndexError as error:
                raise QueryError(f"term {i + 1} ({term.written!r}): {error}") from None
        elif term.kind == IMAGE:
            embeddings[i] = index.stored_embedding(os.path.expanduser(term.value))
            if embeddings[i] is None:
                images.append(i)
        else:
            texts.append(i)
    model_loaded = bool(texts or images)
    if model_loaded:
        model, tokenizer, preprocessing = open_model(bool(texts))
        if check_model:
            index.check_model(model, model_name, preprocessing if images else None)
        if texts:
            rows = embed_texts(model, tokenizer, [query.terms[i].value for i in texts])
            for i, row in zip(texts, rows):
                embeddings[i] = row
        for i in images:
            try:
                embeddings[i] = image_embedding(model, os.path.expanduser(query.terms[i].value), preprocessing)
            except ImageLoadError as error:
                raise QueryError(f"term {i + 1} ({query.terms[i].written!r}): {error}") from None
    return QueryVector(combine(query.terms, embeddings), query, model_loaded)


def combine(terms, embeddings) -> np.ndarray:
    """normalize(sum_i s_i w_i e_i / |e_i|) in float64, returned as float32."""
    total, weights = 0.0, 0.0
    for n, (term, e) in enumerate(zip(terms, embeddings), 1):
        e = np.asarray(e, np.float64).reshape(-1)
        norm = np.linalg.norm(e)
        if not np.isfinite(norm) or norm == 0:
            raise QueryError(f"term {n} ({term.written!r}): its embedding is zero or not finite")
        total = total + term.sign * term.weight * (e / norm)
        weights += term.weight
    norm = np.linalg.norm(total)
    if norm <= 1e-6 * weights:
        raise QueryError("the terms cancel out (their weighted sum is zero): nothing to search for")
    return (total / norm).astype(np.float32)
