"""Zero-shot classification with AIMv2-LiT (mlx_aim.tasks.zeroshot, `mlx-aim zero-shot`, `classify --head` with a
zero-shot head), on a tiny random-weight LiT and generated images, against independent computations: the model's
own logits_per_image for one template, numpy template ensembling for several."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from clip_vocab import write_clip_tokenizer_files
from conftest import last_json, run_script
from lit_helpers import tiny_lit_config
from mlx_aim.apps.benchmark import write_random_model
from mlx_aim.cli import classify as classify_cli
from mlx_aim.cli import zero_shot as zero_shot_cli
from mlx_aim.models.config import AIMv2Config
from mlx_aim.data import imagenet_classes, preprocessing_for
from mlx_aim.tasks.classify import classify
from mlx_aim.tasks.inference import open_model
from mlx_aim.models.layers import AttentionProbe
from mlx_aim.training.probe import save_head
from mlx_aim.tasks.zeroshot import (
    ZeroShotClassifier, build_head, class_embeddings, default_templates, is_zero_shot_head, open_zero_shot,
    read_labels, read_templates, read_zero_shot_head,
)
from probe_helpers import save_image

LABELS = ["cat", "dog", "a red bicycle at night"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four readable images of different sizes and modes, a truncated JPEG and a text file named .jpg."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    save_image(root / "a" / "wide.png", rng.integers(0, 256, (40, 57, 3), dtype=np.uint8))
    save_image(root / "a" / "gray.png", rng.integers(0, 256, (45, 30), dtype=np.uint8))
    save_image(root / "b" / "small.png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    save_image(root / "b" / "rgba.png", rng.integers(0, 256, (33, 33, 4), dtype=np.uint8))
    save_image(root / "whole.jpg", np.full((32, 32, 3), 90, np.uint8))
    data = (root / "whole.jpg").read_bytes()
    (root / "whole.jpg").unlink()
    (root / "corrupt.jpg").write_bytes(data[: len(data) // 2])
    (root / "not_an_image.jpg").write_text("this is text, not a JPEG")
    return root


def good_paths(root):
    return sorted(p for p in root.rglob("*.png"))


def bad_paths(root):
    return {str(root / "corrupt.jpg"), str(root / "not_an_image.jpg")}


def model_input(model, paths):
    transform = preprocessing_for(model.config.image)
    return mx.array(np.stack([transform(p) for p in paths]))


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def probabilities(prediction, num_labels):
    """A prediction's probabilities by label index (top-k covering every label)."""
    out = np.full(num_labels, np.nan)
    for t in prediction["top_k"]:
        out[t["index"]] = t["probability"]
    return out


def test_one_template_gives_the_models_own_probabilities(lit, photos):
    model, tokenizer = lit
    head = build_head(model, tokenizer, LABELS, ["{}"])
    result = classify(ZeroShotClassifier(model, head), [photos], top_k=len(LABELS), batch_size=3, labels=LABELS,
                      progress=False)
    paths = good_paths(photos)
    assert [p["path"] for p in result.predictions] == [str(p) for p in paths]
    assert {item["path"] for item in result.skipped.to_list()} == bad_paths(photos)
    logits_per_image, _ = model(model_input(model, paths), mx.array(tokenizer.encode(LABELS)))
    expected = softmax(np.asarray(logits_per_image, np.float64))
    got = np.stack([probabilities(p, len(LABELS)) for p in result.predictions])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    for p, row in zip(result.predictions, got):
        assert p["top_k"][0]["label"] == LABELS[int(np.argmax(row))]


def test_template_ensembling_is_the_mean_of_unit_embeddings(lit, photos):
    model, tokenizer = lit
    templates = ["a photo of a {}.", "{} at night", "art of the {}, {}"]
    got = class_embeddings(model, tokenizer, LABELS, templates, batch_size=4)
    expected = []
    for label in LABELS:
        texts = [t.replace("{}", label) for t in templates]
        e = np.asarray(model.encode_text(mx.array(tokenizer.encode(texts))), np.float64)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        mean = e.mean(axis=0)
        expected.append(mean / np.linalg.norm(mean))
    np.testing.assert_allclose(got, np.array(expected), atol=1e-5)
    assert not np.allclose(got, class_embeddings(model, tokenizer, LABELS, ["{}"]), atol=1e-3)  # templates matter
    # The classifier's logits: the logit scale times each image's cosine to each class embedding.
    head = build_head(model, tokenizer, LABELS, templates)
    x = model_input(model, good_paths(photos))
    image = np.asarray(model.encode_image(x), np.float64)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    scale = float(np.exp(np.clip(float(model.log_logit_scale), 0, np.log(100))))
    np.testing.assert_allclose(np.asarray(ZeroShotClassifier(model, head)(x)), scale * image @ np.array(expected).T,
                               rtol=1e-4, atol=1e-4)


