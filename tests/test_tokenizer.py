"""The CLIP tokenizer (`mlx_aim.models.tokenizer`) on CLIP's real vocabulary: ids identical to transformers'
`CLIPTokenizer` (a test-only reference) on the same files over a corpus of well over a thousand strings, the
same BPE as OpenAI's own tokenizer once its clean-up is applied, truncation that keeps the end token, padding
with the pad token the files name, the files' precedence, and errors that name the file."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import transformers

from clip_vocab import openai_simple_tokenizer, write_clip_tokenizer_files
from mlx_aim.models.tokenizer import CONTEXT_LENGTH, CLIPTokenizer, TokenizerFileError
from tokenizer_corpus import corpus, long_texts

SOT, EOT = 49406, 49407


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory) -> Path:
    """CLIP's vocab.json and merges.txt, as transformers writes them, built from OpenAI's released vocabulary."""
    return write_clip_tokenizer_files(tmp_path_factory.mktemp("clip-tokenizer"))


@pytest.fixture(scope="session")
def ours(clip_folder) -> CLIPTokenizer:
    return CLIPTokenizer.from_folder(clip_folder)


def reference_ids(folder, texts, context_length=CONTEXT_LENGTH) -> np.ndarray:
    """transformers' ids for `texts` from the files in `folder`, cut and padded to `context_length`."""
    reference = transformers.CLIPTokenizer.from_pretrained(str(folder))
    encoded = reference(list(texts), padding="max_length", truncation=True, max_length=context_length)
    return np.asarray(encoded["input_ids"])


def copy_folder(source: Path, target: Path, **json_files) -> Path:
    """A copy of `source` in `target`, with each keyword's JSON written to `name.json` (`special_tokens_map`
    -> special_tokens_map.json)."""
    shutil.copytree(source, target)
    for name, content in json_files.items():
        (target / f"{name}.json").write_text(json.dumps(content), encoding="utf-8")
    return target


def mismatches(texts, ours_ids, reference) -> list[str]:
    return [repr(text)[:80] for text, a, b in zip(texts, ours_ids, reference) if not np.array_equal(a, b)]


def test_ids_match_transformers_over_the_corpus(ours, clip_folder):
    texts = corpus()
    assert len(texts) > 1500
    ids = ours.encode(texts)
    assert ids.shape == (len(texts), CONTEXT_LENGTH) and ids.dtype == np.int32
    assert mismatches(texts, ids, reference_ids(clip_folder, texts)) == []


@pytest.mark.parametrize("context_length", [2, 3, 16, 100])
def test_other_context_lengths_match_transformers(ours, clip_folder, context_length):
    texts = [*corpus()[:200], *long_texts()]
    ids = ours.encode(texts, context_length=context_length)
    assert ids.shape == (len(texts), context_length)
    assert mismatches(texts, ids, reference_ids(clip_folder, texts, context_length)) == []


def test_known_clip_ids(ours):
    """Ids every CLIP port prints for this prompt, independent of any reference library."""
    ids = ours.encode("a photo of a cat")
    assert ids[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT]
    assert (ids[0, 7:] == EOT).all()  # CLIP's files pad with the end token
    assert (ours.sot_id, ours.eot_id, ours.pad_id, ours.vocab_size) == (SOT, EOT, EOT, 49408)


def test_text_clean_up(ours):
    """NFC, runs of whitespace to one space (stripped at the ends by the word split), lower case."""
    assert np.array_equal(ours.encode("  A\tPHOTO\n of \u00a0 a CAT\r\n "), ours.encode("a photo of a cat"))
    assert np.array_equal(ours.encode("cafe\u0301"), ours.encode("caf\u00e9"))


def openai_ids(texts) -> np.ndarray:
    """OpenAI's own tokenizer's ids (its clean-up included), cut and padded as CLIP does."""
    reference = openai_simple_tokenizer().SimpleTokenizer()
    ids = np.full((len(texts), CONTEXT_LENGTH), EOT)
    for row, text in zip(ids, texts):
        tokens = [SOT, *reference.encode(text)[:CONTEXT_LENGTH - 2], EOT]
        row[:len(tokens)] = tokens
    return ids


def test_bpe_matches_openai_clip_after_its_clean_up(ours):
    """An independent reference for the BPE itself: OpenAI's own tokenizer gives our ids for the text once its
    clean-up (ftfy, HTML unescaping, whitespace, lower case) is applied. Text holding a special token is left out:
    OpenAI's word pattern misses one glued to punctuation, where transformers (and we) cut it out anywhere."""
    openai = openai_simple_tokenizer()
    texts = [text for text in corpus() if "<|" not in text]
    cleaned = [openai.whitespace_clean(openai.basic_clean(text)).lower() for text in texts]
    assert mismatches(texts, ours.encode(cleaned), openai_ids(texts)) == []


