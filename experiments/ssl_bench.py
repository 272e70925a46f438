"""Label-free purification of backdoored self-supervised encoders, next to the baselines that
can run on an encoder: MCR with its curve (and endpoint fine-tuning) on the self-supervised
loss, data-free CLP, and no defense.

    python experiments/ssl_bench.py                             # 3 settings × 3 seeds (hours)
    python experiments/ssl_bench.py --cells badencoder:0 --defenses tsc clp

Cells are setting:seed with setting one of
  badencoder  SimCLR (cnn trunk, width 16) fine-tuned by BadEncoder (BadNets patch);
  ctrl        SimCLR pre-trained on images poisoned by CTRL (frequency trigger);
  ctrl400     the same for 400 epochs instead of 10, 5% poisoned at magnitude 200 (the TSC
              reference's CTRL command), the budget at which CTRL's backdoor took hold here,
              on seed 0 only (about an hour of pre-training per seed on one thread);
  clip        a small CLIP trained on image-caption pairs, 5% poisoned (BadNets patch).
Encoders are judged by a linear probe on clean labelled data (ACC, ASR), CLIP zero-shot.
Every defense sees 5% of the training images, and no label: SimCLR cells get bare images
(NT-Xent on two views), CLIP cells image-caption pairs (contrastive loss against the frozen
clean text encoder). TSC runs the "ssl" preset (the SSL point t = 0.25, two rounds); MCR its own
defaults. Backdoored models are cached in --cache; rows are appended to --out (JSON lines)
and printed as Markdown.

(Named ssl_bench.py, not ssl.py: the script's folder is on sys.path, and a file ssl.py there
would shadow the standard library's ssl module for every other benchmark script.)
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from tscpurify.attacks import attack_from_record, create_attack
from tscpurify.attacks.badencoder import BadEncoderSettings
from tscpurify.attacks.poisoned_pairs import poison_pairs
from tscpurify.checkpoint import load_model, save_model, write_json
from tscpurify.curve.contrastive import simclr_loss
from tscpurify.data import ImageData, load_dataset, select_clean_subset
from tscpurify.data.views import SimCLRAugment
from tscpurify.defenses import defend
from tscpurify.defenses.mcr import MCRSettings, mcr
from tscpurify.defenses.tsc import PRESETS, TSCSettings, purify
from tscpurify.defenses.tsc_clip import frozen_text_loss, purify_clip
from tscpurify.evaluation import ProbeSettings, encoder_metrics
from tscpurify.evaluation.zero_shot import zero_shot_metrics
from tscpurify.models import create_model
from tscpurify.models.clip import Tokenizer
from tscpurify.purification import image_loader, unlabelled_subset
from tscpurify.run_kinds import probe_settings
from tscpurify.runs import EncoderRunSettings, load_run, train_encoder
from tscpurify.seeding import derive_seed, seed_everything
from tscpurify.settings import replace_settings
from tscpurify.sidecar import Sidecar
from tscpurify.ssl import SimCLRSettings, train_clip
from tscpurify.ssl.captions import CaptionedImages, all_captions

SETTINGS = ("badencoder", "ctrl", "ctrl400", "clip")
# ctrl400 runs only when named: an hour of pre-training per seed.
DEFAULT_SETTINGS = ("badencoder", "ctrl", "clip")
# Encoder settings beyond train_encoder's defaults: what each setting's name stands for.
ENCODER_ARGS: dict[str, dict[str, Any]] = {
    "badencoder": {"attack": "badencoder"},
    "ctrl": {"attack": "ctrl"},
    "ctrl400": {"attack": "ctrl", "attack_args": {"rate": 0.05, "magnitude": 200.0},
                "simclr": SimCLRSettings(epochs=400)},
}
DEFENSES = ("tsc", "mcr", "clp")
CLIP_IMAGES, CLIP_RATE = 5000, 0.05


# --smoke: every size cut to seconds, to check the code path (the numbers mean nothing).
SMOKE_ENCODER = {"run": EncoderRunSettings(train_images=500, shadow_images=100),
                 "simclr": SimCLRSettings(epochs=1), "bad": BadEncoderSettings(epochs=1),
                 "probe": ProbeSettings(train_images=500, test_images=500, epochs=5)}


def tsc_settings(args: argparse.Namespace) -> TSCSettings:
    """The SSL preset (t = 0.25), without profiles (the table needs none)."""
    settings = replace(PRESETS["ssl"], profile_points=0)
    return replace_settings(settings, rounds=1, epochs=1, ft_epochs=0) if args.smoke else settings


def mcr_settings(args: argparse.Namespace) -> MCRSettings:
    return replace_settings(MCRSettings(), ft_epochs=1, epochs=1) if args.smoke else MCRSettings()


def clip_folder(cache: Path, seed: int, train: ImageData, test: ImageData,
                smoke: bool = False) -> Path:
    """A poisoned CLIP (BadNets patch captioned as class 0) trained once and cached."""
    folder = cache / f"clip-s{seed}"
    if (folder / "metrics.json").exists():
        return folder
    seed_everything(seed)
    tokenizer = Tokenizer.from_texts(all_captions(train.classes))
    model = create_model("clip", vocab=list(tokenizer.vocab))
    pretrain = train.subset(select_clean_subset(train.labels, 500 if smoke else CLIP_IMAGES,
                                                derive_seed(seed, "pretrain")))
    poisoned = poison_pairs(pretrain, create_attack("badnets", target=0, rate=CLIP_RATE),
                            tokenizer, derive_seed(seed, "poison"))
    began = time.perf_counter()
    train_clip(model, DataLoader(poisoned.pairs, batch_size=256, shuffle=True), progress=False,
               **({"epochs": 1} if smoke else {}))
    seconds = time.perf_counter() - began
    metrics = zero_shot_metrics(model, test, poisoned.attack).as_dict()
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, folder, Sidecar(arch="clip", kwargs=model.config, kind="clip",
                                      attack=poisoned.attack.record(), seed=seed))
    write_json(folder / "metrics.json", {**metrics, "train_seconds": seconds})
    return folder


def simclr_cell(setting: str, seed: int, args: argparse.Namespace, train: ImageData,
                test: ImageData) -> dict[str, Any]:
    folder = Path(args.cache) / f"{setting}-s{seed}"
    if not (folder / "metrics.json").exists():
        train_encoder(folder, seed=seed, device=args.device, progress=False, overwrite=True,
                      **{**ENCODER_ARGS[setting], **(SMOKE_ENCODER if args.smoke else {})})
    model, sidecar, attack = load_run(folder, args.device)
    probe = probe_settings(sidecar)

    def measure(m: nn.Module) -> dict[str, Any]:
        return encoder_metrics(m, train, test, attack, probe)

    clean = train.subset(unlabelled_subset(len(train), args.clean_fraction,
                                           derive_seed(seed, "clean")))
    loader = image_loader(clean, args.batch_size)
    loss = simclr_loss(SimCLRAugment())
    defenses: dict[str, Callable[[], nn.Module]] = {
        "tsc": lambda: purify(model, loader, tsc_settings(args), loss_fn=loss, seed=seed,
                              progress=False)[0],
        "mcr": lambda: mcr(copy.deepcopy(model), loader, mcr_settings(args), seed=seed,
                           progress=False, callbacks={"loss_fn": loss}).model,
        "clp": lambda: defend("clp", model, loader, seed=seed, progress=False).model,
    }
    return run_defenses(measure(model), defenses, measure, args)


def clip_cell(seed: int, args: argparse.Namespace, train: ImageData,
              test: ImageData) -> dict[str, Any]:
    folder = clip_folder(Path(args.cache), seed, train, test, args.smoke)
    model, sidecar = load_model(folder, args.device)
    attack = attack_from_record(sidecar.attack)

    def measure(m: nn.Module) -> dict[str, Any]:
        return zero_shot_metrics(m, test, attack).as_dict()

    clean = train.subset(unlabelled_subset(len(train), args.clean_fraction,
                                           derive_seed(seed, "clean")))
    loader = DataLoader(CaptionedImages.from_data(clean, model.tokenizer),
                        batch_size=args.batch_size, shuffle=True)
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    loss = frozen_text_loss(frozen)

    def with_visual(visual: nn.Module) -> nn.Module:
        return copy.deepcopy(model, memo={id(model.visual): visual}).eval()

    defenses: dict[str, Callable[[], nn.Module]] = {
        "tsc": lambda: purify_clip(model, loader, tsc_settings(args), seed=seed,
                                   progress=False)[0],
        "mcr": lambda: with_visual(mcr(copy.deepcopy(model.visual), loader, mcr_settings(args),
                                       seed=seed, progress=False,
                                       callbacks={"loss_fn": loss}).model),
        "clp": lambda: with_visual(defend("clp", model.visual, loader, seed=seed,
                                          progress=False).model),
    }
    return run_defenses(measure(model), defenses, measure, args)


def run_defenses(before: dict[str, Any], defenses: dict[str, Callable[[], nn.Module]],
                 measure: Callable[[nn.Module], dict[str, Any]],
                 args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"none": before, "seconds": {}}
    for name in args.defenses:
        began = time.perf_counter()
        purified = defenses[name]()
        row["seconds"][name] = time.perf_counter() - began
        row[name] = measure(purified)
        print(f"  {name}: {fmt(row[name])} ({row['seconds'][name]:.0f} s)", flush=True)
    return row


def fmt(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "–"
    return f"{metrics['acc']:.2f} / {metrics['asr']:.2f}"


def print_table(rows: list[dict[str, Any]], defenses: list[str]) -> None:
    names = {"tsc": "TSC (label-free)", "mcr": "MCR-SSL", "clp": "CLP"}
    print("| setting | seed | no defense ACC / ASR | " +
          " | ".join(f"{names[d]} ACC / ASR" for d in defenses) + " |")
    print("|---|---|---|" + "---|" * len(defenses))
    for r in rows:
        print(f"| {r['setting']} | {r['seed']} | {fmt(r['none'])} | " +
              " | ".join(fmt(r.get(d)) for d in defenses) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+",
                        default=[f"{s}:{seed}" for s in DEFAULT_SETTINGS for seed in (0, 1, 2)])
    parser.add_argument("--defenses", nargs="+", default=list(DEFENSES), choices=DEFENSES)
    parser.add_argument("--clean-fraction", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cache", default="benchmarks/out/ssl-models")
    parser.add_argument("--out", default="benchmarks/out/ssl.jsonl")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and budgets, to check the code path in a minute or two")
    args = parser.parse_args()
    if args.smoke:
        args.clean_fraction = 300
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            row = json.loads(line)
            done[(row["setting"], row["seed"])] = row
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    rows = []
    for cell in args.cells:
        setting, seed = cell.split(":")
        if setting not in SETTINGS:
            parser.error(f"unknown setting {setting!r}; choices: {', '.join(SETTINGS)}")
        seed = int(seed)
        row = done.get((setting, seed))
        if row is None or any(d not in row for d in args.defenses):
            print(f"{cell}:", flush=True)
            if setting == "clip":
                result = clip_cell(seed, args, train, test)
            else:
                result = simclr_cell(setting, seed, args, train, test)
            row = {**(row or {}), "setting": setting, "seed": seed, **result}
            with out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        rows.append(row)
    print()
    print_table(rows, args.defenses)


if __name__ == "__main__":
    main()
