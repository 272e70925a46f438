"""What every study script under scripts/ does last: its figure, written whole into the bench
folder's plots/ (made if missing), then closed."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from tscpurify.outputs import save_figure_atomic


def save_study_plot(fig: plt.Figure, folder: Path, name: str) -> Path:
    """Write `fig` to FOLDER/plots/NAME atomically, close it and return the path."""
    path = folder / "plots" / name
    path.parent.mkdir(exist_ok=True)
    save_figure_atomic(fig, path)
    plt.close(fig)
    return path
