"""The real CLIP vocabulary for tests: OpenAI's `bpe_simple_vocab_16e6.txt.gz`, as the `openai-clip` package
(a test-only dependency: the dev extra) ships it, turned into the `vocab.json` + `merges.txt` transformers
writes, the way CLIP's own tokenizer derives its vocabulary from the merges. Also OpenAI's own tokenizer
module from that package, loaded without the package's `__init__` (which imports torchvision)."""

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from types import ModuleType

CLIP_PACKAGE = "openai-clip"
VOCAB_GZ = "clip/bpe_simple_vocab_16e6.txt.gz"
# The file OpenAI released (open_clip_torch ships the same bytes); pinned so a changed upload cannot pass unseen.
VOCAB_GZ_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges: 256 bytes x 2 + merges + 2 specials = 49408


def packaged_file(relative: str) -> Path:
    """A file of the installed openai-clip package, found without importing it."""
    try:
        path = Path(importlib.metadata.distribution(CLIP_PACKAGE).locate_file(relative))
    except importlib.metadata.PackageNotFoundError as error:
        raise RuntimeError(f"the tokenizer tests need the {CLIP_PACKAGE} package: pip install -e '.[dev]'") \
            from error
    if not path.is_file():
        raise RuntimeError(f"{CLIP_PACKAGE} is installed without {relative}")
    return path


def clip_merges() -> list[str]:
    """CLIP's merges, `left right` a line, in rank order, after checking the file is OpenAI's."""
    data = packaged_file(VOCAB_GZ).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert digest == VOCAB_GZ_SHA256, f"{VOCAB_GZ} of {CLIP_PACKAGE} is not OpenAI's file (sha256 {digest})"
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    return lines[1:1 + NUM_MERGES]  # the first line is a version header


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's and CLIP's printable stand-in for each byte: printable Latin-1 bytes stand for themselves, the
    rest for code points from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def clip_vocab(merges: list[str]) -> dict[str, int]:
    """CLIP's token -> id: the byte characters, the same closing a word (`</w>`), each merge's result, then the
    start and end tokens (49406, 49407)."""
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), *(merge.replace(" ", "") for merge in merges),
              "<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def write_clip_tokenizer_files(folder: Path) -> Path:
    """Writes CLIP's `vocab.json` and `merges.txt` into `folder` (created) as transformers writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    merges = clip_merges()
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(merges), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


@lru_cache(maxsize=1)
def openai_simple_tokenizer() -> ModuleType:
    """OpenAI's `clip/simple_tokenizer.py` (ftfy and HTML clean-up, then BPE), loaded as a lone module."""
    spec = importlib.util.spec_from_file_location("openai_clip_simple_tokenizer",
                                                  packaged_file("clip/simple_tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
