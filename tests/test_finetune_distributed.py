"""Data-parallel fine-tuning: 2 processes started by `mlx.launch` (ring backend, localhost) give the losses, the
adapters and the head that 1 process gives on the same global batch (the probe's BatchNorm statistics taken over
both processes' shares); only rank 0 writes and reports."""

import mlx.core as mx
import numpy as np

from mlx_aim.training.finetune import FinetuneConfig, finetune
from mlx_aim.training.runs import read_log
from probe_helpers import make_colour_folder, make_model_folder
from test_distributed import launch_two

STEPS, BATCH = 4, 8


def losses(out):
    return [r["loss"] for r in read_log(out) if "loss" in r]


def test_two_processes_equal_one_on_the_same_global_batch(tmp_path):
    base = make_model_folder(tmp_path / "base", with_head=False)
    data = make_colour_folder(tmp_path / "data", num_train=6, num_val=2)
    out2 = tmp_path / "two"
    summary, stdout = launch_two("finetune.py", "--model", str(base), "--data", str(data), "--out", str(out2),
                                 "--steps", str(STEPS), "--batch-size", str(BATCH), "--lr", "1e-2", "--log-interval",
                                 "1", "--num-workers", "0", "--no-compile", "--no-progress", "--json", timeout=240)
    assert summary["processes"] == 2 and summary["steps"] == STEPS
    assert stdout.count("+ probe on") == 1  # only rank 0 reports

    out1 = tmp_path / "one"
    cfg = FinetuneConfig(steps=STEPS, batch_size=BATCH, lr=1e-2, log_interval=1, num_workers=0,
                         compile=False)
    one = finetune(str(base), str(data), out1, cfg, progress=False)
    assert len(losses(out2)) == STEPS  # one log, written once
    np.testing.assert_allclose(losses(out2), one.losses, rtol=1e-5)
    ours = mx.load(str(out2 / "adapters.safetensors"))
    reference = mx.load(str(out1 / "adapters.safetensors"))
    assert set(ours) == set(reference)
    for key, value in reference.items():
        np.testing.assert_allclose(np.asarray(ours[key]), np.asarray(value), rtol=1e-4, atol=1e-5, err_msg=key)
