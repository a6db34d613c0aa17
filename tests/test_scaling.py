"""The scaling grid (mlx_aim/apps/scaling.py): its arithmetic on hand-made numbers (ranks, Spearman's rho, the verdicts,
both ways), and `scripts/scaling.py --quick` end to end: the outputs' structure, resuming and reuse, --data."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import last_json, run_script
from mlx_aim.apps import scaling
from mlx_aim.cli import scaling as scaling_cli
from mlx_aim.data.synthetic import render
from mlx_aim.checkpoints.run_folders import list_checkpoints


# ---------------------------------------------------------------------------------------------------
# Ranks and Spearman's rho


def test_average_ranks_share_ties():
    np.testing.assert_array_equal(scaling.average_ranks([10, 30, 20]), [1, 3, 2])
    np.testing.assert_array_equal(scaling.average_ranks([1.0, 2.0, 2.0, 4.0]), [1, 2.5, 2.5, 4])
    np.testing.assert_array_equal(scaling.average_ranks([5, 5, 5]), [2, 2, 2])
    np.testing.assert_array_equal(scaling.average_ranks([3, 1, 3, 1, 2]), [4.5, 1.5, 4.5, 1.5, 3])


def test_spearman_of_a_hand_computed_case_with_a_tie():
    # x ranks (1, 2.5, 2.5, 4), y ranks (1, 2, 3, 4); centred: (-1.5, 0, 0, 1.5) and (-1.5, -0.5, 0.5, 1.5):
    # covariance sum 4.5, squares 4.5 and 5, so rho = 4.5 / sqrt(22.5) = 3 / sqrt(10).
    assert scaling.spearman([1.0, 2.0, 2.0, 4.0], [10, 20, 30, 40]) == pytest.approx(3 / math.sqrt(10), abs=1e-12)
    assert scaling.spearman([1.0, 2.0, 2.0, 4.0], [40, 30, 20, 10]) == pytest.approx(-3 / math.sqrt(10), abs=1e-12)


def test_spearman_without_ties_is_the_classic_formula():
    x, y = [0.9, 0.5, 0.7, 0.1, 0.3], [0.2, 0.4, 0.1, 0.9, 0.5]  # ranks (5, 3, 4, 1, 2) and (2, 3, 1, 5, 4)
    d2 = sum((a - b) ** 2 for a, b in zip([5, 3, 4, 1, 2], [2, 3, 1, 5, 4]))
    assert scaling.spearman(x, y) == pytest.approx(1 - 6 * d2 / (5 * (25 - 1)), abs=1e-12)  # -0.9
    assert scaling.spearman([1, 2, 3], [1, 4, 9]) == pytest.approx(1.0)  # monotonic, not linear


def test_spearman_is_undefined_for_constants_and_refuses_unpaired_values():
    assert math.isnan(scaling.spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(scaling.spearman([1], [2]))
    with pytest.raises(ValueError, match="3 x values, 2 y values"):
        scaling.spearman([1, 2, 3], [1, 2])


# ---------------------------------------------------------------------------------------------------
# The verdicts


CAPACITIES, SIZES = ["w32-d2", "w64-d4", "w128-d4"], [125, 500, 4000]


def test_finding_one_holds_when_every_line_rises():
    top1 = np.array([[0.30, 0.32, 0.35], [0.33, 0.36, 0.40], [0.34, 0.38, 0.45]])  # [capacity, data size]
    found = scaling.scaling_finding(top1, CAPACITIES, SIZES)
    assert found["holds"] is True
    assert [(line["axis"], line["at"]) for line in found["lines"]] == [
        ("capacity", "125 images"), ("capacity", "500 images"), ("capacity", "4000 images"),
        ("data", "w32-d2"), ("data", "w64-d4"), ("data", "w128-d4")]
    assert all(line["rises"] and not line["exceptions"] for line in found["lines"])
    assert found["lines"][1]["values"] == [0.32, 0.36, 0.38]
    loss = scaling.loss_finding([3, 2, 1], [1, 2, 3])
    text = scaling.verdict_lines({"scaling": found, "loss_predicts_accuracy": loss})
    assert text[0].endswith(": holds at this scale")
    assert "  along capacity at 500 images: 32.0% -> 36.0% -> 38.0%: rises" in text


def test_finding_one_does_not_hold_with_one_drop_or_tie_and_names_each_exception():
    top1 = np.array([[0.30, 0.32, 0.35], [0.33, 0.36, 0.36], [0.31, 0.38, 0.45]])
    found = scaling.scaling_finding(top1, CAPACITIES, SIZES)
    assert found["holds"] is False
    broken = {(line["axis"], line["at"]): line["exceptions"] for line in found["lines"] if not line["rises"]}
    assert broken == {
        ("capacity", "125 images"): [{"from": "w64-d4", "to": "w128-d4", "before": 0.33, "after": 0.31}],
        ("data", "w64-d4"): [{"from": "500 images", "to": "4000 images", "before": 0.36, "after": 0.36}],  # a tie
    }
    text = scaling.verdict_lines({"scaling": found, "loss_predicts_accuracy": scaling.loss_finding([1, 2], [1, 2])})
    assert text[0].endswith(": does not hold at this scale")
    assert ("  along capacity at 125 images: 30.0% -> 33.0% -> 31.0%: exception (w64-d4 -> w128-d4: 33.0% -> 31.0%)"
            in text)
    assert sum("exception" in line for line in text) == 2 and sum(line.endswith("rises") for line in text) == 4


def test_finding_two_holds_at_or_below_the_target():
    loss = [0.50, 0.45, 0.40, 0.35, 0.30]
    found = scaling.loss_finding(loss, [0.20, 0.25, 0.30, 0.35, 0.40])
    assert found == {"holds": True, "spearman_rho": pytest.approx(-1.0), "target": -0.8, "num_checkpoints": 5}
    # rho -0.9 (one pair swapped: sum of squared rank differences 38) holds; -0.6 (32) does not; nor a constant.
    close = scaling.loss_finding(loss, [0.20, 0.30, 0.25, 0.35, 0.40])
    assert close["spearman_rho"] == pytest.approx(-0.9) and close["holds"] is True
    weak = scaling.loss_finding(loss, [0.25, 0.20, 0.35, 0.40, 0.30])
    assert weak["spearman_rho"] == pytest.approx(-0.6) and weak["holds"] is False
    assert scaling.loss_finding(loss, [0.3] * 5)["holds"] is False
    text = scaling.verdict_lines({"scaling": scaling.scaling_finding(np.eye(2), ["a", "b"], [1, 2]),
                                  "loss_predicts_accuracy": weak})
    assert text[-1] == ("Finding 2 (lower validation loss, higher probe top-1): does not hold at this scale: "
                        "Spearman rho -0.600 over 5 checkpoints (target <= -0.8)")


def cells_of(top1_seeds: dict) -> list[dict]:
    """`summarize_cells`-like cells from {(capacity, data size): [top-1 per seed]}."""
    return [{"capacity": name, "data_size": size, **scaling.top1_statistics(values)}
            for (name, size), values in top1_seeds.items()]


def test_pretraining_beats_random_trunks_when_every_cell_clears_the_seeds_spread():
    random = {"w32-d2": scaling.top1_statistics([0.30, 0.31]), "w64-d4": scaling.top1_statistics([0.33, 0.34])}
    cells = cells_of({("w32-d2", 40): [0.32, 0.35], ("w32-d2", 400): [0.315, 0.33],
                      ("w64-d4", 40): [0.36, 0.38], ("w64-d4", 400): [0.35, 0.37]})
    found = scaling.pretraining_finding(cells, random)
    assert found["holds"] is True and found["any_clear"] is True
    assert found["random_top1"] == {"w32-d2": pytest.approx(0.305), "w64-d4": pytest.approx(0.335)}
    assert [g["gain"] for g in found["cells"]] == pytest.approx([0.03, 0.0175, 0.035, 0.025])
    assert all(g["clear"] and not g["overlap"] for g in found["cells"])
    top1 = np.array([[0.335, 0.3225], [0.37, 0.36]])
    text = scaling.verdict_lines({"scaling": scaling.scaling_finding(top1, ["w32-d2", "w64-d4"], [40, 400]),
                                  "loss_predicts_accuracy": scaling.loss_finding([2, 1], [1, 2]), "pretraining": found})
    assert text[-5] == ("Pre-training beats a random trunk of the same size: holds at this scale: 4 of 4 cells beyond "
                        "the seeds' spread (pre-trained mean - random mean)")
    assert text[-4] == "  w32-d2, 40 images: 33.5% vs 30.5%: +3.0 points, beyond the seeds' spread"
    assert not any("architecture's" in line for line in text)  # capacity rises, and pre-training beats random trunks


def test_a_rise_with_capacity_that_random_trunks_match_is_not_pre_trainings():
    """Every line along capacity rises, but no cell beats its random trunk beyond the seeds' spread: finding 1's
    capacity lines say so, and the control does not hold (one cell even loses to its random trunk)."""
    random = {"w32-d2": scaling.top1_statistics([0.317, 0.296]), "w64-d4": scaling.top1_statistics([0.335, 0.331]),
              "w128-d4": scaling.top1_statistics([0.359, 0.379])}
    cells = cells_of({("w32-d2", 40): [0.306, 0.308], ("w32-d2", 4000): [0.281, 0.291],
                      ("w64-d4", 40): [0.332, 0.341], ("w64-d4", 4000): [0.320, 0.328],
                      ("w128-d4", 40): [0.351, 0.368], ("w128-d4", 4000): [0.341, 0.362]})
    found = scaling.pretraining_finding(cells, random)
    assert found["holds"] is False and found["any_clear"] is False
    by_cell = {(g["capacity"], g["data_size"]): g for g in found["cells"]}
    assert by_cell[("w64-d4", 40)]["gain"] == pytest.approx(0.3365 - 0.333) and by_cell[("w64-d4", 40)]["overlap"]
    assert not by_cell[("w64-d4", 4000)]["overlap"] and not by_cell[("w64-d4", 4000)]["clear"]  # below, clearly
    top1 = np.array([[c["top1_mean"] for c in cells[k : k + 2]] for k in (0, 2, 4)])
    findings = {"scaling": scaling.scaling_finding(top1, CAPACITIES, [40, 4000]),
                "loss_predicts_accuracy": scaling.loss_finding([2, 1], [1, 2]), "pretraining": found}
    text = scaling.verdict_lines(findings)
    note = ("  along capacity: holds, but random trunks of the same sizes score as well (30.6% -> 33.3% -> 36.9%): "
            "the gain is the architecture's, not pre-training's")
    assert text.index(note) == 3  # right after the capacity lines, before the data lines
    assert text[0].endswith(": does not hold at this scale")  # the data lines fall: finding 1's verdict is as before
    assert ("Pre-training beats a random trunk of the same size: does not hold at this scale: 0 of 6 cells beyond the "
            "seeds' spread (pre-trained mean - random mean)") in text
    assert "  w32-d2, 40 images: 30.7% vs 30.6%: +0.1 points, within the seeds' spread" in text
    assert "  w64-d4, 4000 images: 32.4% vs 33.3%: -0.9 points, a loss beyond the seeds' spread" in text
    # No note where a line along capacity breaks, or where one cell clears its random trunk.
    broken = dict(findings, scaling=scaling.scaling_finding(top1[::-1], CAPACITIES, [40, 4000]))
    assert not any("architecture's" in line for line in scaling.verdict_lines(broken))
    cleared = cells_of({("w32-d2", 40): [0.33, 0.34], ("w32-d2", 4000): [0.281, 0.291],
                        ("w64-d4", 40): [0.332, 0.341], ("w64-d4", 4000): [0.320, 0.328],
                        ("w128-d4", 40): [0.351, 0.368], ("w128-d4", 4000): [0.341, 0.362]})
    one_clear = dict(findings, pretraining=scaling.pretraining_finding(cleared, random))
    assert not any("architecture's" in line for line in scaling.verdict_lines(one_clear))


def test_config_refuses_what_the_grid_cannot_run():
    with pytest.raises(ValueError, match="multiple of checkpoints"):
        scaling.DEFAULT.replace(steps=100, checkpoints=3)
    with pytest.raises(ValueError, match="increasing fractions"):
        scaling.DEFAULT.replace(data_fractions=(0.5, 0.25, 1.0))
    with pytest.raises(ValueError, match="increasing fractions"):  # two sets of one size: no pool could hold the grid
        scaling.DEFAULT.replace(data_fractions=(0.1, 0.1, 1.0))
    with pytest.raises(ValueError, match="at least two capacities"):
        scaling.DEFAULT.replace(capacities=((32, 2),))


@pytest.mark.parametrize("name", ["default", "long"])
def test_default_and_long_grids_span_what_the_issue_asks(name):
    """At least 3 capacities and 3 data sizes, each spread 8x or more, several seeds and checkpoints."""
    cfg = scaling.PRESETS[name]
    params = sorted(scaling.parameter_count(cfg.model_config(w, d, cfg.num_classes)) for w, d in cfg.capacities)
    sizes = [round(f * cfg.num_train) for f in cfg.data_fractions]
    assert len(params) >= 3 and params[-1] >= 8 * params[0]
    assert len(sizes) >= 3 and sizes[-1] >= 8 * sizes[0]
    assert len(cfg.seeds) >= 2 and cfg.checkpoints >= 3


# ---------------------------------------------------------------------------------------------------
# --quick end to end


def table_rows(stdout: str) -> list[list[str]]:
    """The rows of the printed cell table (between its second and third rules)."""
    lines = stdout.splitlines()
    rules = [i for i, line in enumerate(lines) if line and set(line) == {"-"}]
    return [lines[i].split() for i in range(rules[1] + 1, rules[2])]


def check_structure(result: dict, stdout: str, cfg: scaling.ScalingConfig) -> None:
    num_cells = len(cfg.capacities) * len(cfg.data_fractions)
    assert len(result["capacities"]) == len(cfg.capacities) and len(result["data_sizes"]) == len(cfg.data_fractions)
    params = [c["parameters"] for c in result["capacities"]]
    assert params == sorted(params) and result["data_sizes"] == sorted(result["data_sizes"])
    assert result["seeds"] == list(cfg.seeds) and len(result["runs"]) == num_cells * len(cfg.seeds)
    assert result["checkpoint_steps"] == [cfg.steps // cfg.checkpoints * (k + 1) for k in range(cfg.checkpoints)]
    for run in result["runs"]:
        assert [p["step"] for p in run["checkpoints"]] == result["checkpoint_steps"]
        for point in run["checkpoints"]:
            assert math.isfinite(point["val_loss"]) and 0.0 <= point["top1"] <= point["top5"] <= 1.0
            assert point["num_val"] == result["num_val"]
    assert len(result["cells"]) == num_cells
    for capacity in result["capacities"]:  # the same probe on a random trunk of each capacity, each seed
        random = capacity["random_trunk"]
        assert [p["seed"] for p in random["seeds"]] == list(cfg.seeds) and len(random["top1_seeds"]) == len(cfg.seeds)
        assert all(0.0 <= p["top1"] <= p["top5"] <= 1.0 and p["num_val"] == result["num_val"] for p in random["seeds"])
        assert random["top1_min"] <= random["top1_mean"] <= random["top1_max"]
    control = result["findings"]["pretraining"]
    assert isinstance(control["holds"], bool) and len(control["cells"]) == num_cells
    assert list(control["random_top1"]) == [c["name"] for c in result["capacities"]]
    for cell in result["cells"]:
        assert len(cell["top1_seeds"]) == len(cfg.seeds)
        assert cell["top1_min"] <= cell["top1_mean"] <= cell["top1_max"]
    scaling_finding, loss = result["findings"]["scaling"], result["findings"]["loss_predicts_accuracy"]
    assert len(scaling_finding["lines"]) == len(cfg.capacities) + len(cfg.data_fractions)
    assert isinstance(scaling_finding["holds"], bool) and isinstance(loss["holds"], bool)
    assert loss["num_checkpoints"] == len(result["runs"]) * cfg.checkpoints
    # The printed table: one row per cell, with the JSON's numbers; the verdicts as in the JSON.
    rows = table_rows(stdout)
    assert len(rows) == num_cells
    for row, cell in zip(rows, result["cells"]):
        assert row[0] == cell["capacity"] and row[1] == f"{cell['parameters']:,}" and row[2] == str(cell["data_size"])
        assert row[3] == f"{cell['val_loss_mean']:.4f}"
        top1 = f"{100 * cell['top1_mean']:.1f}"
        assert row[6:8] == [top1, "±"] if len(cfg.seeds) > 1 else row[4] == top1 + "%"
        random = next(c["random_trunk"] for c in result["capacities"] if c["name"] == cell["capacity"])
        random_top1 = f"{100 * random['top1_mean']:.1f}"
        assert row[10:12] == [random_top1, "±"] if len(cfg.seeds) > 1 else row[5] == random_top1 + "%"
    for line in result["verdicts"]:
        assert line in stdout.splitlines()
    assert sum(line.startswith("Finding ") for line in result["verdicts"]) == 2
    control_lines = [line for line in result["verdicts"] if line.startswith("Pre-training beats a random trunk")]
    assert len(control_lines) == 1 and sum(line.endswith("seeds' spread") for line in result["verdicts"]) == num_cells
    # The figure: three panels side by side.
    with Image.open(result["figure"]) as image:
        image.load()
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.width >= 3 * 400 and image.height >= 400
        pixels = np.asarray(image)
    panel_tops = pixels[16 + 60, :, :]  # a row through the three plot areas: each has a black frame
    assert ((panel_tops == 0).all(axis=-1)).sum() >= 6  # left and right frame lines of three panels


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    done = run_script("scripts/scaling.py", "--quick", "--out", out, "--seeds", "0,1", "--json", "--no-progress")
    return out, done.stdout, last_json(done.stdout)


def test_quick_grid_end_to_end(quick_run):
    out, stdout, result = quick_run
    cfg = scaling.QUICK.replace(seeds=(0, 1))
    check_structure(result, stdout, cfg)
    assert result["quick"] is True and Path(result["run_dir"]).parent == out
    assert result["preset"] == "quick" and Path(result["run_dir"]).name.startswith("quick-")
    assert json.loads((Path(result["run_dir"]) / "scaling.json").read_text())["cells"] == result["cells"]
    assert "Spearman rho" in stdout and "wall time" in stdout and "figure: " in stdout
    for run in result["runs"]:  # every run kept a checkpoint at each point of its schedule
        steps = [int(p.name.split("_")[1]) for p in list_checkpoints(Path(run["run_dir"]) / "pretrain")]
        assert steps == result["checkpoint_steps"] and run["pretraining_reused"] is False


def test_quick_grid_resumes_and_reuses_finished_runs(quick_run, tmp_path):
    source, _, first = quick_run
    out = tmp_path / "copy"
    shutil.copytree(source, out)
    run_dirs = [Path(r["run_dir"].replace(str(source), str(out))) for r in first["runs"]]
    # Interrupt one run: its last checkpoint and its probe results gone, as if killed before they were written.
    cut = run_dirs[-1]
    shutil.rmtree(list_checkpoints(cut / "pretrain")[-1])
    shutil.rmtree(cut / "points")
    logs = {d: (d / "pretrain" / "log.jsonl").read_text() for d in run_dirs[:-1]}
    lines = []
    second = scaling.run_scaling(out, quick=True, config=scaling.QUICK.replace(seeds=(0, 1)), progress=False,
                                 echo=lines.append)
    assert [r["pretraining_reused"] for r in second["runs"]] == [True] * (len(run_dirs) - 1) + [False]
    assert any(line.startswith(f"resuming from {cut / 'pretrain'}") for line in lines)
    assert all((d / "pretrain" / "log.jsonl").read_text() == logs[d] for d in run_dirs[:-1])
    for old, new in zip(first["runs"][:-1], second["runs"][:-1]):
        assert all(p["reused"] for p in new["checkpoints"])
        assert [{k: v for k, v in p.items() if k != "reused"} for p in new["checkpoints"]] == \
               [{k: v for k, v in p.items() if k != "reused"} for p in old["checkpoints"]]
    # The random trunks' probes are reused, with the same numbers.
    for old, new in zip(first["capacities"], second["capacities"]):
        assert all(p["reused"] for p in new["random_trunk"]["seeds"])
        assert not any(p["reused"] for p in old["random_trunk"]["seeds"])
        assert new["random_trunk"]["top1_seeds"] == old["random_trunk"]["top1_seeds"]
    # The resumed run continues exactly: the same numbers as the uninterrupted one.
    assert [p["val_loss"] for p in second["runs"][-1]["checkpoints"]] == \
           pytest.approx([p["val_loss"] for p in first["runs"][-1]["checkpoints"]], abs=1e-6)


def test_quick_grid_on_a_folder_of_ones_own(tmp_path):
    """--data: class sub-folders without a val/ folder; the held-out images are a seeded split of them."""
    data = tmp_path / "mine"
    rng = np.random.default_rng(0)
    for label, name in enumerate(["disc", "ring", "square", "triangle"]):
        (data / name).mkdir(parents=True)
        for i in range(25):
            Image.fromarray(render(label, rng, 24)).save(data / name / f"{i}.png")
    done = run_script("scripts/scaling.py", "--quick", "--data", data, "--out", tmp_path / "out", "--json",
                      "--no-progress")
    result = last_json(done.stdout)
    check_structure(result, done.stdout, scaling.QUICK)
    assert result["data"] == str(data) and result["num_classes"] == 4
    assert result["probe_train"] == 80 and result["num_val"] == 20 and result["data_sizes"] == [20, 80]


def test_one_grid_at_a_time(tmp_path):
    with pytest.raises(ValueError, match="quick and long are two different grids"):
        scaling.run_scaling(tmp_path, quick=True, long=True)
    done = run_script("scripts/scaling.py", "--quick", "--long", "--out", tmp_path, check_rc=2)
    assert "not allowed with argument" in done.stderr and not any(tmp_path.iterdir())


def image_folder(root: Path, counts: dict[str, int]) -> Path:
    """Class sub-folders of tiny images, `counts[name]` in each."""
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(root / name / f"{i}.png")
    return root


def test_too_small_a_folder_is_refused(tmp_path):
    data = image_folder(tmp_path / "small", {"a": 5, "b": 5})
    done = run_script("scripts/scaling.py", "--quick", "--data", data, "--out", tmp_path / "out", check_rc=2)
    # --quick: 25% and 100% of the pool, the smallest one batch of 16: a pool of 62 (16, 62) is the smallest.
    assert (f"error: {data}: a training pool of 8 images is too small for the grid: its smallest pre-training set "
            "must hold one batch (16 images) and, adapted to a small pool, its largest 8 times as many, so it takes a "
            "pool of at least 62 images: use a folder of at least 77 images (20% of them are held out)") in done.stderr


class GridStarted(Exception):
    """Raised in place of the grid's first run: the tests below look at what the grid was set to run."""


