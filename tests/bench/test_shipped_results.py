"""The benchmark rows committed under benchmarks/results stay addressable by the shipped grids.

A row is found again by its cell's key (everything that decides its result). A change to how a
grid is read that changes keys (a default filled in, a list turned into a tuple) would orphan
hours of finished rows without a word: the bench would quietly run them all again. A row that is
meant to go (its defense changed) is moved to the folder's superseded/, which this test skips.
"""

import json
from pathlib import Path

import pytest

from tscpurify.bench.grid import GRIDS, read_all, read_grid

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
    if grid.tuning is not None and (folder / "tuning.json").exists():
        choice = json.loads((folder / "tuning.json").read_text())["choice"]
        keys |= {grid.tuned(c, choice).key for c in grid.cells}
    for stem in ("tuning", "results"):
        orphans = [row["cell"] for key, row in read_all(folder, stem).items() if key not in keys]
        assert not orphans, f"{folder.name}/{stem}: rows no cell of the grid has: {orphans[:2]}"
