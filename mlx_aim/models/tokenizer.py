"""The CLIP byte-level BPE tokenizer that AIMv2-LiT's text tower reads, built from the files shipped with the
checkpoint, giving the ids that transformers' `CLIPTokenizer` gives on the same files.

    tokenizer = CLIPTokenizer.from_folder(checkpoint_folder)
    ids = tokenizer.encode(["a photo of a cat", "a photo of a dog"])  # (2, 77) int32

Text clean-up is transformers' (5.x) rule, not OpenAI CLIP's: Unicode NFC, every run of whitespace to one space,
lower case. (OpenAI's own tokenizer also runs ftfy and unescapes HTML, so `&amp;`, curly quotes and full-width
forms come out differently there.) Then CLIP's word pattern splits the text, each piece is mapped byte by byte to
printable characters and merged by the BPE ranks in `merges.txt`, the last piece of a word closing with `</w>`.
A row is `<|startoftext|> tokens <|endoftext|>`, cut to the context length with the end token kept as its last
token, then padded with the pad token the files name (CLIP's end token unless they say otherwise; the LiT text
tower pools the first end token and is causal, so what follows it never reaches the pooled feature).

The `tokenizers` library (the Rust BPE transformers itself runs) does the work, configured here exactly as
transformers' `CLIPTokenizer.__init__` configures it; the pipeline is fixed by CLIP, so the one serialized in
`tokenizer.json` is not read, as transformers does not read it either.

Files, in a folder or named one by one:
- `tokenizer.json`: when present, its vocabulary and merges are used (transformers' precedence), else
- `vocab.json` + `merges.txt`.
- `special_tokens_map.json`, then `tokenizer_config.json`: the names of the start, end, pad and unknown tokens
  (CLIP's when neither names them); `added_tokens_decoder` in `tokenizer_config.json`, else `added_tokens` in
  `tokenizer.json`: whether the start and end tokens are matched in the text before (False, the default) or
  after (True) lower-casing.

Only the start and end tokens are matched as special tokens in the input text. transformers also matches the
pad and unknown tokens; for CLIP's files these are the end token, so the ids agree, but a pad token such as `!`
would be cut out of the text there, which CLIP's BPE (the one the model learned) never does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .. import fileio

PathLike = Union[str, os.PathLike]

# The most a tokenizer file may hold: CLIP's tokenizer.json is about 3.6 MB, its vocab.json 1 MB.
MAX_TOKENIZER_BYTES = 64 * 1024**2
CONTEXT_LENGTH = 77  # CLIP's and AIMv2-LiT's text context: its positional embedding has 77 rows

# The file names transformers reads and writes.
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Every file a tokenizer folder may hold: what a download fetches and a conversion carries beside the weights.
TOKENIZER_FILES = (TOKENIZER_FILE, VOCAB_FILE, MERGES_FILE, SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE)

# CLIP's special tokens (ids 49406 and 49407 in its vocabulary), used where the files name none.
DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
}

# OpenAI CLIP's word pattern: the special tokens, English contractions, letter runs, single digits, and runs of
# anything else that is not whitespace.
CLIP_WORD_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                     r"""[^\s\p{L}\p{N}]+""")
END_OF_WORD = "</w>"


class TokenizerFileError(ValueError):
    """A tokenizer file that exists but cannot be used: not JSON, the wrong structure, inconsistent entries."""


class CLIPTokenizer:
    """CLIP's BPE tokenizer: `encode` turns text into (B, context_length) int32 token ids.

    Build it with `from_folder` or `from_files`; the constructor takes the vocabulary and merges themselves.
    `sot_id`, `eot_id` and `pad_id` are the ids of the start, end and pad tokens (49406, 49407, 49407 for CLIP's
    files), `vocab_size` the number of ids (49408)."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                 special_tokens: dict[str, str] | None = None, normalized: dict[str, bool] | None = None,
                 source: str = "the given vocabulary"):
        """`special_tokens` maps `bos_token`, `eos_token`, `pad_token`, `unk_token` to token strings (CLIP's for
        any left out); `normalized` maps a token string to whether it is matched after lower-casing (default
        False). `source` names where the vocabulary came from, for error messages."""
        names = {**DEFAULT_SPECIAL_TOKENS, **(special_tokens or {})}
        normalized = normalized or {}
        for key, token in names.items():
            if token not in vocab:
                raise TokenizerFileError(f"{source}: the {key} {token!r} is not in the vocabulary")
        try:
            model = BPE(vocab=dict(vocab), merges=list(merges), dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix=END_OF_WORD, fuse_unk=False, unk_token=names["unk_token"])
        except Exception as error:  # tokenizers raises plain Exceptions, e.g. for a merge whose token is unknown
            raise TokenizerFileError(f"{source}: the vocabulary and merges do not make a BPE model: {error}") \
                from error
        tokenizer = Tokenizer(model)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        special = dict.fromkeys([names["bos_token"], names["eos_token"]])
        tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=bool(normalized.get(token, False)))
                                      for token in special])
        self._tokenizer = tokenizer
        self.sot_id = vocab[names["bos_token"]]
        self.eot_id = vocab[names["eos_token"]]
        self.pad_id = vocab[names["pad_token"]]
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_folder(cls, folder: PathLike) -> CLIPTokenizer:
        """Reads the tokenizer files transformers writes from `folder` (the module docstring lists them)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder (expected the tokenizer files of a checkpoint)")

        def present(name: str) -> Path | None:
            path = fileio.confined(folder, name)
            return path if path.is_file() else None

        tokenizer_file = present(TOKENIZER_FILE)
        vocab_file, merges_file = present(VOCAB_FILE), present(MERGES_FILE)
        if tokenizer_file is None and (vocab_file is None or merges_file is None):
            missing = [name for name in (VOCAB_FILE, MERGES_FILE) if present(name) is None]
            raise FileNotFoundError(f"{folder}: no {TOKENIZER_FILE}, and no {' or '.join(missing)}: a CLIP "
                                    f"tokenizer needs {TOKENIZER_FILE}, or {VOCAB_FILE} and {MERGES_FILE}")
        return cls.from_files(tokenizer_file=tokenizer_file, vocab_file=vocab_file, merges_file=merges_file,
                              special_tokens_map_file=present(SPECIAL_TOKENS_MAP_FILE),
                              tokenizer_config_file=present(TOKENIZER_CONFIG_FILE))

    @classmethod
    def from_files(cls, *, tokenizer_file: PathLike | None = None, vocab_file: PathLike | None = None,
                   merges_file: PathLike | None = None, special_tokens_map_file: PathLike | None = None,
                   tokenizer_config_file: PathLike | None = None) -> CLIPTokenizer:
        """Reads named files: `tokenizer_file`, or else `vocab_file` and `merges_file`; the other two are
        optional. A file that is named must exist."""
        for path in (tokenizer_file, vocab_file, merges_file, special_tokens_map_file, tokenizer_config_file):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{path}: no such file")
        tokenizer_json = read_json_object(tokenizer_file) if tokenizer_file is not None else None
        if tokenizer_json is not None:
            vocab, merges = bpe_from_tokenizer_json(tokenizer_json, tokenizer_file)
            source = str(tokenizer_file)
        elif vocab_file is not None and merges_file is not None:
            vocab, merges = read_vocab(vocab_file), read_merges(merges_file)
            source = f"{vocab_file} and {merges_file}"
        else:
            raise ValueError("a CLIP tokenizer needs tokenizer_file, or both vocab_file and merges_file")

        config = read_json_object(tokenizer_config_file) if tokenizer_config_file is not None else {}
        special_map = read_json_object(special_tokens_map_file) if special_tokens_map_file is not None else {}
        special_tokens = {}
        for key in DEFAULT_SPECIAL_TOKENS:  # special_tokens_map.json over tokenizer_config.json, as transformers
            for values, path in ((special_map, special_tokens_map_file), (config, tokenizer_config_file)):
                if values.get(key) is not None:
                    special_tokens[key] = token_content(values[key], f"{path}: {key}")
                    break

        normalized = {}
        if "added_tokens_decoder" in config:
            entries = config["added_tokens_decoder"]
            if not isinstance(entries, dict):
                raise TokenizerFileError(f"{tokenizer_config_file}: added_tokens_decoder is not an object")
            entries, where = list(entries.values()), f"{tokenizer_config_file}: added_tokens_decoder"
        else:
            entries = (tokenizer_json or {}).get("added_tokens", [])
            where = f"{tokenizer_file}: added_tokens"
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
                raise TokenizerFileError(f"{where}: an entry without a string 'content': {entry!r}")
            normalized[entry["content"]] = bool(entry.get("normalized", False))
        return cls(vocab, merges, special_tokens=special_tokens, normalized=normalized, source=source)

    def encode(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
        """(B, context_length) int32 ids, one row per text (a single string gives one row): the start token,
        the text's tokens, the end token, then the pad token. A text too long loses its last tokens, never the
        end token."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"encode takes strings, got {type(text).__name__}: {text!r}")
        if context_length < 2:
            raise ValueError(f"context_length={context_length}: a row needs at least the start and end tokens")
        ids = np.full((len(texts), context_length), self.pad_id, dtype=np.int32)
        for row, encoding in zip(ids, self._tokenizer.encode_batch(texts, add_special_tokens=False)):
            tokens = [self.sot_id, *encoding.ids[:context_length - 2], self.eot_id]
            row[:len(tokens)] = tokens
        return ids