@pytest.fixture
def grid_start(monkeypatch):
    """`run_scaling` that stops at its first run: returns its echoed lines and the grid's folder."""

    def first_run(cfg, grid, width, depth, size, seed, runs_dir, **_):
        raise GridStarted(runs_dir)

    def start(*args, **kwargs) -> tuple[list[str], Path]:
        lines = []
        with pytest.raises(GridStarted) as started:
            scaling.run_scaling(*args, progress=False, echo=lines.append, **kwargs)
        return lines, started.value.args[0]

    monkeypatch.setattr(scaling, "run_cell", first_run)
    return start


DIGITS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # scikit-learn's digits: 1797 images in 10 classes


def test_data_sizes_adapt_to_a_small_folder(tmp_path, grid_start):
    """A folder of scikit-learn's digits' size: 1%, 10% and 100% of its pool (14, 144, 1438) start below one batch, so
    the sizes run from one batch to the pool, the middle one at the same place on a log scale."""
    data = image_folder(tmp_path / "digits", {str(k): n for k, n in enumerate(DIGITS)})
    grid = scaling.grid_data(scaling.DEFAULT, tmp_path / "out", data)
    assert len(grid.pool) == 1438 and grid.sizes(scaling.DEFAULT.data_fractions) == [14, 144, 1438]
    # 215: the geometric mean of 32 and 1438, as 10% is of 1% and 100%.
    assert scaling.grid_data_sizes(scaling.DEFAULT, len(grid.pool)) == ([32, 215, 1438], "adapted")
    lines, runs_dir = grid_start(tmp_path / "out", data=data)
    assert f"{data}; pre-training sets of 32, 215, 1438 images (adapted to the pool of 1438, too small for the data " \
           "fractions 0.01, 0.1, 1); capacities" in lines[0]
    assert runs_dir.parent == tmp_path / "out" and runs_dir.name.startswith("default-")
    # Other pools: the fractions where their smallest holds a batch; adapted, 8x apart at the least.
    assert scaling.grid_data_sizes(scaling.DEFAULT, 4000) == ([40, 400, 4000], "fractions")
    assert scaling.grid_data_sizes(scaling.DEFAULT, 256) == ([32, 91, 256], "adapted")
    assert scaling.grid_data_sizes(scaling.QUICK, 80) == ([20, 80], "fractions")


