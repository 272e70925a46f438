"""bench --plan's estimate for a row that has not run yet (the runs-left counts are checked
where grids run, in test_grid.py)."""

import dataclasses
import json

import pytest

from tscpurify.bench.grid import Cell
from tscpurify.bench.plan import estimated_seconds, plan
from tscpurify.cli import main


def test_a_row_that_has_not_run_is_estimated_from_its_own_cost_per_step_elsewhere():
    # Seconds a step of finished rows: SAU costs ten times FT on the CNN; the ResNet's steps
    # cost three times the CNN's (FT and TSC agree on the ratio).
    per_step = {("ft", "cnn"): [0.35], ("tsc", "cnn"): [0.5], ("sau", "cnn"): [3.5],
                ("ft", "resnet"): [1.05], ("tsc", "resnet"): [1.5]}
    # SAU on the ResNet: its own CNN pace scaled by the models' ratio, not the ResNet's average.
    assert estimated_seconds("sau", "resnet", 100, per_step) == pytest.approx(100 * 3.5 * 3)
    # A defense that has run nowhere: the median pace of the rows on that model.
    assert estimated_seconds("nad", "cnn", 100, per_step) == pytest.approx(100 * 0.5)
    # Nothing has run on the model: no estimate.
    assert estimated_seconds("ft", "vit", 100, per_step) is None


GRID = """
seeds = [120]
attacks = ["badnets"]
defenses = ["ft"]
budget_steps = 200
[models.cnn_w4]
arch = "cnn"
width = 4
"""


def defense_lines(lines):
    return [line for line in lines if line["part"] != "models"]


def lender(folder, width, seconds_a_step):
    """A bench folder of another grid that ran FT, and TSC at four times FT's cost a step, on
    the CNN at `width`."""
    folder.mkdir()
    lines = []
    for defense, cost in (("ft", seconds_a_step), ("tsc", 4 * seconds_a_step)):
        cell = dataclasses.asdict(Cell(attack="blended", model="cnn", seed=7, defense=defense,
                                       base=defense, model_args={"width": width}))
        lines.append(json.dumps({"key": defense, "cell": cell, "steps": 100,
                                 "seconds": 100 * cost}))
    (folder / "results.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_a_new_folder_is_timed_by_another_grids_rows_of_the_same_model(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text(GRID)
    out = tmp_path / "new"  # nothing has run here
    assert defense_lines(plan(path, out))[0]["estimated_seconds"] is None
    same = lender(tmp_path / "same", width=4, seconds_a_step=0.5)
    wider = lender(tmp_path / "wider", width=64, seconds_a_step=5.0)
    # The same architecture at the same width lends its pace, whatever the grids call it; FT's
    # own, not the model's mix of defenses.
    [line] = defense_lines(plan(path, out, pace_from=[same, wider]))
    assert line["estimated_seconds"] == pytest.approx(200 * 0.5)
    # Another width is another model: it lends nothing.
    assert defense_lines(plan(path, out, pace_from=[wider]))[0]["estimated_seconds"] is None


def test_pace_from_is_checked_before_anything_runs(tmp_path, capsys):
    path = tmp_path / "grid.toml"
    path.write_text(GRID)
    out = str(tmp_path / "out")
    assert main(["bench", str(path), "--out", out, "--pace-from", str(tmp_path)]) == 2
    assert "--pace-from needs --plan" in capsys.readouterr().err
    assert main(["bench", str(path), "--out", out, "--plan", "--pace-from",
                 str(tmp_path / "nowhere")]) == 2
    assert "no finished bench rows" in capsys.readouterr().err
    same = lender(tmp_path / "same", width=4, seconds_a_step=0.5)
    assert main(["bench", str(path), "--out", out, "--plan", "--pace-from", str(same)]) == 0
    assert "| default | cnn_w4 | ft | 0 | 1 | ~100 | ~0.0 |" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def trained(folder, seconds):
    """A cached model as the bench leaves it, as far as the plan reads it."""
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"acc": 90.0, "train_seconds": seconds}))


