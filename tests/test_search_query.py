"""Query algebra (mlx_aim.tasks.query, `mlx-aim search query "2:dog + ./my_dog.jpg - people"`): the parser's terms
and refusals, the query vector against the formula computed apart in numpy from the tiny LiT's raw projections, and
--threshold / --paths-only."""

import os

import mlx.core as mx
import numpy as np
import pytest

from conftest import last_json
from mlx_aim.cli.search import main as search_main
from mlx_aim.data import preprocessing_for
from mlx_aim.tasks.query import (
    IMAGE, MAX_QUERY_CHARS, MAX_TERMS, ROW, TEXT, Query, QueryError, check_threshold, parse_query, query_vector,
)
from mlx_aim.tasks.lit import embed_texts, trim_padding
from mlx_aim.tasks.search import SearchIndex, build_index
from test_search import NUM_PHOTOS, listed, photos, write_photo  # noqa: F401 (photos is a fixture)


def terms(text, **kwargs):
    return [(t.sign, t.weight, t.kind, t.value) for t in parse_query(text, **kwargs).terms]


def test_the_parser_reads_signs_weights_quotes_paths_and_rows():
    assert terms("beach + sunset - people") == [(1, 1, TEXT, "beach"), (1, 1, TEXT, "sunset"),
                                                (-1, 1, TEXT, "people")]
    assert terms("2:dog + ./my_dog.jpg") == [(1, 2, TEXT, "dog"), (1, 1, IMAGE, "./my_dog.jpg")]
    assert terms("0.5:beach -  1e-1:~/x.png + #12") == [(1, 0.5, TEXT, "beach"), (-1, 0.1, IMAGE, "~/x.png"),
                                                       (1, 1, ROW, "12")]
    # Operators stand alone between spaces; anything else is text.
    assert terms("a black-and-white photo of c++ at -30 degrees") == [
        (1, 1, TEXT, "a black-and-white photo of c++ at -30 degrees")]
    # Quotes group: operators and colons inside stay text; a path with spaces is still a path.
    assert terms('"10:30 am" - 2:"salt + pepper" + "/My Photos/dog 1.jpg"') == [
        (1, 1, TEXT, "10:30 am"), (-1, 2, TEXT, "salt + pepper"), (1, 1, IMAGE, "/My Photos/dog 1.jpg")]
    assert terms("dog.jpg + ../up.jpg") == [(1, 1, TEXT, "dog.jpg"), (1, 1, IMAGE, "../up.jpg")]  # spelling only
    assert Query.image("my photo.jpg").terms[0].kind == IMAGE  # --image: any path, not parsed
    assert terms("#007")[0][3] == "7"


@pytest.mark.parametrize("text, message", [
    ("", r"term 1 is empty"),
    ("cat +  + dog", r"term 2 is empty"),
    ("- people", r"term 1 is empty"),
    ("cat - ", r"term 2 is empty"),
    ("0:cat", r"term 1 \('0:cat'\): '0' is not a weight"),
    ("cat + 1.2.3:dog", r"term 2 \('1.2.3:dog'\): '1.2.3' is not a weight"),
    ("-2:cat", r"'-2' is not a weight"),
    ("1e999:cat", r"'1e999' is not a weight"),
    ("5000:cat", r"at most 1000"),
    ("2:", r"term 1 \('2:'\) is empty"),
    ('"cat', r"a quote is not closed"),
    ('a "big" cat', r"term 1 .*a quote inside a term"),
    ("#1234567890123", r"row number too long"),
    ("x" * (MAX_QUERY_CHARS + 1), rf"{MAX_QUERY_CHARS + 1} characters long; at most {MAX_QUERY_CHARS}"),
    (" + ".join(["cat"] * (MAX_TERMS + 1)), rf"{MAX_TERMS + 1} terms; at most {MAX_TERMS}"),
    ("cat\0", r"NUL"),
])
def test_malformed_queries_are_refused_naming_the_term(text, message):
    with pytest.raises(QueryError, match=message):
        parse_query(text)


def test_image_paths_can_be_refused_and_thresholds_checked():
    with pytest.raises(QueryError, match=r"term 2 \('/etc/passwd'\): image files are not taken here"):
        parse_query("cat + /etc/passwd", image_paths=False)
    assert terms("cat + #3", image_paths=False)[1] == (1, 1, ROW, "3")
    assert check_threshold("0.25") == 0.25 and check_threshold(-1) == -1.0
    for bad in ("1.5", "nan", "x", None):
        with pytest.raises(QueryError, match="a number from -1 to 1"):
            check_threshold(bad)


def unit(v):
    v = np.asarray(v, np.float64).reshape(-1)
    return v / np.linalg.norm(v)


