"""The study scripts under scripts/ read a bench folder and write their table and plot: run on a
few rows in the bench's own format, into a folder that has no plots/ yet."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def row(defense, attack, rate, *, acc=88.0, asr=1.0, defense_args=None, base=""):
    cell = {"attack": attack, "model": "cnn", "seed": 120, "defense": defense, "base": base,
            "attack_args": {} if rate is None else {"rate": rate}, "defense_args":
            defense_args or {}, "setting": "default", "model_label": "",
            "attack_label": "" if rate is None else f"{attack}_r{rate}"}
    return {"key": json.dumps(cell, sort_keys=True), "cell": cell,
            "before": {"acc": 91.0, "asr": 100.0}, "after": {"acc": acc, "asr": asr},
            "retune": {"epochs": [1, 2, 5], "asr": [5.0, 20.0, 90.0]}, "steps": 2460}


def run(script, folder):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), str(folder)],
                          capture_output=True, text=True, check=False)


def write(folder, rows):
    folder.mkdir()
    with (folder / "results.jsonl").open("w") as handle:
        for r in rows:
            handle.write(json.dumps(r) + "\n")


@pytest.mark.parametrize("attack", ["badnets", "blended"])
def test_plot_rate_reads_each_rate_from_the_attack(tmp_path, attack):
    folder = tmp_path / "rate"
    write(folder, [row(d, attack, rate) for rate in (0.01, None) for d in
                   ("none", "clean_floor", "ft", "tsc")])
    result = run("plot_rate.py", folder)
    assert result.returncode == 0, result.stderr
    # The default rate (no rate in the cell) is the attack's own, 10%.
    assert f"| {attack}:cnn:120 | 1 |" in result.stdout
    assert f"| {attack}:cnn:120 | 10 |" in result.stdout
    assert (folder / "plots" / "rate.png").stat().st_size > 0


def test_plot_knobs_draws_a_knob_with_two_values(tmp_path):
    folder = tmp_path / "knobs"
    write(folder, [row("tsc", "badnets", None, base="tsc"),
                   row("tsc_rounds_1", "badnets", None, base="tsc", asr=40.0,
                       defense_args={"rounds": 1})])
    result = run("plot_knobs.py", folder)
    assert result.returncode == 0, result.stderr
    assert "| rounds | 1 | badnets:cnn:120 |" in result.stdout
    assert (folder / "plots" / "knobs.png").stat().st_size > 0


def test_plot_width_draws_each_row_against_the_model_width(tmp_path):
    folder = tmp_path / "width"
    rows = []
    for width in (16, 32):
        for defense, asr in (("none", 100.0), ("tsc", 1.0), ("tsc_identity", 60.0)):
            r = row(defense, "badnets", None, asr=asr, base="tsc" if "tsc" in defense else "")
            r["cell"]["model_args"] = {"width": width}
            r["key"] = json.dumps(r["cell"], sort_keys=True)
            rows.append(r)
    write(folder, rows)
    result = run("plot_width.py", folder)
    assert result.returncode == 0, result.stderr
    assert "| badnets | cnn | 32 | 91.00 / 100.00 | tsc_identity | 3.00 | 60.00 |" in result.stdout
    assert "| none |" not in result.stdout  # the suspect is a column, not a row
    assert (folder / "plots" / "width.png").stat().st_size > 0


def test_plot_width_without_widths_is_one_error_line(tmp_path):
    folder = tmp_path / "no_width"
    write(folder, [row("tsc", "badnets", None, base="tsc")])  # a model without `width`
    result = run("plot_width.py", folder)
    assert result.returncode != 0 and result.stderr.startswith("error:")


def test_a_folder_without_rows_is_one_error_line(tmp_path):
    folder = tmp_path / "empty"
    write(folder, [])
    result = run("plot_rate.py", folder)
    assert result.returncode != 0 and result.stderr.startswith("error:")
    assert "Traceback" not in result.stderr
