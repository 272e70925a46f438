"""Variants of TSC's last fine-tune on one backdoored run folder, all from the same curves.

    tscpurify attack --model cnn --width 16 --epochs 5 --seed 101 --out runs/tune101-badnets
    python experiments/final_finetune.py runs/tune101-badnets

Runs the preset's rounds once with no fine-tune after the last round (the finished stages are
kept in --resume, so a second call costs only the fine-tunes), then fine-tunes copies of that
model in several ways and prints ACC / ASR / RA on 2,000 test images for each. This is how the
default's last fine-tune was chosen: on tuning models (seeds 101-106), never on benchmark cells.
`--variants` picks which ones run; the variant tables below say what each name means.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from tscpurify.curve import (
    cross_entropy_loss,
    distillation_loss,
    path_aware_loss,
    recompute_bn_stats,
)
from tscpurify.data import CLEAN_FRACTION, load_dataset, select_clean_subset
from tscpurify.data.augment import random_crop_flip
from tscpurify.defenses import defend
from tscpurify.defenses.tsc import PRESETS, finished_stage, purify
from tscpurify.permutation import apply_permutation, derive_spec, match
from tscpurify.run_kinds import make_evaluator
from tscpurify.runs import load_run
from tscpurify.seeding import derive_seed
from tscpurify.settings import replace_settings
from tscpurify.training import TrainSettings, train_classifier

# name → (epochs, lr, distillation weight, temperature); weight 0 is the plain fine-tune.
VARIANTS = {
    "none": (0, 0.01, 0.0, 2.0),
    "plain 5": (5, 0.01, 0.0, 2.0),
    "plain 15": (15, 0.01, 0.0, 2.0),
    "kd 0.5 T2 5": (5, 0.01, 0.5, 2.0),
    "kd 0.5 T2 15": (15, 0.01, 0.5, 2.0),
    "kd 1.0 T2 15": (15, 0.01, 1.0, 2.0),
    "kd 1.0 T4 15": (15, 0.01, 1.0, 4.0),
    "kd 0.5 T2 15 lr.03": (15, 0.03, 0.5, 2.0),
    "plain 15 lr.03": (15, 0.03, 0.0, 2.0),
    "kd 0.5 T1 15 lr.03": (15, 0.03, 0.5, 1.0),
    "kd 0.25 T2 15 lr.03": (15, 0.03, 0.25, 2.0),
    "kd 0.25 T2 15": (15, 0.01, 0.25, 2.0),
    "kd 0.1 T2 15 lr.03": (15, 0.03, 0.1, 2.0),
}
# name → (epochs, lr, distillation weight, label smoothing): distillation from the purified
# model itself (before this fine-tune) instead of the suspect, or label smoothing alone.
SELF_VARIANTS = {
    "self-kd .25 15 lr.03": (15, 0.03, 0.25, 0.0),
    "self-kd .5 15 lr.03": (15, 0.03, 0.5, 0.0),
    "ls .1 15 lr.03": (15, 0.03, 0.0, 0.1),
    "ls .1 4 lr.03": (4, 0.03, 0.0, 0.1),  # at --batch-size 64, the steps of 15 epochs at 256
    "ls .1 4 lr.01": (4, 0.01, 0.0, 0.1),
    "ls .2 15 lr.03": (15, 0.03, 0.0, 0.2),
    "ls .1 15": (15, 0.01, 0.0, 0.1),
    "ls .1 20 lr.03": (20, 0.03, 0.0, 0.1),
    "ls .1 15 lr.05": (15, 0.05, 0.0, 0.1),
    "ls .05 15 lr.03": (15, 0.03, 0.0, 0.05),
    "kd .25 ls .1 15 lr.03": (15, 0.03, 0.25, 0.1),
    "kd .1 ls .1 15 lr.03": (15, 0.03, 0.1, 0.1),
}
# name → (epochs, lr, distillation weight): the last fine-tune started from the last round's
# stage-1 point instead of its stage-2 point (the last stage 2 skipped).
STAGE1_VARIANTS = {
    "s1 kd.25 15 lr.03": (15, 0.03, 0.25),
    "s1 plain 15 lr.03": (15, 0.03, 0.0),
    "s1 kd.25 20 lr.03": (20, 0.03, 0.25),
}
# name → FT-SAM overrides: sharpness-aware fine-tuning as the last step instead.
SAM_VARIANTS = {
    "sam 15 lr.03": {"epochs": 15, "lr": 0.03},
    "sam 15": {"epochs": 15, "lr": 0.01},
    "sam 8 lr.03": {"epochs": 8, "lr": 0.03},
    "sam 15 lr.03 rho.5": {"epochs": 15, "lr": 0.03, "rho": 0.5},
    "sam 15 lr.03 rho.1": {"epochs": 15, "lr": 0.03, "rho": 0.1},
}
# name → (epochs, lr, distillation weight, rho): path-aware fine-tunes, the loss taken a
# fraction rho of the way towards the suspect model aligned to the purified one.
PATH_VARIANTS = {
    "path .25 15 lr.03": (15, 0.03, 0.0, 0.25),
    "path .5 15 lr.03": (15, 0.03, 0.0, 0.5),
    "path .25 kd.25 15 lr.03": (15, 0.03, 0.25, 0.25),
    "path .5 kd.25 15 lr.03": (15, 0.03, 0.25, 0.5),
    "path .1 kd.25 15 lr.03": (15, 0.03, 0.25, 0.1),
    "path .05 kd.25 15 lr.03": (15, 0.03, 0.25, 0.05),
}

# name → (epochs, lr, mixup alpha, label smoothing, cutmix?): mixup (or CutMix) of pairs of
# clean images, with the targets mixed in the same proportion.
MIX_VARIANTS = {
    "mixup .2 15 lr.03": (15, 0.03, 0.2, 0.0, False),
    "mixup .4 15 lr.03": (15, 0.03, 0.4, 0.0, False),
    "mixup 1 15 lr.03": (15, 0.03, 1.0, 0.0, False),
    "mixup .2 ls.1 15 lr.03": (15, 0.03, 0.2, 0.1, False),
    "cutmix 1 15 lr.03": (15, 0.03, 1.0, 0.0, True),
}

# name → (epochs, lr, label smoothing, averaged epochs): the weights at the end of the last
# epochs averaged (SWA-style), then BatchNorm re-estimated.
SWA_VARIANTS = {
    "ls .1 15 lr.03 swa5": (15, 0.03, 0.1, 5),
    "ls .1 15 lr.03 swa10": (15, 0.03, 0.1, 10),
    "ls .1 20 lr.05 swa10": (20, 0.05, 0.1, 10),
}

# name → (epochs, lr, label smoothing, weight decay): the smoothed fine-tune with a stronger
# pull towards zero, so weights the clean data does not support (a dormant backdoor's) shrink.
WD_VARIANTS = {
    "ls .1 15 lr.03 wd2e-3": (15, 0.03, 0.1, 2e-3),
    "ls .1 15 lr.03 wd5e-3": (15, 0.03, 0.1, 5e-3),
}

# name → (epochs, lr, label smoothing): only BatchNorm's affine parameters and the last linear
# layer train; the features the curves left stay as they are.
HEAD_VARIANTS = {
    "bn+head ls .1 15 lr.03": (15, 0.03, 0.1),
    "bn+head ls .1 15 lr.1": (15, 0.1, 0.1),
}


def bn_and_head_finetune(start, loader, epochs, lr, smoothing):
    tuned = copy.deepcopy(start)
    head = [m for m in tuned.modules() if isinstance(m, torch.nn.Linear)][-1]
    trainable = {id(p) for m in tuned.modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or m is head
                 for p in m.parameters(recurse=False)}
    for param in tuned.parameters():
        param.requires_grad_(id(param) in trainable)
    tuned = finetune(tuned, loader, epochs, lr, task_loss(None, 0, smoothing=smoothing))
    for param in tuned.parameters():
        param.requires_grad_(True)
    return tuned


def averaged_finetune(start, loader, epochs, lr, smoothing, averaged):
    snapshots = []

    def keep(epoch, model):
        if epoch >= epochs - averaged:
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    tuned = finetune(start, loader, epochs, lr, task_loss(None, 0, smoothing=smoothing),
                     callbacks=[keep])
    tuned.load_state_dict({k: torch.stack([s[k] for s in snapshots]).mean(0)
                           if v.is_floating_point() else v
                           for k, v in snapshots[-1].items()})
    recompute_bn_stats(tuned, loader)
    return tuned


def mix_loss(alpha, smoothing, cutmix):
    beta = torch.distributions.Beta(alpha, alpha)

    def loss(model_fn, batch):
        x, y = batch[0], batch[1]
        x = random_crop_flip(x)
        lam = float(beta.sample())
        order = torch.randperm(len(x))
        if cutmix:
            h, w = x.shape[-2:]
            ch, cw = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
            top, left = torch.randint(h - ch + 1, ()).item(), torch.randint(w - cw + 1, ()).item()
            x = x.clone()
            x[..., top:top + ch, left:left + cw] = x[order][..., top:top + ch, left:left + cw]
            lam = 1 - ch * cw / (h * w)
        else:
            x = lam * x + (1 - lam) * x[order]
        logits = model_fn(x)
        ce = torch.nn.functional.cross_entropy
        return (lam * ce(logits, y, label_smoothing=smoothing)
                + (1 - lam) * ce(logits, y[order], label_smoothing=smoothing))
    return loss


def task_loss(teacher, weight, temperature=2.0, smoothing=0.0):
    """Cross-entropy (targets smoothed by `smoothing`), mixed with distillation from `teacher`
    at `weight` if that is > 0; both on crop/flip-augmented images."""
    if weight:
        return distillation_loss(teacher, random_crop_flip, weight=weight,
                                 temperature=temperature, label_smoothing=smoothing)
    return cross_entropy_loss(random_crop_flip, label_smoothing=smoothing)


def finetune(start, loader, epochs, lr, loss_fn, callbacks=(), weight_decay=5e-4):
    """A copy of `start` fine-tuned from seed 0 (the same data order for every variant)."""
    tuned = copy.deepcopy(start)
    torch.manual_seed(0)
    if epochs:
        settings = TrainSettings(epochs=epochs, lr=lr, batch_size=256, weight_decay=weight_decay)
        train_classifier(tuned, loader, settings, progress=False, loss_fn=loss_fn,
                         callbacks=callbacks)
    return tuned


def path_aware_finetune(purified, suspect, loader, epochs, lr, weight, rho):
    spec = derive_spec(purified, next(iter(loader))[0][:8])
    perm = match(purified, suspect, spec, loader, mode="align")
    anchor = apply_permutation(suspect.state_dict(), spec, perm)
    inner = task_loss(suspect, weight)
    tuned = copy.deepcopy(purified)
    train_classifier(tuned, loader, TrainSettings(epochs=epochs, lr=lr, batch_size=256),
                     progress=False, loss_fn=path_aware_loss(inner, anchor, rho))
    recompute_bn_stats(tuned, loader)
    return tuned


def stage_point(model, stages: Path, round_index: int, stage: int) -> torch.nn.Module:
    """A copy of `model` holding the point a finished stage saved in `stages`."""
    finished = finished_stage(stages, round_index, stage)
    if finished is None:
        raise SystemExit(f"error: {stages} holds no finished round {round_index} stage {stage}")
    point = copy.deepcopy(model)
    point.load_state_dict(finished[0])
    return point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="backdoored run folder")
    parser.add_argument("overrides", nargs="?", default="{}", help="TSCSettings fields as JSON")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--resume", help="folder for the finished stages (default: RUN-tsc-stages, "
                                         "beside the run folder, which is never written)")
    parser.add_argument("--legacy-clean-subset", action="store_true",
                        help="draw the 3,000 clean images with seed 0 as this script did before "
                             "it moved to experiments/ (reproduces docs/tuning.md's numbers); "
                             "by default they are drawn as `tscpurify purify` draws them")
    parser.add_argument("--batch-size", type=int,
                        help="batch size of the curves and of every fine-tune (default: the "
                             "preset's batch_size, 256)")
    parser.add_argument("--ft-batch-size", type=int,
                        help="batch size of the last fine-tunes only (default: --batch-size)")
    parser.add_argument("--stages", action="store_true",
                        help="also print ACC / ASR of every finished stage's point (after the "
                             "fine-tune between rounds, where there is one)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        choices=[*VARIANTS, *SAM_VARIANTS, *PATH_VARIANTS,
                                 *STAGE1_VARIANTS, *SELF_VARIANTS, *MIX_VARIANTS,
                                 *SWA_VARIANTS, *WD_VARIANTS, *HEAD_VARIANTS])
    args = parser.parse_args()
    model, _, attack = load_run(args.run)
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    clean = train.subset(select_clean_subset(train.labels, 3000, 0) if args.legacy_clean_subset
                         else select_clean_subset(train.labels, CLEAN_FRACTION,
                                                  derive_seed(0, "clean")))
    settings = replace_settings(PRESETS[args.preset], profile_points=0, final_ft_epochs=0,
                                **json.loads(args.overrides))
    settings = replace(settings, batch_size=args.batch_size or settings.loader_batch_size())
    loader = DataLoader(clean.tensor_dataset(), batch_size=settings.batch_size, shuffle=True)
    sample = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:2000]
    measure = make_evaluator(test.subset(sample), attack)
    began = time.perf_counter()
    stages = Path(args.resume or f"{str(args.run).rstrip('/')}-tsc-stages")
    curves_only, _ = purify(model, loader, settings, progress=False, resume_dir=stages)
    print(f"{settings.rounds} rounds without the last fine-tune: "
          f"{time.perf_counter() - began:.0f} s")
    if args.ft_batch_size:
        loader = DataLoader(clean.tensor_dataset(), batch_size=args.ft_batch_size, shuffle=True)

    def show(name: str, tuned: torch.nn.Module) -> None:
        print(f"{name:20}", {k: round(v, 2) for k, v in measure(tuned.eval()).items()},
              flush=True)

    show("before", model)
    if args.stages:
        for round_index in range(settings.rounds):
            for stage in (1, 2):
                show(f"round {round_index} stage {stage}",
                     stage_point(model, stages, round_index, stage))
    for name in args.variants:
        if name in WD_VARIANTS:
            epochs, lr, smoothing, decay = WD_VARIANTS[name]
            show(name, finetune(curves_only, loader, epochs, lr,
                                task_loss(None, 0, smoothing=smoothing), weight_decay=decay))
            continue
        if name in HEAD_VARIANTS:
            show(name, bn_and_head_finetune(curves_only, loader, *HEAD_VARIANTS[name]))
            continue
        if name in SWA_VARIANTS:
            show(name, averaged_finetune(curves_only, loader, *SWA_VARIANTS[name]))
            continue
        if name in MIX_VARIANTS:
            epochs, lr, *mix = MIX_VARIANTS[name]
            tuned = finetune(curves_only, loader, epochs, lr, mix_loss(*mix))
            # Mixed batches shift BatchNorm's running statistics: re-estimate on clean images.
            recompute_bn_stats(tuned, loader)
            show(name, tuned)
            continue
        if name in SELF_VARIANTS:
            epochs, lr, weight, smoothing = SELF_VARIANTS[name]
            # "kd … ls …" distils from the suspect, "self-kd" from the purified model itself.
            teacher = model if name.startswith("kd") else copy.deepcopy(curves_only)
            show(name, finetune(curves_only, loader, epochs, lr,
                                task_loss(teacher, weight, smoothing=smoothing)))
            continue
        if name in STAGE1_VARIANTS:
            epochs, lr, weight = STAGE1_VARIANTS[name]
            stage1 = stage_point(model, stages, settings.rounds - 1, 1)
            show(name, finetune(stage1, loader, epochs, lr, task_loss(model, weight)))
            continue
        if name in PATH_VARIANTS:
            torch.manual_seed(0)
            tuned = path_aware_finetune(curves_only, model, loader, *PATH_VARIANTS[name])
            show(name, tuned)
            continue
        if name in SAM_VARIANTS:
            tuned = defend("ft_sam", curves_only, loader, seed=0, progress=False,
                           **SAM_VARIANTS[name]).model
            show(name, tuned)
            continue
        epochs, lr, weight, temperature = VARIANTS[name]
        show(name, finetune(curves_only, loader, epochs, lr,
                            task_loss(model, weight, temperature)))


if __name__ == "__main__":
    main()
