"""Profiles of TSC variants along their curves, on one backdoored run folder.

    tscpurify attack --model cnn --width 16 --epochs 5 --seed 100 --out runs/tune-badnets
    python experiments/variants.py runs/tune-badnets \
        '{"rounds": 1, "epochs": 20, "cosine_t_max": null}'

Prints ACC / ASR / clean loss at t = 0, 0.1, ..., 1 for every stage of every round (ACC and
ASR on 2,000 test images), then the final metrics and the time split. This is the tool the
default settings were chosen with: on the tuning model (seed 100), never on benchmark cells.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import DataLoader

from tscpurify.data import load_dataset, select_clean_subset
from tscpurify.defenses.tsc import PRESETS, purify
from tscpurify.run_kinds import make_evaluator
from tscpurify.runs import load_run
from tscpurify.seeding import derive_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="backdoored run folder")
    parser.add_argument("overrides", nargs="?", default="{}", help="TSCSettings fields as JSON")
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    parser.add_argument("--clean", type=float, default=3000, help="clean images (count)")
    parser.add_argument("--legacy-clean-subset", action="store_true",
                        help="draw them with seed 0 as this script did before it moved to "
                             "experiments/ (reproduces docs/tuning.md); by default they are "
                             "drawn as `tscpurify purify` draws them")
    args = parser.parse_args()
    overrides = json.loads(args.overrides)
    model, _, attack = load_run(args.run)
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    seed = 0 if args.legacy_clean_subset else derive_seed(0, "clean")
    clean = train.subset(select_clean_subset(train.labels, args.clean, seed))
    loader = DataLoader(clean.tensor_dataset(), batch_size=256, shuffle=True)
    sample = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:2000]
    measure = make_evaluator(test.subset(sample), attack)
    began = time.perf_counter()
    purified, report = purify(model, loader, PRESETS[args.preset], evaluate=measure,
                              progress=False, **overrides)
    print(f"preset {args.preset} + {overrides}: {time.perf_counter() - began:.0f} s")
    print("before", {k: round(v, 2) for k, v in measure(model).items()})
    for s in report.stages:
        point = {k: round(v, 2) for k, v in s.metrics.items()}
        tuned = {k: round(v, 2) for k, v in s.finetuned.items()}
        print(f"round {s.round} stage {s.stage}: point at t={s.t:g} {point}"
              + (f", after fine-tune {tuned}" if tuned else ""))
        if s.profile:
            print("  along the curve, t = " + " ".join(f"{p['t']:5g}" for p in s.profile))
        for key, digits in (("acc", 1), ("asr", 1), ("loss", 2)):
            if s.profile:
                print(f"  {key:4} " + " ".join(f"{p[key]:5.{digits}f}" for p in s.profile))
    print("after", {k: round(v, 2) for k, v in measure(purified).items()})
    print("seconds", {k: round(v, 1) for k, v in report.seconds.items()})


if __name__ == "__main__":
    main()