def test_the_smallest_folder_the_refusal_names_works(tmp_path):
    """The default grid takes a pool of 256 (32 and 8 x 32): with a fifth held out, a folder of 320 images; one of 319
    is refused with that number."""
    with pytest.raises(scaling.TooFewImages, match="use at least 256 training images") as refused:
        scaling.grid_data_sizes(scaling.DEFAULT, 255)
    assert refused.value.needed == 256
    works = scaling.grid_data(scaling.DEFAULT, tmp_path, image_folder(tmp_path / "320", {"a": 160, "b": 160}))
    assert scaling.grid_data_sizes(scaling.DEFAULT, len(works.pool), held_out=works.held_out)[0] == [32, 91, 256]
    short = scaling.grid_data(scaling.DEFAULT, tmp_path, image_folder(tmp_path / "319", {"a": 160, "b": 159}))
    with pytest.raises(ValueError, match=r"a pool of at least 256 images: use a folder of at least 320 images \(20% "):
        scaling.grid_data_sizes(scaling.DEFAULT, len(short.pool), held_out=short.held_out)
    # A folder with its own val/: the training images it needs.
    assert scaling.grid_data(scaling.DEFAULT, tmp_path / "out", tmp_path / "320").held_out == 0.2
    own = image_folder(tmp_path / "split" / "train", {"a": 100})
    image_folder(tmp_path / "split" / "val", {"a": 10})
    assert scaling.grid_data(scaling.DEFAULT, tmp_path / "out", own.parent).held_out == 0.0