def test_clean_up_is_transformers_not_openai(ours, clip_folder):
    """Where the two clean-ups differ, we give transformers' ids: HTML entities stay text, no ftfy fixes (curly
    quotes, full-width forms, ligatures)."""
    texts = ["Tom &amp; Jerry", "it\u2019s", "\uff46\uff55\uff4c\uff4c width", "\ufb01sh"]
    ids = ours.encode(texts)
    assert np.array_equal(ids, reference_ids(clip_folder, texts))
    assert not (ids == openai_ids(texts)).all(axis=1).any()


def test_truncation_keeps_the_end_token(ours):
    words = " ".join(["word"] * 200)  # "word" is one token
    full = ours.encode(words, context_length=300)[0]
    cut = ours.encode(words)[0]
    assert cut[0] == SOT and cut[-1] == EOT
    assert np.array_equal(cut[:-1], full[:CONTEXT_LENGTH - 1])
    exactly = ours.encode(" ".join(["word"] * 75))[0]  # 75 tokens + start + end fill the row without a cut
    assert np.array_equal(exactly, ours.encode(" ".join(["word"] * 76))[0])
    assert (exactly[1:-1] == full[1]).all()


def test_batch_rows_are_single_encodings(ours):
    texts = ["a photo of a cat", "", "x" * 500, "猫の写真"]
    batch = ours.encode(texts)
    for row, text in zip(batch, texts):
        assert np.array_equal(row, ours.encode(text)[0])
    assert ours.encode([]).shape == (0, CONTEXT_LENGTH)
    assert ours.encode(("a", "b")).shape == (2, CONTEXT_LENGTH)
    assert ours.encode("")[0, :3].tolist() == [SOT, EOT, EOT]


def test_pad_token_from_the_files(clip_folder, ours, tmp_path):
    """A pad token named in special_tokens_map.json (over tokenizer_config.json, as in transformers) pads the
    rows; it is not cut out of the text (transformers would cut `!` out, CLIP's BPE never does)."""
    folder = copy_folder(clip_folder, tmp_path / "pad", special_tokens_map={"pad_token": "!"},
                         tokenizer_config={"pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"})
    padded = CLIPTokenizer.from_folder(folder)
    assert padded.pad_id == 0
    texts = [text for text in corpus()[:400] if "!" not in text]
    ids = padded.encode(texts)
    assert np.array_equal(ids, reference_ids(folder, texts))
    bang = ["wow!!", "hello! world"]
    expected = ours.encode(bang)
    for row in expected:
        row[np.flatnonzero(row == EOT)[0] + 1:] = 0
    assert np.array_equal(padded.encode(bang), expected)


def test_tokenizer_json_alone_matches(clip_folder, ours, tmp_path):
    """The folder transformers' save_pretrained writes (tokenizer.json + tokenizer_config.json) gives the same ids
    as vocab.json + merges.txt."""
    saved = tmp_path / "saved"
    transformers.CLIPTokenizer.from_pretrained(str(clip_folder)).save_pretrained(str(saved))
    assert not (saved / "vocab.json").exists() and (saved / "tokenizer.json").exists()
    texts = corpus()[:300]
    assert np.array_equal(CLIPTokenizer.from_folder(saved).encode(texts), ours.encode(texts))


