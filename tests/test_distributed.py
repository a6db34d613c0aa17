"""Data-parallel pre-training: 2 processes started by `mlx.launch` (ring backend, localhost) produce the
same losses, validation loss and weights as 1 process on the same global batch, and so does gradient
accumulation; only rank 0 writes."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
from conftest import ROOT, last_json, tiny_config
from mlx_aim.data.synthetic import write_image_folder
from mlx_aim.training.runs import read_log
from mlx_aim.checkpoints.run_folders import list_checkpoints
from mlx_aim.training.pretrain import TrainConfig, pretrain

STEPS, BATCH = 6, 8


def small_config():
    """The tiny config at width 32, depth 2, with a one-block pixel head: quick to pre-train three times."""
    return tiny_config(width=32, depth=2, num_heads=2, head_depth=1, probe_layers=[1])


def launcher() -> list[str]:
    """`mlx.launch` next to this interpreter, else the same entry point through the interpreter."""
    script = Path(sys.executable).parent / "mlx.launch"
    if script.exists():
        return [sys.executable, str(script)]
    found = shutil.which("mlx.launch")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]


def free_port_pair() -> int:
    """A port p such that p and p + 1 are free now (the ring backend listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no pair of free ports")


def launch_two(script: str, *args: str, timeout: float = 180) -> tuple[dict, str]:
    """Runs scripts/`script` with `args` in 2 processes under `mlx.launch` (ring backend, localhost); asserts it
    succeeded and returns (the JSON summary on its last line, its stdout)."""
    command = launcher() + ["-n", "2", "--starting-port", str(free_port_pair()), sys.executable,
                            str(ROOT / "scripts" / script), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return last_json(done.stdout), done.stdout


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_log(out) if "loss" in r]


def val_loss(out: Path) -> float:
    return [r["val_loss"] for r in read_log(out) if "val_loss" in r][-1]


def weights(out: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(list_checkpoints(out)[-1] / "model.safetensors")).items()}


def test_two_processes_equal_one_on_the_same_global_batch(tmp_path):
    # 41 validation images: the 2 processes' validation slices differ in size (21 and 20).
    data = write_image_folder(tmp_path / "data", num_train=48, num_val=41, image_size=16)
    config_file = tmp_path / "tiny.json"
    config_file.write_text(json.dumps(small_config().to_dict()))
    recipe = dict(steps=STEPS, batch_size=BATCH, lr=2e-3, warmup_frac=0.2, log_interval=1, val_interval=STEPS,
                  ckpt_interval=0, val_images=41, num_workers=1)

    out2 = tmp_path / "two"
    summary, stdout = launch_two("pretrain.py", "--config", str(config_file), "--data", str(data), "--out", str(out2),
                                 "--no-progress", "--json", "--steps", str(STEPS), "--batch-size", str(BATCH),
                                 "--lr", "2e-3", "--warmup-frac", "0.2", "--log-interval", "1",
                                 "--val-interval", str(STEPS), "--ckpt-interval", "0", "--val-images", "41",
                                 "--num-workers", "1")
    assert summary["processes"] == 2 and summary["global_batch"] == BATCH
    assert stdout.count("pre-trained AIM") == 1  # only rank 0 reports

    out1 = tmp_path / "one"
    pretrain(small_config(), TrainConfig(**recipe), data, out1, progress=False, echo=lambda _: None)
    out_accum = tmp_path / "accum"
    pretrain(small_config(), TrainConfig(**dict(recipe, grad_accum=2)), data, out_accum, progress=False,
             echo=lambda _: None)

    reference = losses(out1)
    assert len(reference) == STEPS and reference[-1] < reference[0]
    for out in (out2, out_accum):
        assert len(losses(out)) == STEPS  # one log, written once
        np.testing.assert_allclose(losses(out), reference, rtol=1e-5)
        assert val_loss(out) == pytest.approx(val_loss(out1), rel=1e-5)
        ours = weights(out)
        for key, value in weights(out1).items():
            np.testing.assert_allclose(ours[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
    assert json.loads((out2 / "checkpoints" / "step_00000006" / "state.json").read_text())["world_size"] == 2