def test_template_and_label_files(tmp_path):
    templates = default_templates()
    assert len(templates) == 80 and len(set(templates)) == 80
    assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."
    good = tmp_path / "templates.txt"
    good.write_text("# mine\n\na photo of a {}.\n  {} at night  \n")
    assert read_templates(good) == ["a photo of a {}.", "{} at night"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\n\na photo without a slot\n")
    with pytest.raises(ValueError, match=f"{bad}, line 3: 'a photo without a slot' has no {{}}"):
        read_templates(bad)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\n\n  dog \ncar\n")
    assert read_labels(labels) == ["cat", "dog", "car"]
    labels.write_text("cat\ndog\n\ncat\n")
    with pytest.raises(ValueError, match=f"{labels}, line 4: label 'cat' is also on line 1"):
        read_labels(labels)


def test_zero_shot_script_end_to_end(lit, lit_folder, photos, tmp_path):
    result = run_script("scripts/zero_shot.py", "--model", lit_folder, "--labels", " cat,dog , a red bicycle at night",
                        "--top-k", 2, "--batch-size", 3, "--json", photos)
    summary = last_json(result.stdout)
    assert summary["num_images"] == 4 and summary["num_labels"] == 3 and summary["num_templates"] == 80
    assert {item["path"] for item in summary["skipped"]} == bad_paths(photos)
    assert "skipped 2 input(s):" in result.stdout and str(photos / "corrupt.jpg") in result.stdout
    # The same numbers as the library with the default templates, top-2 of them.
    model, tokenizer = lit
    expected = classify(ZeroShotClassifier(model, build_head(model, tokenizer, LABELS)), [photos], top_k=2,
                        labels=LABELS, progress=False)
    assert [p["path"] for p in summary["predictions"]] == [p["path"] for p in expected.predictions]
    for got, want in zip(summary["predictions"], expected.predictions):
        assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]
        np.testing.assert_allclose([t["probability"] for t in got["top_k"]],
                                   [t["probability"] for t in want["top_k"]], rtol=1e-5)
        assert f"{got['path']}: {got['top_k'][0]['label']} (" in result.stdout
    # A labels file, and nothing readable: exit status 1.
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\n\ndog\n")
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "x.png").write_text("not a PNG")
    empty = run_script("scripts/zero_shot.py", "--model", lit_folder, "--labels-file", labels, "--json",
                       "--no-progress", unreadable, check_rc=1)
    assert last_json(empty.stdout)["num_images"] == 0 and last_json(empty.stdout)["num_labels"] == 2