def test_tokenizer_json_takes_precedence(clip_folder, tmp_path):
    """With both present and disagreeing, tokenizer.json's vocabulary wins, as in transformers."""
    saved = tmp_path / "saved"
    transformers.CLIPTokenizer.from_pretrained(str(clip_folder)).save_pretrained(str(saved))
    tokenizer_json = json.loads((saved / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tokenizer_json["model"]["vocab"]
    vocab["a</w>"], vocab["photo</w>"] = vocab["photo</w>"], vocab["a</w>"]
    folder = copy_folder(clip_folder, tmp_path / "both", tokenizer=tokenizer_json)
    ids = CLIPTokenizer.from_folder(folder).encode("a photo")
    assert ids[0, :4].tolist() == [SOT, 1125, 320, EOT]
    assert np.array_equal(ids, reference_ids(folder, ["a photo"]))


SPECIAL_TEXTS = ["<|endoftext|>", "<|ENDOFTEXT|>", "<|StartOfText|>", "a<|endoftext|>b", "?<|endoftext|>!",
                 "<|startoftext|>hi", "x <|EndOfText|> y"]


def added_tokens_decoder(normalized: bool) -> dict:
    return {str(index): {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
                         "single_word": False, "special": True}
            for index, content in ((SOT, "<|startoftext|>"), (EOT, "<|endoftext|>"))}


@pytest.mark.parametrize("normalized", [False, True])
def test_special_tokens_in_text_follow_the_added_token_flags(clip_folder, tmp_path, normalized):
    """Text holding a special token gives transformers' ids: matched exactly, or after lower-casing when
    tokenizer_config.json's added_tokens_decoder (else tokenizer.json's added_tokens) says `normalized`."""
    config = {"tokenizer_class": "CLIPTokenizer", "added_tokens_decoder": added_tokens_decoder(normalized)}
    folder = copy_folder(clip_folder, tmp_path / "config", tokenizer_config=config)
    ids = CLIPTokenizer.from_folder(folder).encode(SPECIAL_TEXTS)
    assert mismatches(SPECIAL_TEXTS, ids, reference_ids(folder, SPECIAL_TEXTS)) == []
    assert (ids[1, :3].tolist() == [SOT, EOT, EOT]) == normalized

    saved = tmp_path / "saved"
    transformers.CLIPTokenizer.from_pretrained(str(clip_folder)).save_pretrained(str(saved))
    tokenizer_json = json.loads((saved / "tokenizer.json").read_text(encoding="utf-8"))
    for token in tokenizer_json["added_tokens"]:
        token["normalized"] = normalized
    (saved / "tokenizer.json").write_text(json.dumps(tokenizer_json), encoding="utf-8")
    ids = CLIPTokenizer.from_folder(saved).encode(SPECIAL_TEXTS)
    assert mismatches(SPECIAL_TEXTS, ids, reference_ids(saved, SPECIAL_TEXTS)) == []


def test_from_files(clip_folder, ours):
    tokenizer = CLIPTokenizer.from_files(vocab_file=clip_folder / "vocab.json",
                                         merges_file=clip_folder / "merges.txt")
    assert np.array_equal(tokenizer.encode(corpus()[:50]), ours.encode(corpus()[:50]))
    with pytest.raises(ValueError, match="tokenizer_file, or both vocab_file and merges_file"):
        CLIPTokenizer.from_files(vocab_file=clip_folder / "vocab.json")
    with pytest.raises(FileNotFoundError, match="nothing.json: no such file"):
        CLIPTokenizer.from_files(vocab_file=clip_folder / "vocab.json", merges_file=clip_folder / "merges.txt",
                                 special_tokens_map_file=clip_folder / "nothing.json")


def test_missing_files_are_named(clip_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        CLIPTokenizer.from_folder(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json, and no vocab.json or merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)
    only_vocab = tmp_path / "only-vocab"
    only_vocab.mkdir()
    shutil.copy(clip_folder / "vocab.json", only_vocab)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json, and no merges.txt\b"):
        CLIPTokenizer.from_folder(only_vocab)


def broken(clip_folder: Path, folder: Path, name: str, content: str) -> Path:
    shutil.copytree(clip_folder, folder)
    (folder / name).write_text(content, encoding="utf-8")
    return folder


@pytest.mark.parametrize("name, content, message", [
    ("vocab.json", "{not json", r"vocab.json: not valid JSON"),
    ("vocab.json", "[1, 2]", r"vocab.json: expected a JSON object, found list"),
    ("vocab.json", '{"a": "1"}', r"vocab.json: token 'a' has id '1', not a non-negative integer"),
    ("vocab.json", '{"a": 1, "b": 1}', r"vocab.json: two tokens share an id"),
    ("vocab.json", '{"a": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}', r"vocab.json and .*merges.txt: the "
                                                                          r"vocabulary and merges do not make"),
    ("merges.txt", "#version: 0.2\ni n\nt h x\n", r"merges.txt, line 3: expected two tokens"),
    ("merges.txt", "#version: 0.2\n", r"merges.txt: no merges"),
    ("special_tokens_map.json", '{"pad_token": "<pad>"}', r"the pad_token '<pad>' is not in the vocabulary"),
    ("special_tokens_map.json", '{"pad_token": {"lstrip": false}}', r"special_tokens_map.json: pad_token: expected"),
    ("tokenizer_config.json", '{"added_tokens_decoder": []}', r"tokenizer_config.json: added_tokens_decoder is not"),
    ("tokenizer_config.json", '{"added_tokens_decoder": {"1": {"id": 1}}}', r"added_tokens_decoder: an entry"),
    ("tokenizer.json", '{"model": {"type": "WordPiece", "vocab": {}}}', r"tokenizer.json: expected a BPE model, "
                                                                        r"found 'WordPiece'"),
    ("tokenizer.json", '{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [["a"]]}}',
     r"tokenizer.json: model.merges holds \['a'\], not a pair"),
])
def test_malformed_files_are_named(clip_folder, tmp_path, name, content, message):
    folder = broken(clip_folder, tmp_path / "broken", name, content)
    with pytest.raises(TokenizerFileError, match=message):
        CLIPTokenizer.from_folder(folder)


def test_bad_inputs(ours):
    with pytest.raises(TypeError, match="encode takes strings, got int"):
        ours.encode(["a photo", 3])
    with pytest.raises(ValueError, match="context_length=1"):
        ours.encode("a photo", context_length=1)
