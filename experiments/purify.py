"""TSC against the backdoored model and plain fine-tuning, on Fashion-MNIST with 5% clean data.

    python experiments/purify.py                      # the full table (about an hour on 2 CPUs)
    python experiments/purify.py --cells badnets:cnn:0 --preset default

Cells are attack:model:seed. Fine-tuning (FT) gets the same number of gradient steps as TSC's
curve training. The overhead ratio is TSC's time without the optional profiles and
evaluations, divided by (curve steps × the time of one plain training step of the model at
the same batch size); "TSC s / FT s" divides the same time by fine-tuning's for as many
steps. Both ratios need an otherwise idle machine to mean anything. Results are appended to
--out (JSON lines) and printed as Markdown. `--reuse-ft OLD.jsonl` takes FT's row (metrics and
time) from an earlier output with the same step count, to re-run only TSC after a change to it.
`--set JSON` overrides single TSCSettings fields of the preset, e.g. '{"rounds": 2}'.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from tscpurify.bench.cache import cached_backdoored, run_metrics
from tscpurify.data import load_dataset, select_clean_subset
from tscpurify.data.augment import random_crop_flip
from tscpurify.defenses import defend
from tscpurify.defenses.tsc import PRESETS, purify
from tscpurify.errors import SettingsError
from tscpurify.evaluation import evaluate
from tscpurify.run_kinds import make_evaluator
from tscpurify.runs import load_run
from tscpurify.seeding import derive_seed
from tscpurify.settings import replace_settings
from tscpurify.training import TrainSettings

DEFAULT_CELLS = [f"{a}:cnn:{s}" for a in ("badnets", "blended") for s in (0, 1, 2)] + \
                [f"{a}:preactresnet18:0" for a in ("badnets", "blended")]
EPOCHS = {"cnn": 5, "preactresnet18": 3}


def plain_step_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Median time of one ordinary SGD step (forward, backward, update) on a copy."""
    import copy

    model = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    times = []
    for i in range(8):
        began = time.perf_counter()
        loss = F.cross_entropy(model(random_crop_flip(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def run_cell(cell: str, args: argparse.Namespace) -> dict:
    attack, model_name, seed = cell.split(":")
    seed = int(seed)
    folder = cached_backdoored(args.cache, attack=attack, model=model_name, seed=seed,
                               train=TrainSettings(epochs=EPOCHS[model_name]),
                               model_args={"width": 16}, device=args.device)
    model, _, attack_obj = load_run(folder, args.device)
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    clean = train.subset(select_clean_subset(train.labels, args.clean_fraction,
                                             derive_seed(seed, "clean")))
    loader = DataLoader(clean.tensor_dataset(), batch_size=args.batch_size, shuffle=True)
    sample = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))
    profile_eval = make_evaluator(test.subset(sample[:args.profile_test]), attack_obj)
    settings = replace(replace_settings(PRESETS[args.preset], **args.overrides),
                       profile_points=args.profile_points, batch_size=args.batch_size)

    began = time.perf_counter()
    purified, report = purify(model, loader, settings, evaluate=profile_eval, seed=seed,
                              progress=not args.quiet)
    tsc_seconds = time.perf_counter() - began
    curve_steps = settings.rounds * 2 * settings.epochs * len(loader)
    ft_epochs = curve_steps // len(loader)
    earlier = args.reuse_ft.get(cell)
    same_data = earlier is not None and all(
        # Rows written before these two fields existed ran with the defaults.
        earlier.get(key, parser_default) == getattr(args, key)
        for key, parser_default in (("clean_fraction", 0.05), ("batch_size", 256)))
    # With the same clean data, the same curve steps mean the same FT epochs.
    if same_data and earlier["curve_steps"] == curve_steps:
        # FT depends on the model, the clean data, the seed and its step count only, never on
        # TSC's settings: an earlier row's run of it is this run's, bit for bit.
        ft_metrics, ft_seconds = earlier["ft"], earlier["seconds"]["ft"]
    else:
        ft = defend("ft", model, loader, seed=seed, progress=not args.quiet, epochs=ft_epochs)
        ft_metrics, ft_seconds = evaluate(ft.model, test, attack_obj).as_dict(), ft.seconds["total"]
        earlier = None

    x, y = next(iter(loader))
    step = plain_step_seconds(model, x.to(args.device), y.to(args.device))
    defense_only = tsc_seconds - report.seconds["profile"] - report.seconds["evaluation"]
    row = {
        "cell": cell, "preset": args.preset, "overrides": args.overrides,
        "settings": report.settings,
        "clean_fraction": args.clean_fraction, "batch_size": args.batch_size,
        "backdoored": run_metrics(folder),
        "tsc": evaluate(purified, test, attack_obj).as_dict(),
        "ft": ft_metrics, "ft_reused": earlier is not None,
        "curve_steps": curve_steps, "ft_epochs": ft_epochs,
        "seconds": {**report.seconds, "wall": tsc_seconds, "ft": ft_seconds},
        "plain_step_seconds": step,
        "overhead_ratio": defense_only / (curve_steps * step),
        "stages": [{"round": s.round, "stage": s.stage, "t": s.t, "metrics": s.metrics,
                    "finetuned": s.finetuned, "profile": s.profile} for s in report.stages],
    }
    return row


def print_table(rows: list[dict]) -> None:
    print("| cell | backdoored ACC / ASR | TSC ACC / ASR / RA | FT ACC / ASR / RA | "
          "TSC s (perm / curve / BN / profile) | overhead | TSC s / FT s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        b, t, f, s = r["backdoored"], r["tsc"], r["ft"], r["seconds"]
        print(f"| {r['cell']} | {b['acc']:.2f} / {b['asr']:.2f} | "
              f"{t['acc']:.2f} / {t['asr']:.2f} / {t['ra']:.2f} | "
              f"{f['acc']:.2f} / {f['asr']:.2f} / {f['ra']:.2f} | "
              f"{s['wall']:.0f} ({s['permutation']:.0f} / {s['curve']:.0f} / "
              f"{s['batchnorm']:.0f} / {s['profile'] + s['evaluation']:.0f}) | "
              f"{r['overhead_ratio']:.2f} | {tsc_over_ft(r):.2f} |", flush=True)


def tsc_over_ft(row: dict) -> float:
    """TSC's defense time over FT's at the same number of SGD steps, both timed in the same
    process minutes apart: a cross-check of the overhead ratio that a plain step timed once,
    on a machine whose load changes, cannot give."""
    s = row["seconds"]
    return (s["wall"] - s["profile"] - s["evaluation"]) / s["ft"]


def row_key(cell: str, preset: str, overrides: dict, batch_size: int
            ) -> tuple[str, str, str, int]:
    """What makes a finished row this run's: its cell, preset, settings overrides and batch."""
    return cell, preset, json.dumps(overrides, sort_keys=True), batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=DEFAULT_CELLS)
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--clean-fraction", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int,
                        help="curve, fine-tune and FT batch size (default: the preset's "
                             "batch_size, 256)")
    parser.add_argument("--profile-test", type=int, default=2000)
    parser.add_argument("--profile-points", type=int, default=11,
                        help="points per curve with ACC/ASR recorded (0 = none: about 30%% "
                             "faster; the table does not need them)")
    parser.add_argument("--cache", default="benchmarks/out/models")
    parser.add_argument("--out", default="benchmarks/out/purify.jsonl")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--set", default="{}", metavar="JSON",
                        help="TSCSettings fields to override on the preset, e.g. "
                             "'{\"rounds\": 2, \"epochs\": 45}'; rows record the settings")
    parser.add_argument("--reuse-ft", metavar="JSONL",
                        help="take each cell's FT result from this earlier output when its step "
                             "count, clean fraction and batch size match, instead of fine-tuning "
                             "again (FT does not depend on TSC's settings); such rows say "
                             "\"ft_reused\": true")
    args = parser.parse_args()
    try:
        args.overrides = json.loads(args.set)
        preset = replace_settings(PRESETS[args.preset], **args.overrides)
    except (ValueError, TypeError, SettingsError) as error:
        parser.error(f"--set must be a JSON object of valid TSCSettings fields: {error}")
    args.batch_size = args.batch_size or preset.loader_batch_size()
    args.reuse_ft = ({json.loads(line)["cell"]: json.loads(line)
                      for line in Path(args.reuse_ft).read_text().splitlines()}
                     if args.reuse_ft else {})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            row = json.loads(line)
            # Rows written before batch_size was recorded ran at 256.
            done[row_key(row["cell"], row["preset"], row.get("overrides", {}),
                         row.get("batch_size", 256))] = row
    rows = []
    for cell in args.cells:
        row = done.get(row_key(cell, args.preset, args.overrides, args.batch_size))
        if row is None:
            row = run_cell(cell, args)
            with out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        rows.append(row)
        print_table([row])
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