def test_the_models_a_grid_still_has_to_train_are_counted_once_and_timed(tmp_path):
    from tscpurify.bench.grid import model_folders, read_grid
    from tscpurify.bench.plan import MODELS_ROW

    path = tmp_path / "grid.toml"
    path.write_text(GRID.replace('["badnets"]', '["badnets", "blended"]')
                    .replace('["ft"]', '["ft", "clean_floor"]'))
    out = tmp_path / "out"
    # Four cells read three models: two suspects and the clean twin both floors share.
    cells = read_grid(path).cells
    folders = {f for c in cells for f in model_folders(dataclasses.asdict(c), out).values()}
    assert len(folders) == 3
    [line] = [line for line in plan(path, out) if line["part"] == "models"]
    assert (line["defense"], line["done"], line["left"]) == (MODELS_ROW, 0, 3)
    assert line["median_seconds"] is None and line["estimated_seconds"] is None
    badnets = model_folders(dataclasses.asdict(cells[0]), out)["backdoored"]
    trained(badnets, 300.0)
    [line] = [line for line in plan(path, out) if line["part"] == "models"]
    assert (line["done"], line["left"], line["median_seconds"]) == (1, 2, 300.0)
    # A new folder is timed by another folder's model of the same architecture and training,
    # whatever its attack (the lender trained a Blended model at seed 7).
    other = lender(tmp_path / "same", width=4, seconds_a_step=0.5)
    lent_cell = json.loads((other / "results.jsonl").read_text().splitlines()[0])["cell"]
    trained(model_folders(lent_cell, other)["backdoored"], 120.0)
    [line] = [line for line in plan(path, tmp_path / "new", pace_from=[other])
              if line["part"] == "models"]
    assert line["median_seconds"] is None and line["estimated_seconds"] == 120.0


def test_a_row_that_trains_nothing_is_timed_by_its_own_seconds(tmp_path):
    from tscpurify.bench.grid import read_grid

    path = tmp_path / "grid.toml"
    path.write_text(GRID.replace('["ft"]', '["none", "ft"]').replace("[120]", "[120, 121]"))
    out = tmp_path / "out"
    out.mkdir()
    [done] = [c for c in read_grid(path).cells if c.defense == "none" and c.seed == 120]
    row = {"key": done.key, "cell": dataclasses.asdict(done), "steps": 0, "seconds": 0.5}
    (out / "results.jsonl").write_text(json.dumps(row) + "\n")
    [line] = [line for line in defense_lines(plan(path, out)) if line["defense"] == "none"]
    # Not untimed ("–", left out of the hours): it costs what its finished run did.
    assert (line["done"], line["left"], line["median_seconds"]) == (1, 1, 0.5)
    # A row that trains nothing lends no pace a step to a training row.
    [ft] = [line for line in defense_lines(plan(path, out)) if line["defense"] == "ft"]
    assert ft["estimated_seconds"] is None


def test_the_plan_summary_names_only_the_parts_that_have_hours(capsys, tmp_path):
    from tscpurify.cli import print_plan

    def line(defense, left, median=None, estimate=None, possible=False):
        return {"part": "default", "model": "cnn", "defense": defense, "done": 0, "left": left,
                "possible": possible, "median_seconds": median, "estimated_seconds": estimate}

    print_plan([line("ft", 2, median=1800.0), line("sau", 3)], tmp_path)
    summary = capsys.readouterr().out.split("\n\n")[1].splitlines()[0]
    assert summary == ("about 1.0 hours left at this folder's own pace (one process); "
                       "3 run(s) with nothing to time them by.")
    print_plan([line("ft", 2, median=1800.0), line("nad", 1, estimate=3600.0),
                line("ft", 4, median=900.0, possible=True)], tmp_path)
    summary = capsys.readouterr().out.split("\n\n")[1].splitlines()[0]
    assert "up to 1.0 more for tuned rows" in summary and "~1.0 estimated" in summary
    assert "nothing to time" not in summary
