"""mlx_aim.tasks.lit: a LiT with the tokenizer shipped beside it, and its unit-length text and image embeddings."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from lit_helpers import tiny_lit_config
from mlx_aim import convert
from mlx_aim.apps.benchmark import write_random_model
from mlx_aim.models.config import AIMv2Config
from mlx_aim.tasks.lit import embed_images, embed_texts, load_tokenizer, open_lit, similarities
from mlx_aim.checkpoints.loading import tokenizer_folder
from mlx_aim.models.model import normalized


def test_open_lit_reads_the_tokenizer_beside_the_weights(lit_folder):
    model, tokenizer = open_lit(lit_folder)
    assert model.config == tiny_lit_config().replace(name=model.config.name)
    assert (tokenizer.sot_id, tokenizer.eot_id, tokenizer.vocab_size) == (49406, 49407, 49408)


def test_text_embeddings_are_the_models_in_batches(lit_folder):
    model, tokenizer = open_lit(lit_folder)
    texts = ["a photo of a cat", "A PHOTO OF A CAT", "a red bicycle at night", "", "x " * 200]
    got = embed_texts(model, tokenizer, texts, batch_size=2)
    assert got.shape == (5, 16) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
    ids = mx.array(tokenizer.encode(texts))
    expected = np.asarray(normalized(model.encode_text(ids)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[0], got[1])  # the tokenizer lower-cases
    assert embed_texts(model, tokenizer, []).shape == (0, 16)


def test_similarities_times_the_scale_are_the_models_logits(lit_folder):
    model, tokenizer = open_lit(lit_folder)
    images = mx.array(np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32))
    texts = ["one", "two", "three", "four"]
    logits_per_image, _ = model(images, mx.array(tokenizer.encode(texts)))
    got = similarities(np.asarray(embed_images(model, images)), embed_texts(model, tokenizer, texts),
                       float(model.logit_scale))
    np.testing.assert_allclose(got, np.asarray(logits_per_image), rtol=1e-5, atol=1e-5)


def test_a_conversion_carries_the_tokenizer_over(lit_folder, tmp_path):
    out = convert(lit_folder, tmp_path / "converted", dtype="bfloat16")
    assert (out / "vocab.json").read_bytes() == (lit_folder / "vocab.json").read_bytes()
    assert tokenizer_folder(out) == out
    model, tokenizer = open_lit(out)
    assert model.dtype == mx.bfloat16 and tokenizer.eot_id == 49407


def test_a_folder_without_tokenizer_files_is_named(lit_folder, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(lit_folder, bare)
    for name in ("vocab.json", "merges.txt"):
        (bare / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"{bare}: no tokenizer files"):
        load_tokenizer(bare)


def test_an_image_encoder_is_not_a_lit(tmp_path):
    folder = write_random_model(tmp_path / "encoder", AIMv2Config(image_size=16, patch_size=4, width=32, depth=1,
                                                                   num_heads=2, hidden_dim=64, num_classes=3))
    with pytest.raises(ValueError, match="not an AIMv2-LiT model"):
        open_lit(folder)


def test_a_tokenizer_that_does_not_fit_the_text_tower_is_refused(lit_folder, tmp_path):
    small = tmp_path / "small-vocab"
    write_random_model(small, tiny_lit_config().replace(vocab_size=1000, eos_token_id=999))
    shutil.copyfile(lit_folder / "vocab.json", small / "vocab.json")
    shutil.copyfile(lit_folder / "merges.txt", small / "merges.txt")
    with pytest.raises(ValueError, match="does not fit its text tower"):
        open_lit(small)
    assert json.loads((small / "config.json").read_text())["vocab_size"] == 1000


def test_released_lits_tokenizer_from_an_offline_cache(lit_folder, tmp_path):
    """The released LiT's tokenizer is read from its hub snapshot at Apple's pinned revision, in a fresh interpreter
    offline: the files a download with `open_lit("aimv2-large-patch14-224-lit")` would have put there."""
    import subprocess
    import sys

    from mlx_aim.checkpoints.loading import AIMV2_REVISIONS, LIT_NAME
    from test_aimv2_loading import hub_snapshot, offline_env

    snapshot = hub_snapshot(tmp_path / "hub", f"apple/{LIT_NAME}", AIMV2_REVISIONS[LIT_NAME])
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(lit_folder / name, snapshot / name)
    code = (f"from mlx_aim.tasks.lit import load_tokenizer; t = load_tokenizer({LIT_NAME!r}); "
            "print(t.encode('a red bicycle at night')[0, :7].tolist())")
    result = subprocess.run([sys.executable, "-c", code], env=offline_env(tmp_path), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    ids = load_tokenizer(lit_folder).encode("a red bicycle at night")[0, :7].tolist()
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ids
