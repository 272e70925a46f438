"""The benchmark rows committed under benchmarks/results stay addressable by the shipped grids,
and the README quotes them as they are.

A row is found again by its cell's key (everything that decides its result). A change to how a
grid is read that changes keys (a default filled in, a list turned into a tuple) would orphan
hours of finished rows without a word: the bench would quietly run them all again. A row that is
meant to go (its defense changed) is moved to the folder's superseded/, which this test skips.
"""

import json
from pathlib import Path

import pytest

from tscpurify.bench.grid import GRIDS, finished_rows, read_all, read_grid, tuning_choice

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def shipped_folders() -> list[Path]:
    """Result folders whose bench.json names a grid shipped in the package."""
    folders = []
    for marker in sorted(RESULTS.glob("*/bench.json")):
        grid = json.loads(marker.read_text())["grid"]
        if (GRIDS / f"{grid}.toml").exists():
            folders.append(marker.parent)
    return folders


@pytest.mark.parametrize("folder", shipped_folders(), ids=lambda p: p.name)
def test_every_committed_row_is_a_cell_of_its_shipped_grid(folder):
    grid = read_grid(json.loads((folder / "bench.json").read_text())["grid"])
    keys = {c.key for c in [*grid.cells, *grid.tuning_cells]}
    keys |= {c.key for c in grid.chosen(grid.cells, tuning_choice(grid, folder))}
    for stem in ("tuning", "results"):
        orphans = [row["cell"] for key, row in read_all(folder, stem).items() if key not in keys]
        assert not orphans, f"{folder.name}/{stem}: rows no cell of the grid has: {orphans[:2]}"


# The README's per-defense table of the fair grid's first cell, by the label it shows a row under.
README_LABELS = {
    "suspect": "none", "floor (no poison)": "clean_floor", "TSC": "tsc",
    "`scratch` (fresh CNN)": "scratch", "TSC, no permutation": "tsc_identity",
    "TSC, random perm.": "tsc_random", "distill": "distill", "FST": "fst", "FT": "ft",
    "TSC's last fine-tune alone": "last_ft_alone", "Fine-Pruning": "fine_pruning", "NAD": "nad",
    "ANP": "anp", "CLP": "clp", "MCR": "mcr", "FT-SAM": "ft_sam", "SAU": "sau", "i-BAU": "ibau",
}


def readme_fair_cell() -> dict[tuple[str, str], tuple[str, str, str]]:
    """{(defense, setting): (ACC, ASR, re-tuned ASR)} as the README's first-cell table prints
    them (two rows to a line; a label ending in ", tuned" is the defense's tuned row); rows
    still running are left out."""
    readme = (RESULTS.parents[1] / "README.md").read_text()
    table = readme.split("### The fair fight so far")[1].split("\n\n")[2]
    shown = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        for label, acc, asr, retuned in (cells[0:4], cells[5:9]):
            if acc == "running" or not label:  # still running, or a line's empty second half
                continue
            name, tuned = label.split(", tuned")[0], ", tuned" in label
            shown[(README_LABELS[name], "tuned" if tuned else "default")] = (acc, asr, retuned)
    return shown


def test_the_readmes_fair_cell_is_the_committed_rows():
    # Every number in the README comes from a run: a row superseded or re-run without the README
    # following would leave it quoting a result that no longer exists.
    # Each row under the grid's own label (a tuned row equal to its default shares its run).
    rows = {(row["cell"]["defense"], row["cell"]["setting"]): row
            for row in finished_rows("fair", RESULTS / "fair")
            if (row["cell"]["attack"], row["cell"]["model"], row["cell"]["seed"])
            == ("badnets", "cnn", 0)}
    shown = readme_fair_cell()
    assert len(shown) >= 15
    for defense, (acc, asr, retuned) in shown.items():
        row = rows[defense]
        assert float(acc) == pytest.approx(row["after"]["acc"], abs=0.005), defense
        assert float(asr) == pytest.approx(row["after"]["asr"], abs=0.005), defense
        printed = [float(v) for v in retuned.split(" / ")]
        assert printed == pytest.approx(row["retune"]["asr"], abs=0.05), defense
