"""The training-run scaffold on its own: the settings comparison, the checkpoint layouts and the rules for
starting and resuming, the log rewound on resume, the schedule as a function of the step."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_aim.training.optim import Schedule, adamw
from mlx_aim.training.runs import RunFolder, RunLog, compare_settings, read_log


def test_compare_settings_names_nested_fields_and_ignores_tuple_versus_list():
    saved = {"recipe": {"lr": 0.001, "betas": [0.9, 0.95]}, "trunk": {"config": {"width": 64}}, "steps": 10}
    current = {"recipe": {"lr": 0.002, "betas": (0.9, 0.95)}, "trunk": {"config": {"width": 32}}, "steps": 10}
    assert compare_settings(saved, current) == ["recipe.lr: checkpoint 0.001, now 0.002",
                                                "trunk.config.width: checkpoint 64, now 32"]
    assert compare_settings(saved, saved) == []
    assert compare_settings({"a": 1}, {"b": 1}) == ["a: checkpoint 1, now None", "b: checkpoint None, now 1"]


def _save(run: RunFolder, step: int, scale: float) -> None:
    layer = nn.Linear(3, 2, bias=False)
    layer.weight = mx.full((2, 3), scale)
    optimizer = adamw(Schedule.warmup_cosine(10, 1e-3, 1e-6, 0.1), (0.9, 0.95), 1e-8, 0.05)
    optimizer.init(layer.trainable_parameters())
    run.save(step, layer, optimizer, {"loader": {"epoch": 0, "position": step}}, prefix="layer.")


@pytest.mark.parametrize("numbered", [True, False])
def test_checkpoints_save_restore_and_the_rules_for_an_existing_run(tmp_path, numbered):
    run = RunFolder(tmp_path / "run", checkpoint_dir="ckpt", weights_file="w.safetensors", numbered=numbered,
                    keep_last=2, can_force=True)
    assert run.prepare(resume=False) is None and run.latest() is None
    for step in (1, 2, 3):
        _save(run, step, float(step))
    names = [p.name for p in run.checkpoints()]
    assert names == (["step_00000002", "step_00000003"] if numbered else ["ckpt"])
    assert set(mx.load(str(run.latest() / "w.safetensors"))) == {"layer.weight"}

    with pytest.raises(FileExistsError, match="--resume"):
        run.prepare(resume=False)
    found = run.prepare(resume=True)
    assert found == run.latest()
    layer = nn.Linear(3, 2, bias=False)
    optimizer = adamw(Schedule.warmup_cosine(10, 1e-3, 1e-6, 0.1), (0.9, 0.95), 1e-8, 0.05)
    state = run.restore(found, layer, optimizer, prefix="layer.")
    assert state["step"] == 3 and state["loader"]["position"] == 3
    assert np.array_equal(np.array(layer.weight), np.full((2, 3), 3.0))
    with pytest.raises(ValueError, match=r"settings differ \(lr: checkpoint 1, now 2\).*--force"):
        run.check_settings(found, {"lr": 1}, {"lr": 2})
    assert run.prepare(resume=False, force=True) is None and run.checkpoints() == []


def test_log_restarts_empty_or_rewinds_to_the_resumed_step(tmp_path):
    log = RunLog(tmp_path, resumed_at=None)
    for step in (1, 2, 3, 4):
        log.write({"step": step, "loss": float(step)})
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # cut short by a kill
    RunLog(tmp_path, resumed_at=2)
    assert read_log(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]
    RunLog(tmp_path, resumed_at=None)
    assert not (tmp_path / "log.jsonl").exists()
    RunLog(tmp_path, resumed_at=None, enabled=False).write({"step": 1})
    assert not (tmp_path / "log.jsonl").exists()


def test_schedule_is_a_function_of_the_step():
    schedule = Schedule.warmup_cosine(steps=200, lr=1e-3, warmup_init_lr=1e-6, warmup_frac=0.1)
    assert schedule.warmup_steps == 20
    assert schedule(20) == pytest.approx(1e-3) and schedule(200) == pytest.approx(0.0, abs=1e-12)
    assert float(schedule(mx.array(110))) == pytest.approx(schedule(110))
    assert isinstance(schedule(5), float) and isinstance(schedule(mx.array(5)), mx.array)
