"""Study 5 of docs/ablations.md: TSC and plain fine-tuning against the poisoning rate, one line
per attack, from a bench folder's rows (`none`, `clean_floor`, `ft`, `tsc` on each attack at
each rate; the rate is the attack's own, read from its settings and its defaults).

    python scripts/plot_rate.py benchmarks/results/ablations_rate

writes FOLDER/plots/rate.png and prints the table behind it.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from study_plot import save_study_plot  # noqa: E402  (scripts/, beside this file)

from tscpurify.attacks import create_attack  # noqa: E402
from tscpurify.bench.grid import read_all  # noqa: E402
from tscpurify.bench.tables import fmt, model_name, retune_cell  # noqa: E402
from tscpurify.bench.tuning import retune_asr  # noqa: E402

ROWS = ("none", "clean_floor", "ft", "tsc")
RETUNE_EPOCH = 2  # the re-tune column the deep-purification rule reads


def rows_by_rate(folder: Path) -> dict[str, dict[float, dict[str, dict]]]:
    """(attack:model:seed) → poisoning rate in % → row name → row, the default settings only."""
    found: dict[str, dict[float, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for row in read_all(folder, "results").values():
        cell = row["cell"]
        if cell["defense"] not in ROWS or cell.get("setting", "default") != "default":
            continue
        rate = 100 * create_attack(cell["attack"], **cell["attack_args"]).rate
        found[f"{cell['attack']}:{model_name(cell)}:{cell['seed']}"][rate][cell["defense"]] = row
    return {name: dict(sorted(rates.items())) for name, rates in found.items()}


def _drop(row: dict | None) -> float | None:
    return None if row is None else row["before"]["acc"] - row["after"]["acc"]


def _asr(row: dict | None) -> float | None:
    return None if row is None else row["after"]["asr"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    lines = rows_by_rate(args.folder)
    if not lines:
        raise SystemExit(f"error: no rows of {', '.join(ROWS)} in {args.folder}")
    print("| attack | rate (%) | suspect ACC / ASR | FT drop / ASR | TSC drop / ASR | "
          "TSC re-tune ASR 1 / 2 / 5 | floor re-tune ASR 1 / 2 / 5 | FT re-tune ASR 1 / 2 / 5 |")
    print("|---|---|---|---|---|---|---|---|")
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for number, (name, rates) in enumerate(lines.items()):
        colour = f"C{number}"  # one colour per attack; the line style tells the rows apart
        for rate, rows in rates.items():
            suspect = rows.get("none") or rows.get("tsc") or rows.get("ft")
            before = (f"{suspect['before']['acc']:.2f} / {suspect['before']['asr']:.2f}"
                      if suspect else "–")
            print(f"| {name} | {rate:g} | {before} | {fmt(_drop(rows.get('ft')))} / "
                  f"{fmt(_asr(rows.get('ft')))} | {fmt(_drop(rows.get('tsc')))} / "
                  f"{fmt(_asr(rows.get('tsc')))} | "
                  + " | ".join(retune_cell(rows.get(d) or {}) for d in ("tsc", "clean_floor", "ft"))
                  + " |")
        for ax, defense, value, style in (
                (axes[0], "tsc", _drop, "-"), (axes[0], "ft", _drop, "--"),
                (axes[1], "tsc", _asr, "-"), (axes[1], "ft", _asr, "--"),
                (axes[2], "tsc", lambda r: r and retune_asr(r, RETUNE_EPOCH), "-"),
                (axes[2], "clean_floor", lambda r: r and retune_asr(r, RETUNE_EPOCH), ":")):
            points = [(rate, value(rows.get(defense))) for rate, rows in rates.items()]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], style, marker="o",
                        color=colour, label=f"{defense} · {name.split(':')[0]}")
    for ax, label in zip(axes, ("accuracy drop (points)", "ASR after the defense (%)",
                                f"ASR after {RETUNE_EPOCH} re-tune epochs (%)"), strict=True):
        ax.set_xscale("log")
        ax.minorticks_off()  # only the rates run are marked
        rates = sorted({rate for r in lines.values() for rate in r})
        ax.set_xticks(rates, [f"{v:g}" for v in rates])
        ax.set_xlabel("poisoning rate (% of the training split)")
        ax.set_ylabel(label)
        if "ASR" in label:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, handlelength=4)  # long enough to show the dashes
    fig.tight_layout()
    print(f"\nplot: {save_study_plot(fig, args.folder, 'rate.png')}")


if __name__ == "__main__":
    main()
