"""Study 2 of docs/ablations.md: TSC's accuracy drop, ASR and re-tune ASR against its number of
rounds, its t and its curves' epochs, one line per attack, from a bench folder's TSC rows (the
`tsc` row, which sits at every knob's default, and the variants that change one knob).

    python scripts/plot_knobs.py benchmarks/results/ablations

writes FOLDER/plots/knobs.png and prints the table behind it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from study_plot import save_study_plot  # noqa: E402  (scripts/, beside this file)

from tscpurify import TSCSettings  # noqa: E402
from tscpurify.bench.grid import read_all  # noqa: E402
from tscpurify.bench.tables import attack_name, model_name  # noqa: E402
from tscpurify.bench.tuning import retune_asr  # noqa: E402

DEFAULTS = TSCSettings()
# knob → (its name in a variant's settings, the default's value, the axis label)
KNOBS = {"rounds": ("rounds", DEFAULTS.rounds, "rounds"),
         "t": ("t", DEFAULTS.t, "t (where the curves' point is taken)"),
         "epochs": ("epochs", DEFAULTS.curve.epochs, "curve epochs")}
IGNORED = {"profile_points"}  # settings that change what is recorded, not the result


def rows_by_knob(folder: Path) -> dict[str, dict[str, list[tuple[float, dict]]]]:
    """knob → (attack:model:seed) → [(value, row)] sorted by value: the default `tsc` row at
    every knob's default value, and each variant that changes that knob alone."""
    found: dict[str, dict[str, list[tuple[float, dict]]]] = {knob: {} for knob in KNOBS}
    for row in read_all(folder, "results").values():
        cell = row["cell"]
        if cell.get("base") != "tsc" or cell.get("setting", "default") != "default":
            continue
        changed = set(cell["defense_args"]) - IGNORED
        name = f"{attack_name(cell)}:{model_name(cell)}:{cell['seed']}"
        for knob, (key, default, _) in KNOBS.items():
            if cell["defense"] == "tsc" and not changed:
                found[knob].setdefault(name, []).append((default, row))
            elif changed == {key}:
                found[knob].setdefault(name, []).append((cell["defense_args"][key], row))
    return {knob: {name: sorted(points, key=lambda p: p[0]) for name, points in lines.items()
                   if len(points) > 1}
            for knob, lines in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    knobs = rows_by_knob(args.folder)
    if not any(knobs.values()):
        raise SystemExit(f"error: no TSC rows that change rounds, t or curve epochs in "
                         f"{args.folder}")
    print("| knob | value | model | ACC drop | ASR | re-tune ASR after 1 / 2 / 5 | steps |")
    print("|---|---|---|---|---|---|---|")
    fig, axes = plt.subplots(len(KNOBS), 3, figsize=(13, 3.2 * len(KNOBS)), squeeze=False)
    for axes_row, (knob, lines) in zip(axes, knobs.items(), strict=True):
        _, default, label = KNOBS[knob]
        for name, points in lines.items():
            values = [value for value, _ in points]
            drops = [r["before"]["acc"] - r["after"]["acc"] for _, r in points]
            asrs = [r["after"]["asr"] for _, r in points]
            retuned = [retune_asr(r, 2) for _, r in points]
            for value, r in points:
                profile = r.get("retune") or {}
                after = " / ".join(f"{a:.1f}" for a in profile.get("asr", [])) or "–"
                mark = " (default)" if value == default else ""
                print(f"| {knob} | {value:g}{mark} | {name} | "
                      f"{r['before']['acc'] - r['after']['acc']:.2f} | {r['after']['asr']:.2f} | "
                      f"{after} | {r.get('steps', 0)} |")
            for ax, ys in zip(axes_row, (drops, asrs, retuned), strict=True):
                present = [(x, y) for x, y in zip(values, ys, strict=True) if y is not None]
                ax.plot([x for x, _ in present], [y for _, y in present], marker="o",
                        label=name)
        ticks = sorted({value for points in lines.values() for value, _ in points})
        for ax, what in zip(axes_row, ("accuracy drop (points)", "ASR after TSC (%)",
                                       "ASR after 2 re-tune epochs (%)"), strict=True):
            ax.axvline(default, color="grey", linestyle=":", linewidth=1)
            if ticks:
                ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
            if "ASR" in what:  # from 0, so that 1.2% against 1.3% does not look like a gap
                ax.set_ylim(bottom=0)
            ax.set_xlabel(label)
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
        if lines:
            axes_row[0].legend(fontsize=8)
    fig.tight_layout()
    print(f"\nplot: {save_study_plot(fig, args.folder, 'knobs.png')} (dotted: the default)")


if __name__ == "__main__":
    main()