def test_data_sizes_option_is_parsed_and_checked(capsys):
    parser = scaling_cli.build_parser()
    assert parser.parse_args(["--data-sizes", "32,256,1438"]).data_sizes == (32, 256, 1438)
    assert parser.parse_args([]).data_sizes is None
    for text, reason in [("32,256,256", "expected increasing numbers of images"),
                         ("256,32,2048", "expected increasing numbers of images"),
                         ("0,256", "the smallest at least 1"),
                         ("32,64,200", "the largest is 6.25x the smallest; expected at least 8x (the smallest at "
                                       "most 25)"),
                         ("256", "expected at least two"), ("32,many", "expected comma-separated integers")]:
        with pytest.raises(SystemExit) as refused:
            parser.parse_args(["--data-sizes", text])
        assert refused.value.code == 2 and reason in capsys.readouterr().err, text


def test_chosen_data_sizes_are_checked_against_the_batch_and_the_pool(tmp_path, grid_start):
    with pytest.raises(ValueError, match=r"data sizes 8,64: the smallest, 8 images, is less than one batch \(16"):
        scaling.run_scaling(tmp_path / "out", quick=True, data_sizes=(8, 64))
    assert not (tmp_path / "out").exists()  # refused before any image was drawn
    data = image_folder(tmp_path / "small", {"a": 5, "b": 5})
    with pytest.raises(scaling.TooFewImages, match=r"data sizes 16,128: the largest, 128 images, is more than the "
                                                   r"training pool holds \(8 images\)"):
        scaling.run_scaling(tmp_path / "out", quick=True, data=data, data_sizes=(16, 128))
    done = run_script("scripts/scaling.py", "--quick", "--data", data, "--data-sizes", "16,128", "--out",
                      tmp_path / "out", check_rc=2)
    assert "is more than the training pool holds (8 images)" in done.stderr
    # Within the pool: the grid runs them, and says they were chosen.
    lines, _ = grid_start(tmp_path / "out", data=image_folder(tmp_path / "mine", {"a": 100, "b": 100}),
                          quick=True, data_sizes=(16, 48, 160))
    assert "pre-training sets of 16, 48, 160 images (chosen); capacities" in lines[0]


