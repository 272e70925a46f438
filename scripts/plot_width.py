"""Studies 3 and 4 of docs/ablations.md: each row of the width grid against the model's width,
one line per row and attack, from a bench folder's rows (the width is the cell's own
`model_args.width`; rows of a model without one are left out).

    python scripts/plot_width.py benchmarks/results/ablations_width

writes FOLDER/plots/width.png and prints the table behind it: per model, the suspect, then each
row's ACC drop, ASR, re-tune ASR after 1 / 2 / 5 epochs and distance from the suspect (up to
permuting units).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from study_plot import save_study_plot  # noqa: E402  (scripts/, beside this file)

from tscpurify.bench.grid import read_all  # noqa: E402
from tscpurify.bench.tables import aligned_distance, attack_name, retune_cell  # noqa: E402
from tscpurify.bench.tuning import retune_asr  # noqa: E402

# The grid's rows in the order the docs read them; `none` is the suspect, not a line.
ROWS = ("ft", "scratch", "tsc", "tsc_identity", "tsc_linear", "tsc_linear_identity", "tsc_paper")
RETUNE_EPOCH = 2  # the re-tune column study 4's depth statement reads
STYLES = ("-", "--", ":", "-.")  # one per attack; the colour tells the rows apart


def rows_by_width(folder: Path) -> dict[tuple[str, str], dict[int, dict[str, dict]]]:
    """(attack, architecture) → width → row name → row, the default settings only."""
    found: dict[tuple[str, str], dict[int, dict[str, dict]]] = defaultdict(
        lambda: defaultdict(dict))
    for row in read_all(folder, "results").values():
        cell = row["cell"]
        width = (cell.get("model_args") or {}).get("width")
        if (width is None or cell.get("setting", "default") != "default"
                or cell["defense"] not in ("none", *ROWS)):
            continue
        found[(attack_name(cell), cell["model"])][int(width)][cell["defense"]] = row
    return {line: dict(sorted(widths.items())) for line, widths in sorted(found.items())}


def _drop(row: dict) -> float:
    return row["before"]["acc"] - row["after"]["acc"]


def _distance(row: dict) -> str:
    distance = aligned_distance(row)
    return "–" if distance is None else f"{distance:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    lines = rows_by_width(args.folder)
    if not any(name in rows for widths in lines.values() for rows in widths.values()
               for name in ROWS):
        raise SystemExit(f"error: no rows of {', '.join(ROWS)} with a model width in "
                         f"{args.folder}")
    print("| attack | model | width | suspect ACC / ASR | row | ACC drop | ASR | "
          "re-tune ASR 1 / 2 / 5 | aligned distance |")
    print("|---|---|---|---|---|---|---|---|---|")
    panels = (("accuracy drop (points)", _drop), ("ASR after the defense (%)",
              lambda r: r["after"]["asr"]),
              (f"ASR after {RETUNE_EPOCH} re-tune epochs (%)",
               lambda r: retune_asr(r, RETUNE_EPOCH)))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.2))
    for number, ((attack, arch), widths) in enumerate(lines.items()):
        for width, rows in widths.items():
            first = rows.get("none") or next(iter(rows.values()))  # every row has `before`
            suspect = f"{first['before']['acc']:.2f} / {first['before']['asr']:.2f}"
            for name in (n for n in ROWS if n in rows):
                row = rows[name]
                print(f"| {attack} | {arch} | {width} | {suspect} | {name} | {_drop(row):.2f} | "
                      f"{row['after']['asr']:.2f} | {retune_cell(row)} | "
                      f"{_distance(row)} |")
        for colour, name in enumerate(ROWS):
            for ax, (_, value) in zip(axes, panels, strict=True):
                points = [(w, value(rows[name])) for w, rows in widths.items() if name in rows]
                points = [(x, y) for x, y in points if y is not None]
                if points:
                    ax.plot([x for x, _ in points], [y for _, y in points],
                            STYLES[number % len(STYLES)], marker="o", color=f"C{colour}",
                            label=f"{name} · {attack} {arch}")
    widths_run = sorted({w for widths in lines.values() for w in widths})
    for ax, (label, _) in zip(axes, panels, strict=True):
        ax.set_xscale("log", base=2)
        ax.minorticks_off()  # only the widths run are marked
        ax.set_xticks(widths_run, [str(w) for w in widths_run])
        ax.set_xlabel("width (channels of the first layer)")
        ax.set_ylabel(label)
        if "ASR" in label:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, handlelength=4, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    print(f"\nplot: {save_study_plot(fig, args.folder, 'width.png')}")


if __name__ == "__main__":
    main()
