"""Study 1 of docs/ablations.md: TSC's accuracy drop, ASR and wall time against the share of the
training split given as clean data, one line per attack, from a bench folder's TSC rows (the
`tsc` row and its `clean_fraction` variants).

    python scripts/plot_clean_data.py benchmarks/results/ablations

writes FOLDER/plots/clean_data.png and prints the table behind it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from study_plot import save_study_plot  # noqa: E402  (scripts/, beside this file)

from tscpurify.bench.grid import read_all  # noqa: E402
from tscpurify.bench.tables import attack_name, model_name  # noqa: E402
from tscpurify.bench.tuning import retune_asr  # noqa: E402


def tsc_rows_by_fraction(folder: Path) -> dict[str, list[dict]]:
    """(attack:model:seed) → TSC rows at the default settings but the clean fraction, by it."""
    lines: dict[str, list[dict]] = {}
    for row in read_all(folder, "results").values():
        cell = row["cell"]
        if cell.get("base") != "tsc" or set(cell["defense_args"]) - {"clean_fraction",
                                                                     "profile_points"}:
            continue
        if cell["defense"] != "tsc" and not cell["defense"].startswith("tsc_clean_"):
            continue
        name = f"{attack_name(cell)}:{model_name(cell)}:{cell['seed']}"
        lines.setdefault(name, []).append(row)
    return {k: sorted(v, key=lambda r: r["cell"]["clean_fraction"]) for k, v in lines.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    lines = tsc_rows_by_fraction(args.folder)
    if not lines:
        raise SystemExit(f"error: no TSC rows with a clean fraction in {args.folder}")
    print("| model | clean data | ACC drop | ASR | re-tune ASR after 2 | seconds |")
    print("|---|---|---|---|---|---|")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, rows in lines.items():
        fractions = [100 * r["cell"]["clean_fraction"] for r in rows]
        drops = [r["before"]["acc"] - r["after"]["acc"] for r in rows]
        asrs = [r["after"]["asr"] for r in rows]
        seconds = [r["seconds"] / 60 for r in rows]
        for r, fraction, drop, asr in zip(rows, fractions, drops, asrs, strict=True):
            at_two = retune_asr(r, 2)
            print(f"| {name} | {fraction:g}% | {drop:.2f} | "
                  f"{asr:.2f} | {'–' if at_two is None else f'{at_two:.1f}'} | "
                  f"{r['seconds']:.0f} |")
        for ax, values in zip(axes, (drops, asrs, seconds), strict=True):
            ax.plot(fractions, values, marker="o", label=name)
    for ax, label in zip(axes, ("accuracy drop (points)", "ASR after TSC (%)",
                                "minutes (one thread)"), strict=True):
        ax.set_xscale("log")
        ax.set_xticks([0.5, 1, 2, 5, 10], ["0.5", "1", "2", "5", "10"])
        ax.set_xlabel("clean data (% of the training split)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    print(f"\nplot: {save_study_plot(fig, args.folder, 'clean_data.png')}")


if __name__ == "__main__":
    main()
