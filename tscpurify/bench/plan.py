"""`tscpurify bench GRID --plan`: what a grid has left, and how long it should take on this
machine, from the seconds its finished rows took (nothing runs)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..defenses import DEFENSES
from ..errors import SettingsError
from .cache import train_key
from .grid import (
    Selection,
    model_folders,
    model_options,
    read_all,
    read_grid,
    tuning_choice,
)
from .tables import model_name


def step_cost_key(cell: Mapping[str, Any]) -> str:
    """What sets the cost of a defense's step on a model: the architecture with its arguments,
    the data and the batch size, not the grid's name for the model (`cnn` may be width 16 in
    one grid and 64 in another, and `cnn_w16` in a third is the same model as the first)."""
    return (f"{cell['model']}{json.dumps(cell.get('model_args') or {}, sort_keys=True)} "
            f"on {cell.get('data', 'fashion-mnist')}, batch {cell.get('batch_size', 256)}")


def plan(source: str | Path, out: str | Path, only_rows: str | None = None,
         only_cells: str | None = None,
         pace_from: Sequence[str | Path] = ()) -> list[dict[str, Any]]:
    """What a grid has left, per part ("tuning", "default", "tuned"), model and row: distinct
    runs done and left, and the median seconds of the finished runs of that row on that model
    in `out` (tuning and benchmark rows alike; None before any), so that the time left can be
    budgeted from this machine's own record. Until its defense's tuning has chosen, a tuned
    row's runs are "possible": one equal to its default shares that run.

    A training row with no finished run of its own but a step budget gets `estimated_seconds`
    (estimated_seconds below), so a grid can be budgeted before every row has run once: from
    the seconds a step of the rows finished in `out` and in the folders of `pace_from` (other
    grids' bench folders on this machine), matched by `step_cost_key`."""
    grid, out = read_grid(source), Path(out)
    choice = tuning_choice(grid, out) if out.is_dir() else {}
    only = Selection.parse(only_rows, only_cells, grid)
    parts = [("tuning", "tuning", [c for c in grid.tuning_cells if c in only]),
             ("default", "results", [c for c in grid.cells
                                     if c.setting == "default" and c in only]),
             ("tuned", "results", [c if grid.pending(c, choice) else grid.tuned(c, choice)
                                   for c in grid.cells if c.setting == "tuned" and c in only])]
    done = {stem: read_all(out, stem) if out.is_dir() else {} for stem in ("tuning", "results")}
    own = [row for rows in done.values() for row in rows.values() if "seconds" in row]
    lent = [row for folder in pace_from for stem in ("tuning", "results")
            for row in read_all(Path(folder), stem).values() if row.get("steps")]
    seconds: dict[tuple[str, str], list[float]] = {}  # (row, model entry) → seconds a run
    per_step: dict[tuple[str, str], list[float]] = {}  # (row, step_cost_key) → seconds a step
    for row in own:  # by the grid's model entry: widths of one architecture run at their own pace
        # Rows that train nothing (the suspect, CLP) count too: their few seconds say the
        # row costs next to nothing, where no time at all would leave it untimed.
        seconds.setdefault((row["cell"]["defense"], model_name(row["cell"])), []).append(
            row["seconds"])
    for row in own + lent:
        if not row.get("steps"):
            continue  # no pace a step to lend
        per_step.setdefault((row["cell"]["defense"], step_cost_key(row["cell"])), []).append(
            row["seconds"] / row["steps"])
    counted: set[str] = set()
    lines = []
    for part, stem, cells in parts:
        grouped: dict[tuple[str, str], dict[str, Any]] = {}
        for cell in cells:
            # A tuned row still waiting for its tuning: a run "up to", as its choice may equal
            # its default (then the runs are shared).
            possible = part == "tuned" and grid.pending(cell, choice)
            if cell.key in counted and not possible:  # a run shared by two rows counts once
                continue
            counted.add(cell.key)
            trains = bool(cell.base) and hasattr(DEFENSES.meta[cell.base]["settings"],
                                                 "planned_steps")
            line = grouped.setdefault((cell.model_name, cell.defense), {
                "part": part, "model": cell.model_name, "defense": cell.defense, "done": 0,
                "left": 0, "possible": possible,
                "budget_steps": cell.budget_steps if trains else None,
                "cost_key": step_cost_key(asdict(cell))})
            line["done" if cell.key in done[stem] and not possible else "left"] += 1
        for line in grouped.values():
            line["median_seconds"] = _median(seconds.get((line["defense"], line["model"]), []))
            budget, cost_key = line.pop("budget_steps"), line.pop("cost_key")
            line["estimated_seconds"] = (
                estimated_seconds(line["defense"], cost_key, budget, per_step)
                if line["median_seconds"] is None and budget else None)
            lines.append(line)
    cells = [cell for _, _, part_cells in parts for cell in part_cells]
    lent_cells = [(Path(folder), row["cell"]) for folder in pace_from
                  for stem in ("tuning", "results")
                  for row in read_all(Path(folder), stem).values()]
    return _models_to_train(cells, grid.tuning_cells + grid.cells, out, lent_cells) + lines


MODELS_ROW = "(train models)"  # the plan's line for the suspect and clean models a grid trains


def train_cost_key(cell: Mapping[str, Any]) -> str:
    """What sets the cost of training a cell's models: architecture, data and training
    settings, not the attack (poisoning a share of the images costs next to nothing)."""
    options = model_options(cell)
    return (f"{options['model']}{json.dumps(options['model_args'], sort_keys=True)} on "
            f"{options['data']}, {json.dumps(train_key(options['train']), sort_keys=True)}")


def _train_seconds(folder: Path) -> float | None:
    try:
        return float(json.loads((folder / "metrics.json").read_text())["train_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not trained yet, or trained before the seconds were recorded


def _models_to_train(cells: Sequence[Any], every_cell: Sequence[Any], out: Path,
                     lent_cells: Sequence[tuple[Path, Mapping[str, Any]]]) -> list[dict]:
    """One plan line per model entry for the models `cells` read that are not trained yet,
    timed by the training seconds of the trained models of the same architecture, data and
    training settings: this grid's own (any of its cells), else those of --pace-from folders
    (an estimate, ~). Each model counts once however many cells share it."""
    own: dict[str, dict[Path, float]] = {}
    for cell in every_cell:
        fields = asdict(cell)
        for folder in model_folders(fields, out).values():
            if (spent := _train_seconds(folder)) is not None:
                own.setdefault(train_cost_key(fields), {})[folder] = spent
    lent: dict[str, dict[Path, float]] = {}
    for folder_of, fields in lent_cells:
        try:
            folders = model_folders(fields, folder_of).values()
        except (KeyError, TypeError, SettingsError):
            continue  # a row too old to name its models: it only lends no pace
        for folder in folders:
            if (spent := _train_seconds(folder)) is not None:
                lent.setdefault(train_cost_key(fields), {})[folder] = spent
    grouped: dict[str, dict[str, Any]] = {}
    seen: set[Path] = set()
    for cell in cells:
        fields = asdict(cell)
        for folder in model_folders(fields, out).values():
            if folder in seen:
                continue
            seen.add(folder)
            key = train_cost_key(fields)
            line = grouped.setdefault(cell.model_name, {
                "part": "models", "model": cell.model_name, "defense": MODELS_ROW, "done": 0,
                "left": 0, "possible": False,
                "median_seconds": _median(list(own.get(key, {}).values())),
                "estimated_seconds": None, "keys": set()})
            line["keys"].add(key)
            line["done" if (folder / "metrics.json").exists() else "left"] += 1
    for line in grouped.values():
        keys = line.pop("keys")
        if line["median_seconds"] is None:
            line["estimated_seconds"] = _median([v for key in keys
                                                 for v in lent.get(key, {}).values()])
    return list(grouped.values())


def estimated_seconds(defense: str, model: str, steps: int,
                      per_step: dict[tuple[str, str], list[float]]) -> float | None:
    """Seconds a run of `defense` on `model` at `steps` should take, from the seconds a step of
    the finished rows (per (row, model)): its own on `model` (in another folder), else the
    same defense on another model, scaled by how the two models' paces compare over the rows
    they share (its per-step cost matters: here SAU's and i-BAU's steps cost about ten times
    FT's); else the median pace of the other rows on `model`. None when nothing has run on
    `model`. Models are named by `step_cost_key`."""
    def pace(row: str, on: str) -> float | None:
        return _median(per_step.get((row, on), []))

    on_model = [v for (row, on), values in per_step.items() if on == model for v in values]
    if not on_model:
        return None
    if (defense, model) in per_step:  # its own pace on this model, lent by another folder
        return steps * pace(defense, model)
    for (row, other), _ in per_step.items():
        if row != defense or other == model:
            continue
        shared = [r for (r, on) in per_step if on == other and (r, model) in per_step]
        ratios = [pace(r, model) / pace(r, other) for r in shared if pace(r, other)]
        if ratios:
            return steps * pace(defense, other) * _median(ratios)
    return steps * _median(on_model)


def _median(values: list[float]) -> float | None:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else None