def read_json_object(path: PathLike) -> dict[str, Any]:
    """The JSON object in `path` (`fileio.read_json_object`, up to `MAX_TOKENIZER_BYTES`); TokenizerFileError naming
    the file when it cannot be read as one."""
    try:
        return fileio.read_json_object(path, MAX_TOKENIZER_BYTES)
    except ValueError as error:
        raise TokenizerFileError(str(error)) from None


def read_vocab(path: PathLike) -> dict[str, int]:
    """`vocab.json`: token string -> id."""
    return checked_vocab(read_json_object(path), str(path))


def checked_vocab(vocab: Any, where: str) -> dict[str, int]:
    """`vocab` when it maps strings to distinct non-negative integer ids; TokenizerFileError naming `where`
    otherwise."""
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerFileError(f"{where}: the vocabulary is not a non-empty object of token -> id")
    for token, index in vocab.items():
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise TokenizerFileError(f"{where}: token {token!r} has id {index!r}, not a non-negative integer")
    if len(set(vocab.values())) != len(vocab):
        raise TokenizerFileError(f"{where}: two tokens share an id")
    return vocab


def read_merges(path: PathLike) -> list[tuple[str, str]]:
    """`merges.txt`: one merge `left right` a line, by rank; `#version` lines and blank lines are skipped (as
    the tokenizers library reads it)."""
    try:
        lines = fileio.read_text(path, MAX_TOKENIZER_BYTES).split("\n")
    except ValueError as error:
        raise TokenizerFileError(str(error)) from None
    merges = []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise TokenizerFileError(f"{path}, line {number}: expected two tokens separated by one space, "
                                     f"found {line!r}")
        merges.append((parts[0], parts[1]))
    if not merges:
        raise TokenizerFileError(f"{path}: no merges")
    return merges


def bpe_from_tokenizer_json(tokenizer_json: dict[str, Any], path: PathLike) -> tuple[dict[str, int],
                                                                                      list[tuple[str, str]]]:
    """The vocabulary and merges of a BPE `tokenizer.json`; merges are `"left right"` strings or `[left, right]`
    pairs, depending on the tokenizers version that wrote the file."""
    model = tokenizer_json.get("model")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
        found = model.get("type") if isinstance(model, dict) else model
        raise TokenizerFileError(f"{path}: expected a BPE model, found {found!r}")
    vocab = checked_vocab(model.get("vocab"), f"{path}: model.vocab")
    raw_merges = model.get("merges")
    if not isinstance(raw_merges, list) or not raw_merges:
        raise TokenizerFileError(f"{path}: model.merges is not a non-empty list")
    merges = []
    for merge in raw_merges:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise TokenizerFileError(f"{path}: model.merges holds {merge!r}, not a pair of tokens")
        merges.append((parts[0], parts[1]))
    return vocab, merges


def token_content(value: Any, where: str) -> str:
    """A special token as transformers writes it: the string itself, or an object with its `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise TokenizerFileError(f"{where}: expected a token string or an object with a 'content' string")
    return value
