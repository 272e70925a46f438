"""ACC / ASR / RA / training time of the attacks on Fashion-MNIST.

    python experiments/attacks.py [--epochs-cnn 5] [--epochs-preact 3] [--cached-only]

Prints a Markdown table; models are cached (by settings hash) and shared with
experiments/purify.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tscpurify.bench.cache import cached_backdoored, run_metrics
from tscpurify.training import TrainSettings

MODELS = {"cnn": {"width": 16}, "preactresnet18": {"width": 16}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", default=["badnets", "blended"])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--epochs-cnn", type=int, default=5)
    parser.add_argument("--epochs-preact", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="benchmarks/out/models")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cached-only", action="store_true",
                        help="print only models already in the cache; train nothing")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("| attack | model | epochs | ACC % | ASR % | RA % | train s |")
    print("|---|---|---|---|---|---|---|")
    for attack in args.attacks:
        for model in args.models:
            epochs = args.epochs_cnn if model == "cnn" else args.epochs_preact
            pattern = f"{attack}-{model}-s{args.seed}-*/metrics.json"
            if args.cached_only and not any(Path(args.cache).glob(pattern)):
                print(f"| {attack} | {model} w16 | {epochs} | not run | | | |")
                continue
            folder = cached_backdoored(args.cache, attack=attack, model=model, seed=args.seed,
                                       train=TrainSettings(epochs=epochs),
                                       model_args=MODELS.get(model, {}), device=args.device)
            m = run_metrics(folder)
            print(f"| {attack} | {model} w16 | {epochs} | {m['acc']:.2f} | {m['asr']:.2f} | "
                  f"{m['ra']:.2f} | {m['train_seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
