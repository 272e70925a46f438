"""The bench grid on tiny data: cells, caching, resume equality, table and plots."""

import json

import pytest

from tscpurify.bench import grid as grid_module
from tscpurify.bench.grid import read_grid, run_grid
from tscpurify.bench.tables import markdown_table, plot_bench
from tscpurify.errors import SettingsError


def write_grid(path, root, attacks=("badnets", "blended")):
    path.write_text(f"""
seeds = [0]
attacks = {list(attacks)}
defenses = ["ft", "tsc"]
[data]
name = "fashion-mnist"
root = "{root}"
clean_fraction = 0.1
batch_size = 32
[models.cnn]
width = 4
epochs = 2
[defense_args.ft]
epochs = 1
[defense_args.tsc]
rounds = 1
epochs = 1
profile_points = 0
final_ft_epochs = 0
""")
    return path


def test_grid_cells_and_errors(tmp_path, fmnist_root):
    cells = read_grid(write_grid(tmp_path / "g.toml", fmnist_root))
    assert [(c.attack, c.defense) for c in cells] == [
        ("badnets", "ft"), ("badnets", "tsc"), ("blended", "ft"), ("blended", "tsc")]
    assert len({c.key for c in cells}) == 4
    with pytest.raises(SettingsError, match="no grid"):
        read_grid("nonexistent-grid")
    (tmp_path / "bad.toml").write_text("defenses = ['tscc']")
    with pytest.raises(SettingsError, match="did you mean 'tsc'"):
        read_grid(tmp_path / "bad.toml")
    assert len(read_grid("quick")) > 0


def test_interrupted_bench_resumes_to_the_same_table(tmp_path, fmnist_root, monkeypatch):
    grid = write_grid(tmp_path / "g.toml", fmnist_root, attacks=("badnets",))
    whole = run_grid(grid, tmp_path / "whole", progress=False)

    real_run_cell, calls = grid_module.run_cell, {"n": 0}

    def crash_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_run_cell(*args, **kwargs)

    monkeypatch.setattr(grid_module, "run_cell", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, tmp_path / "resumed", progress=False)
    assert len((tmp_path / "resumed" / "results.jsonl").read_text().splitlines()) == 1
    monkeypatch.setattr(grid_module, "run_cell", real_run_cell)
    resumed = run_grid(grid, tmp_path / "resumed", progress=False)
    assert markdown_table(resumed) == markdown_table(whole)
    # The backdoored model is trained once and shared by both defenses.
    assert len([p for p in (tmp_path / "whole" / "models").iterdir()]) == 1
    plots = plot_bench(whole, tmp_path / "plots")
    assert all(p.stat().st_size > 1000 for p in plots)
    rows = [json.loads(line) for line in
            (tmp_path / "whole" / "results.jsonl").read_text().splitlines()]
    assert all(0 <= r["der"] <= 1 for r in rows)