def test_the_query_vector_is_the_normalised_weighted_sum_of_unit_embeddings(lit_folder, lit, photos, tmp_path,
                                                                            capsys):
    """An independent numpy computation of q = normalize(sum s_i w_i e_i/|e_i|), every score in the CLI's answer
    compared with it; the outside image is embedded by the model, the indexed one and the row come from the index."""
    model, tokenizer = lit
    out = tmp_path / "index"
    assert search_main(["index", "--model", str(lit_folder), "--out", str(out), str(photos), "--no-progress"]) == 0
    outside = write_photo(tmp_path / "elsewhere" / "probe.png", 40)
    indexed = photos / "trip" / "03.png"
    index = SearchIndex.open(out)
    row = 5
    query = f'2:a red disc - 0.5:"stripes + dots" + {outside} + 0.25:{indexed} - 3:#{row}'
    capsys.readouterr()
    assert search_main(["query", "--index", str(out), query, "--top-k", "100", "--json"]) == 0
    result = last_json(capsys.readouterr().out)
    assert result["model_loaded"] and [t["kind"] for t in result["query"]["terms"]] == [
        TEXT, TEXT, IMAGE, IMAGE, ROW]

    prep = preprocessing_for(model.config.image)

    def text(t):
        return unit(model.encode_text(mx.array(tokenizer.encode([t])))[0])

    def image(p):
        return unit(model.encode_image(mx.array(prep(p)[None]))[0])

    paths = listed(photos)
    rows = np.stack([image(p) for p in paths])
    expected_q = unit(2 * text("a red disc") - 0.5 * text("stripes + dots") + image(outside)
                      + 0.25 * image(indexed) - 3 * rows[paths.index(index.row_path(row))])
    got = {r["path"]: r["score"] for r in result["results"]}
    assert sorted(got) == paths
    np.testing.assert_allclose([got[p] for p in paths], rows @ expected_q, rtol=1e-4, atol=1e-5)

    # The library: the same vector; only stored rows: no model opened; text: the tokenizer asked for once.
    calls = []

    def open_model(with_tokenizer):
        calls.append(with_tokenizer)
        return model, tokenizer, prep

    found = query_vector(parse_query(query), index, open_model, "tiny-lit")
    np.testing.assert_allclose(found.vector, expected_q, rtol=1e-4, atol=1e-5)
    assert calls == [True] and np.linalg.norm(found.vector) == pytest.approx(1, abs=1e-6)
    stored_only = query_vector(parse_query(f"{indexed} - 0.5:#{row}"), index, open_model)
    assert calls == [True] and not stored_only.model_loaded
    np.testing.assert_allclose(stored_only.vector, unit(image(indexed) - 0.5 * rows[paths.index(index.row_path(row))]),
                               rtol=1e-4, atol=1e-5)
    query_vector(parse_query(str(outside)), index, open_model)
    assert calls == [True, False]  # an image outside the index: the model, without its tokenizer


def test_unanswerable_terms_are_refused_naming_them(lit, photos, tmp_path):
    model, tokenizer = lit
    build_index(model, [photos], tmp_path / "index", model_name="tiny-lit", progress=False)
    index = SearchIndex.open(tmp_path / "index")

    def open_model(with_tokenizer):
        return model, tokenizer, preprocessing_for(model.config.image)

    for text, message in [(f"cat + #{NUM_PHOTOS}", rf"term 2 \('#{NUM_PHOTOS}'\): row {NUM_PHOTOS}: the index has "
                           rf"rows 0 to {NUM_PHOTOS - 1}"),
                          ("cat - cat", "the terms cancel out"),
                          ("2:#1 - #1 - #1", "the terms cancel out"),
                          (f"cat + {tmp_path}/missing.jpg", r"term 2 .*missing.jpg.*no such file")]:
        with pytest.raises(QueryError, match=message):
            query_vector(parse_query(text), index, open_model)


def test_threshold_and_paths_only(lit_folder, photos, tmp_path, capsys):
    out = tmp_path / "index"
    assert search_main(["index", "--model", str(lit_folder), "--out", str(out), str(photos), "--no-progress"]) == 0
    capsys.readouterr()
    assert search_main(["query", "--index", str(out), "a disc", "--top-k", "100", "--json"]) == 0
    scores = sorted((r["score"] for r in last_json(capsys.readouterr().out)["results"]), reverse=True)
    cut = (scores[2] + scores[3]) / 2  # three photos pass it
    assert search_main(["query", "--index", str(out), "a disc", "--threshold", str(cut), "--json"]) == 0
    result = last_json(capsys.readouterr().out)
    assert [r["score"] for r in result["results"]] == pytest.approx(scores[:3])
    assert result["threshold"] == cut and result["top_k"] is None  # --threshold alone: every photo that passes
    assert search_main(["query", "--index", str(out), "a disc", "--threshold", str(cut), "--top-k", "2",
                        "--paths-only"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(os.path.isabs(p) and os.path.isfile(p) for p in lines)
    assert [p for p in lines] == [r["path"] for r in result["results"][:2]]
    # Nothing passes: exit status 1, stdout empty, the reason on stderr.
    assert search_main(["query", "--index", str(out), "a disc", "--threshold", "1", "--paths-only"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "no photo scores at least 1" in captured.err
    assert search_main(["query", "--index", str(out), "0:a disc"]) == 2
    assert "'0' is not a weight" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        search_main(["query", "--index", str(out), "a disc", "--threshold", "2"])
    with pytest.raises(SystemExit):
        search_main(["query", "--index", str(out), "a disc", "--paths-only", "--json"])


def test_texts_skip_the_padding_after_their_end_token(lit):
    """The text tower is causal and pools each row's first end token: embedding only up to the longest row's end
    token (what a query costs) gives the full context's embeddings."""
    model, tokenizer = lit
    texts = ["a dog", "a very long description of a red bicycle leaning on a wall at night", "sunset"]
    ids = tokenizer.encode(texts, context_length=model.config.context_length)
    trimmed = trim_padding(ids, model.config.eos_token_id)
    assert trimmed.shape == (3, int(np.argmax(ids[1] == model.config.eos_token_id)) + 1) and trimmed.shape[1] < 40
    full = np.stack([unit(row) for row in np.asarray(model.encode_text(mx.array(ids)))])
    np.testing.assert_allclose(embed_texts(model, tokenizer, texts), full, rtol=1e-5, atol=1e-6)
