"""The deep-purification diagnostic pooled over several bench folders: does the aligned distance
from the suspect model (which a defender can measure) rank the defended rows as their ASR after
two re-tune epochs does (which needs the attack)? `tscpurify bench --render` prints it per
table; this pools every row with both columns, benchmark and tuning rows alike.

    python scripts/distance_vs_retune.py benchmarks/results/fair benchmarks/results/deep \
        benchmarks/results/deep_b --model cnn --attack badnets --removed 5

--removed keeps only rows whose defense brought ASR to at most that many percent: among them
the question is depth alone, not whether the backdoor was removed at all.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tscpurify.bench.grid import read_all
from tscpurify.bench.tables import (
    RETUNE_EPOCH,
    aligned_distance,
    distance_vs_retune,
    model_name,
)
from tscpurify.bench.tuning import retune_asr


def pooled_rows(folders: list[Path]) -> list[dict]:
    rows = []
    for folder in folders:
        for stem in ("results", "tuning"):
            rows += read_all(folder, stem).values()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--model", help="only this model (the grid's name)")
    parser.add_argument("--attack", help="only this attack")
    parser.add_argument("--removed", type=float, help="only rows with ASR ≤ this after the defense")
    args = parser.parse_args()
    rows = [r for r in pooled_rows(args.folders)
            if r["cell"].get("base") and r.get("distance")
            and retune_asr(r, RETUNE_EPOCH) is not None
            and (args.model is None or model_name(r["cell"]) == args.model)
            and (args.attack is None or r["cell"]["attack"] == args.attack)
            and (args.removed is None or r["after"]["asr"] <= args.removed)]
    print("| defense | attack:model:seed | setting | ASR after | aligned distance | "
          f"re-tune ASR after {RETUNE_EPOCH} |")
    print("|---|---|---|---|---|---|")
    for r in sorted(rows, key=aligned_distance):
        c = r["cell"]
        print(f"| {c['defense']} | {c['attack']}:{model_name(c)}:{c['seed']} | {c['setting']} | "
              f"{r['after']['asr']:.2f} | {aligned_distance(r):.3f} | "
              f"{retune_asr(r, RETUNE_EPOCH):.1f} |")
    found = distance_vs_retune(rows)
    if found is None or found["spearman"] is None:
        print(f"\n{len(rows)} rows: too few (or constant) for a rank correlation")
    else:
        print(f"\n{found['rows']} rows: Spearman ρ = {found['spearman']:+.2f}")


if __name__ == "__main__":
    main()