def test_data_sizes_name_the_grid_folder():
    """Sizes other than the fractions' (chosen or adapted) are in the digest of the grid's folder, so runs of one grid
    are never reused for another; grids of the fractions' sizes keep the names they had."""
    identity = {"root": "shapes", "num_train": 4000}
    name = scaling.grid_folder_name
    assert name(scaling.DEFAULT, identity, 4000, [40, 400, 4000]) == "default-" + scaling._digest(
        {"config": dataclasses.asdict(scaling.DEFAULT), "data": identity})
    names = {name(scaling.DEFAULT, identity, 4000, sizes)
             for sizes in ([40, 400, 4000], [40, 400, 3200], [32, 400, 4000], [32, 215, 1438], [40, 4000])}
    assert len(names) == 5 and all(n.startswith("default-") for n in names)
    assert name(scaling.QUICK, identity, 4000, [32, 256]).startswith("quick-")


def test_each_checkpoint_is_probed_with_its_own_trunk(quick_run):
    """`train.checkpoint_trunk` gives a checkpoint's trunk: the last one is the exported model folder's, an earlier
    one differs from it."""
    import mlx_aim
    from mlx.utils import tree_flatten
    from mlx_aim.training.pretrain import checkpoint_trunk

    _, _, result = quick_run
    pre_dir = Path(result["runs"][0]["run_dir"]) / "pretrain"
    first, last = (checkpoint_trunk(c) for c in (list_checkpoints(pre_dir)[0], list_checkpoints(pre_dir)[-1]))
    exported = mlx_aim.load(pre_dir / "model")

    def trunk(model):
        return {k: np.array(v) for k, v in tree_flatten(model.parameters()) if not k.startswith("head.")}

    assert trunk(last).keys() == trunk(exported).keys()
    assert all(np.array_equal(v, trunk(exported)[k]) for k, v in trunk(last).items())
    assert not all(np.array_equal(v, trunk(last)[k]) for k, v in trunk(first).items())
