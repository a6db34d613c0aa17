"""The image-encoding pipeline (`mlx_aim.tasks.encode`) on its own: a model-free encode function over a few tiny PNGs,
a recording sink. What classify, extract_features, the probe's features and search's index build on: every batch
reaches the sink once, skipped files are listed in input order, grouped batches carry their input positions, and
the two timings are there."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_aim.data import load_image
from mlx_aim.tasks.encode import EncodedBatch, EncodeRun, input_order, to_numpy
from probe_helpers import save_image

# (height, width) of each input in order; None: a file that cannot be used.
SIZES = [(8, 8), None, (8, 12), (12, 8), None, (8, 8), (8, 12), (8, 8)]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate(SIZES):
        path = root / f"{i:02d}.png"
        if size is None:
            path.write_text("not a PNG")
        else:
            save_image(path, rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        paths.append(path)
    return paths


def native_size(path) -> np.ndarray:
    """Each image at its own size, as a native-resolution model's preprocessing keeps it."""
    return np.asarray(load_image(path), np.float32) / 255


def pixel_sums(images: mx.array) -> dict[str, mx.array]:
    return {"sum": images.sum(axis=(1, 2, 3))}


class Recorder:
    """Every batch it is given, and every close."""

    def __init__(self):
        self.batches: list[EncodedBatch] = []
        self.closed: list[list[str]] = []

    def add(self, batch: EncodedBatch) -> None:
        assert not self.closed, "a batch after close"
        self.batches.append(batch)

    def close(self, skipped) -> None:
        self.closed.append([path for path, _ in skipped.items])


GOOD = [i for i, size in enumerate(SIZES) if size is not None]


def test_every_batch_reaches_the_sink_once_with_its_labels(images):
    run = EncodeRun(native_size, batch_size=2, num_workers=2, group_by_shape=True, progress=False)
    sink = Recorder()
    samples = [(path, f"label-{i}") for i, path in enumerate(images)]
    skipped = run.encode(samples, pixel_sums, sink)
    indices = [i for batch in sink.batches for i in batch.indices]
    assert sorted(indices) == GOOD and len(set(indices)) == len(indices)  # each image once
    assert len(sink.closed) == 1 and sink.closed[0] == [str(images[i]) for i in (1, 4)]
    assert [path for path, _ in skipped.items] == [path for path, _ in run.skipped.items] == sink.closed[0]
    for batch in sink.batches:
        assert 1 <= len(batch) <= 2 and batch.outputs["sum"].shape == (len(batch),)
        assert batch.labels == [f"label-{i}" for i in batch.indices]
        assert batch.paths == [images[i] for i in batch.indices]
        assert {SIZES[i] for i in batch.indices} == {batch.image_size}  # one size a batch
        assert batch.grid(4) == (batch.image_size[0] // 4, batch.image_size[1] // 4)


def test_grouped_batches_come_back_in_input_order(images):
    run = EncodeRun(native_size, batch_size=2, num_workers=2, group_by_shape=True, progress=False)
    sink = Recorder()
    run.encode(images, pixel_sums, sink)
    indices = [i for batch in sink.batches for i in batch.indices]
    assert indices != sorted(indices)  # grouping by size did reorder them: the test means something
    sums = np.concatenate([batch.outputs["sum"] for batch in sink.batches])
    order = input_order(indices)
    assert [indices[k] for k in order] == GOOD
    expected = [native_size(images[i]).sum() for i in GOOD]
    np.testing.assert_allclose(sums[order], expected, rtol=1e-5)
    assert all(batch.labels == [None] * len(batch) for batch in sink.batches)  # bare paths carry no label


def test_chunks_share_the_run_and_its_skipped_list_in_input_order(images, tmp_path):
    run = EncodeRun(native_size, batch_size=3, num_workers=0, group_by_shape=True, progress=False)
    paths = run.gather([tmp_path / "missing", *images])
    assert paths == images and [path for path, _ in run.skipped.items] == [str(tmp_path / "missing")]
    sinks = []
    with run.progress_bar(len(paths)):
        for lo in range(0, len(paths), 4):  # shards of 4: bad files at 1 and 4 fall in one each
            sinks.append(Recorder())
            run.encode(paths[lo : lo + 4], pixel_sums, sinks[-1])
    assert [sink.closed for sink in sinks] == [[[str(images[1])]], [[str(images[4])]]]
    assert [path for path, _ in run.skipped.items] == [str(tmp_path / "missing"), str(images[1]), str(images[4])]
    assert run.num_encoded == len(GOOD)
    # Indices are positions in each chunk's inputs.
    assert sorted(i for batch in sinks[1].batches for i in batch.indices) == [1, 2, 3]


def test_timing_fields(images):
    run = EncodeRun(native_size, batch_size=4, num_workers=0, progress=False, group_by_shape=True)
    run.encode(images, pixel_sums, Recorder())
    seconds = run.seconds
    assert 0 < run.model_seconds <= seconds  # model time is part of the wall time
    assert run.num_encoded == len(GOOD)
    assert run.seconds >= seconds  # the wall clock runs on until read


def test_an_interrupted_chunk_is_not_closed(images):
    """What keeps sharded writers kill-safe: a sink writes its shard on close, and a chunk that dies midway is never
    closed."""
    calls = []

    def dies_on_the_second_batch(images):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return pixel_sums(images)

    run = EncodeRun(native_size, batch_size=2, num_workers=2, group_by_shape=True, progress=False)
    sink = Recorder()
    with pytest.raises(KeyboardInterrupt):
        run.encode(images, dies_on_the_second_batch, sink)
    assert len(sink.batches) == 1 and sink.closed == []


def test_outputs_come_as_numpy_of_their_own_dtype():
    assert to_numpy(mx.array([1.5], mx.bfloat16), None).dtype == np.float32  # numpy has no bfloat16
    assert to_numpy(mx.array([3], mx.uint32), None).dtype == np.uint32  # class indices stay integers
    assert to_numpy(mx.array([1.5], mx.float16)).dtype == np.float32


def test_the_pipeline_and_its_jobs_import_neither_zero_shot_nor_model_opening():
    """Zero-shot is a task built on classification, and `inference.open_model` (which opens zero-shot heads) sits
    above both: the pipeline and the jobs on it load neither."""
    code = ("import json, sys, mlx_aim.tasks.classify, mlx_aim.tasks.features, mlx_aim.tasks.search, "
            "mlx_aim.training.probe; print(json.dumps(sorted(m for m in sys.modules if m.startswith('mlx_aim.'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "mlx_aim.tasks.encode" in loaded
    assert "mlx_aim.tasks.zeroshot" not in loaded and "mlx_aim.tasks.inference" not in loaded