def test_imagenet_labels_and_a_template_file(lit_folder, photos, tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a photo of a {}.\n")
    result = run_script("scripts/zero_shot.py", "--model", lit_folder, "--imagenet", "--templates", one, "--top-k", 3,
                        "--json", "--no-progress", photos / "a")
    summary = last_json(result.stdout)
    names = imagenet_classes()
    assert summary["num_labels"] == 1000 and summary["num_templates"] == 1 and summary["templates"] == str(one)
    assert summary["num_images"] == 2
    for pred in summary["predictions"]:
        assert [t["label"] for t in pred["top_k"]] == [names[t["index"]] for t in pred["top_k"]]
        assert pred["top_k"][0]["probability"] >= pred["top_k"][-1]["probability"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\nno slot here\n")
    refused = run_script("scripts/zero_shot.py", "--model", lit_folder, "--imagenet", "--templates", bad, photos,
                         check_rc=2)
    assert f"{bad}, line 2: 'no slot here' has no {{}} where the label goes" in refused.stderr


def test_usage_errors(lit_folder, photos, tmp_path, capsys):
    def refused(*argv):
        with pytest.raises(SystemExit) as done:
            zero_shot_cli.main([*map(str, argv)])
        assert done.value.code == 2
        return capsys.readouterr().err

    assert "--save-head FILE, or both" in refused("--model", lit_folder, "--labels", "a,b")
    assert "not allowed with argument" in refused("--model", lit_folder, "--labels", "a", "--imagenet", photos)
    assert "one of the arguments --labels --labels-file --imagenet is required" in refused("--model", lit_folder,
                                                                                             photos)

    def fails(*argv):
        assert zero_shot_cli.main([*map(str, argv), "--no-progress"]) == 2
        return capsys.readouterr().err

    assert "--labels: label 'cat' is given twice (labels 1 and 3)" in fails("--model", lit_folder, "--labels",
                                                                          "cat,dog,cat", photos)
    assert "--labels: label 2 is ''" in fails("--model", lit_folder, "--labels", "cat,,dog", photos)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\ndog\n")
    assert f"{labels}, line 3: label 'dog' is also on line 2" in fails("--model", lit_folder, "--labels-file", labels,
                                                                      photos)
    encoder = write_random_model(tmp_path / "encoder", AIMv2Config(image_size=16, patch_size=4, width=32, depth=1,
                                                                   num_heads=2, hidden_dim=64, num_classes=3))
    assert "not an AIMv2-LiT model" in fails("--model", encoder, "--labels", "a,b", photos)
    nowhere = tmp_path / "nowhere" / "head.safetensors"
    assert f"--save-head {nowhere}: its folder does not exist" in fails("--model", lit_folder, "--labels", "a,b",
                                                                       "--save-head", nowhere)


@pytest.fixture(scope="module")
def saved_head(lit_folder, tmp_path_factory):
    """A head saved by the command alone (no images), with two templates."""
    folder = tmp_path_factory.mktemp("head")
    templates = folder / "templates.txt"
    templates.write_text("a photo of a {}.\nart of the {}.\n")
    head = folder / "zero-shot.safetensors"
    result = run_script("scripts/zero_shot.py", "--model", lit_folder, "--labels", ",".join(LABELS),
                        "--templates", templates, "--save-head", head, "--json", "--no-progress")
    assert last_json(result.stdout) == {"model": str(lit_folder), "num_labels": 3, "num_templates": 2,
                                        "templates": str(templates), "head": str(head)}
    return head


def test_a_saved_head_classifies_as_zero_shot_does(lit_folder, photos, saved_head, tmp_path):
    saved = read_zero_shot_head(saved_head)
    assert saved.classes == LABELS and saved.templates == ["a photo of a {}.", "art of the {}."]
    assert saved.model == str(lit_folder) and saved.class_embeddings.shape == (3, 16)
    assert is_zero_shot_head(saved_head)
    direct = run_script("scripts/zero_shot.py", "--model", lit_folder, "--labels", ",".join(LABELS), "--templates",
                        saved_head.parent / "templates.txt", "--top-k", 3, "--json", "--no-progress", photos)
    with_head = run_script("scripts/classify.py", "--model", lit_folder, "--head", saved_head, "--top-k", 3, "--json",
                           "--no-progress", photos)
    a, b = last_json(direct.stdout), last_json(with_head.stdout)
    assert b["head"] == str(saved_head) and b["num_images"] == 4
    assert {item["path"] for item in b["skipped"]} == bad_paths(photos)
    assert [p["path"] for p in a["predictions"]] == [p["path"] for p in b["predictions"]]
    for x, y in zip(a["predictions"], b["predictions"]):
        assert [t["label"] for t in x["top_k"]] == [t["label"] for t in y["top_k"]]
        np.testing.assert_allclose([t["probability"] for t in x["top_k"]], [t["probability"] for t in y["top_k"]],
                                   rtol=1e-6)
    # The image side only: the text tower is neither loaded nor held.
    classifier = open_zero_shot(lit_folder, saved_head)
    assert not classifier.model.has_text_tower
    assert not any(k.startswith(("text_encoder.", "text_projector."))
                   for k, _ in tree_flatten(classifier.model.parameters()))
    assert isinstance(open_model(lit_folder, head=saved_head), ZeroShotClassifier)


def test_heads_that_do_not_fit_are_refused(lit_folder, photos, saved_head, tmp_path, capsys):
    def refused(model, head, *extra):
        assert classify_cli.main(["--model", str(model), "--head", str(head), "--no-progress", *extra,
                                  str(photos)]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1
        return errors[0]

    # An attentive-probe head on the LiT.
    probe_head = save_head(tmp_path / "probe.safetensors", AttentionProbe(32, 2, 3))
    assert not is_zero_shot_head(probe_head)
    message = refused(lit_folder, probe_head)
    assert str(probe_head) in message and "takes no probe head file" in message
    # The zero-shot head on an image encoder.
    encoder = write_random_model(tmp_path / "encoder", AIMv2Config(image_size=16, patch_size=4, width=32, depth=1,
                                                                   num_heads=2, hidden_dim=64, num_classes=3))
    message = refused(encoder, saved_head)
    assert str(saved_head) in message and "a zero-shot head" in message and "AIMv2, which has no text tower" in message
    # On a LiT of another projection size, or another architecture.
    narrow = write_random_model(tmp_path / "narrow-lit", tiny_lit_config().replace(projection_dim=8))
    write_clip_tokenizer_files(narrow)
    message = refused(narrow, saved_head)
    assert f"{saved_head}: class embeddings of size 16" in message and "in 8 dimensions" in message
    deeper = write_random_model(tmp_path / "deeper-lit", tiny_lit_config().replace(text_depth=3))
    message = refused(deeper, saved_head)
    assert str(saved_head) in message and "another architecture" in message and "text_depth" in message
    # Options that do not apply to a zero-shot head.
    assert "probe layers and max_patches do not apply" in refused(lit_folder, saved_head, "--max-patches", "9")
    # A file that is no head at all.
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not safetensors")
    with pytest.raises(ValueError, match=f"{junk}: cannot read as safetensors"):
        is_zero_shot_head(junk)
    with pytest.raises(ValueError, match=f"{junk}: cannot read as safetensors"):
        read_zero_shot_head(junk)
    message = refused(lit_folder, junk)  # named as unreadable, not refused as a probe head on a LiT
    assert f"{junk}: cannot read as safetensors" in message and "probe head" not in message
    with pytest.raises(ValueError, match="not a zero-shot head file"):
        read_zero_shot_head(probe_head)
