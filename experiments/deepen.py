"""Deep purification, look 2: where does a dormant backdoor live, and does a clean-data-only
operation after purification erase it? (docs/deep-purification.md, look 2.)

    tscpurify purify SUSPECT --out PURIFIED --seed S --retune-floor FLOOR   # TSC's default
    python experiments/deepen.py SUSPECT PURIFIED FLOOR --seed S

1. The diagnostic: the re-tune (tscpurify.retune, the fair grid's sizes) with every parameter
   frozen but the classifier head, and BatchNorm statistics fixed. If the head alone brings the
   backdoor back on the purified model and not on the floor, the trigger's features survived
   purification intact: only the last mapping was broken.
2. Candidates, each applied to the purified model and followed by TSC's own last fine-tune
   (15 epochs, lr 0.03, label smoothing 0.1, crop and flip) on the same clean images; none
   reads the attack:
   - ft15: the fine-tune alone (the control: what more clean training does),
   - reinit_head: the classifier head re-initialised (as FST does), then the fine-tune,
   - reinit_first: the first convolution and its BatchNorm re-initialised, then the fine-tune,
   - reinit_both: both of the above, then the fine-tune,
   - noise_03: Gaussian noise of 0.3 × each weight tensor's RMS added, then the fine-tune,
   - relearn_1, relearn_3: the first 1 or 3 convolutions re-initialised and trained alone to
     reproduce the purified model's own features there on clean images (30 epochs, MSE),
     then the fine-tune (look 2's diagnostic found the trigger's features in those layers),
   - project_999, project_99: each convolution's and linear layer's weights projected onto
     the span of its clean inputs (the eigenvectors of the inputs' second moment that hold
     99.9% or 99% of its energy, over 3×3 patches for convolutions), then the fine-tune.
     Directions the clean data never excites carry nothing a clean input needs, and are where
     a trigger's features can live. `_alone`: the projection without the fine-tune.
   - ibau_15, sau_15: i-BAU (15 rounds) or SAU (15 epochs) with their published settings,
     run on the purified model instead of the fine-tune: unlearning adversarial perturbations,
     a proxy of the trigger that needs no trigger,
   - distill_fresh: every layer re-initialised, then trained for TSC's whole budget to match
     the purified model's outputs on clean images (soft targets, no labels; crop, flip and
     mixup); scratch: the same student trained on the labels instead (what re-training on
     the clean data alone gives). Added after look 2's first runs, before their own.
   - as_is: nothing (the purified model itself, for its head-only re-tune).
Every model is re-tuned (the full re-tune, all parameters) and measured on the whole test split.
Prints a table and writes it as JSON next to PURIFIED (deepen.json). A pilot on tuning models
(seed ≥ 100), to find an idea worth a deep look; it adopts nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from tscpurify.curve import cross_entropy_loss
from tscpurify.data import CLEAN_FRACTION, load_dataset, select_clean_subset
from tscpurify.data.augment import random_crop_flip
from tscpurify.defenses import defend
from tscpurify.evaluation import evaluate
from tscpurify.retune import RetuneSettings, retune_profile
from tscpurify.runs import load_run
from tscpurify.seeding import derive_seed, seed_everything
from tscpurify.training import TrainSettings, train_classifier

BatchNorm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FINAL_FT = TrainSettings(epochs=15, lr=0.03, batch_size=256)


def head_of(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def head_only(model: nn.Module) -> nn.Module:
    """A copy whose only trainable parameters are the head's, with BatchNorm statistics fixed
    (momentum 0: the running averages never move)."""
    net = copy.deepcopy(model)
    net.requires_grad_(False)
    head_of(net).requires_grad_(True)
    for m in net.modules():
        if isinstance(m, BatchNorm):
            m.momentum = 0.0
    return net


def trainable_from(model: nn.Module, layers_up: int) -> nn.Module:
    """A copy in which only the last `layers_up` conv / linear layers (with the BatchNorm
    layers after them) train; the rest, BatchNorm statistics included, stays fixed."""
    net = copy.deepcopy(model)
    modules = list(net.modules())
    weighted = [i for i, m in enumerate(modules) if isinstance(m, (nn.Conv2d, nn.Linear))]
    first = weighted[-layers_up]
    net.requires_grad_(False)
    for i, m in enumerate(modules):
        if isinstance(m, BatchNorm) and i < first:
            m.momentum = 0.0
        elif i >= first and not list(m.children()):
            m.requires_grad_(True)
    return net


def reset(modules) -> None:
    """Each module's own fresh initialisation (PyTorch's default), BatchNorm statistics too."""
    for m in modules:
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if isinstance(m, BatchNorm):
            m.reset_running_stats()


def reinit_head(model: nn.Module, loader: DataLoader) -> None:
    head_of(model).reset_parameters()


def reinit_first(model: nn.Module, loader: DataLoader) -> None:
    modules = list(model.modules())
    first = next(i for i, m in enumerate(modules) if isinstance(m, nn.Conv2d))
    modules[first].reset_parameters()
    norm = next((m for m in modules[first + 1:] if isinstance(m, BatchNorm)), None)
    if norm is not None:
        norm.reset_parameters()
        norm.reset_running_stats()


@torch.no_grad()
def add_noise(model: nn.Module, loader: DataLoader, scale: float = 0.3) -> None:
    for p in model.parameters():
        if p.dim() > 1:  # weights, not biases or BatchNorm scales
            p.add_(torch.randn_like(p) * scale * p.pow(2).mean().sqrt())


@torch.no_grad()
def project_to_clean_inputs(model: nn.Module, loader: DataLoader, energy: float = 0.999) -> None:
    """Project each conv / linear weight onto the principal span of its clean inputs."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    moments: dict[nn.Module, Tensor] = {}

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        x = args[0]
        if isinstance(module, nn.Conv2d):
            x = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
            x = x.transpose(1, 2).reshape(-1, x.shape[1])  # one row per patch
        else:
            x = x.reshape(-1, x.shape[-1])
        moments[module] = moments.get(module, 0) + x.T @ x

    handles = [m.register_forward_hook(hook) for m in layers]
    model.eval()
    try:
        for x, *_ in loader:
            model(x)
    finally:
        for h in handles:
            h.remove()
    for m in layers:
        values, vectors = torch.linalg.eigh(moments[m].double())
        values, vectors = values.flip(0), vectors.flip(1)
        kept = int((values.cumsum(0) / values.sum() < energy).sum()) + 1
        basis = vectors[:, :kept].float()
        w = m.weight.reshape(m.weight.shape[0], -1)
        m.weight.copy_((w @ basis @ basis.T).reshape(m.weight.shape))
        print(f"  {type(m).__name__} {tuple(m.weight.shape)}: kept {kept} of {len(values)}")


def reinit_both(model: nn.Module, loader: DataLoader) -> None:
    reinit_first(model, loader)
    reinit_head(model, loader)


def relearn_early(model: nn.Module, loader: DataLoader, convs: int, epochs: int = 30) -> None:
    """Re-initialise the first `convs` convolutions (with their BatchNorm and activation) and
    train them alone to reproduce, on augmented clean images, what the model's own first
    block computed (mean squared error on its output). The layers above keep their weights.
    A trigger's features that clean images never excite have nothing to be re-learnt from."""
    if not isinstance(model, nn.Sequential):
        raise TypeError("relearn_early needs an nn.Sequential model (the CNN)")
    end = [i for i, m in enumerate(model) if isinstance(m, nn.Conv2d)][convs - 1] + 1
    while end < len(model) and isinstance(model[end], (BatchNorm, nn.ReLU)):
        end += 1
    teacher = copy.deepcopy(model[:end]).eval()
    block = model[:end]  # the model's own modules: training it trains the model
    reset(block)
    shuffled = DataLoader(loader.dataset, batch_size=256, shuffle=True)
    optimizer = torch.optim.SGD(block.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(shuffled))
    block.train()
    for _ in range(epochs):
        for x, *_ in shuffled:
            x = random_crop_flip(x)
            with torch.no_grad():
                target = teacher(x)
            loss = F.mse_loss(block(x), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    print(f"  relearnt {end} modules; last feature loss {loss.item():.4f}")


def relearning(convs: int):
    return lambda model, loader: relearn_early(model, loader, convs)


def unlearning(defense: str, **settings):
    """A baseline that unlearns adversarial perturbations (a trigger's proxy), run on the
    purified model in place of the fine-tune, with its published settings otherwise."""
    def run(model: nn.Module, loader: DataLoader) -> None:
        shuffled = DataLoader(loader.dataset, batch_size=256, shuffle=True)
        result = defend(defense, model, shuffled, progress=False, **settings)
        model.load_state_dict(result.model.state_dict())
    return run


def fresh_student(model: nn.Module, loader: DataLoader, distill: bool, steps: int = 2460,
                  temperature: float = 4.0) -> None:
    """Re-initialise every layer and train the model again from scratch on the clean images, for
    TSC's whole budget (2,460 steps), crop, flip and mixup: with `distill`, to match the given
    model's own outputs (soft targets at `temperature`, no labels); otherwise on the labels
    (label smoothing 0.1), the reference of what re-training on the clean data alone gives.
    A fresh student never had a trigger's features, and clean images do not teach them."""
    teacher = copy.deepcopy(model).eval()
    reset(model.modules())
    shuffled = DataLoader(loader.dataset, batch_size=256, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    mixing = torch.distributions.Beta(1.0, 1.0)
    model.train()
    step = 0
    while step < steps:
        for x, y in shuffled:
            x = random_crop_flip(x)
            lam, order = float(mixing.sample()), torch.randperm(len(x))
            x = lam * x + (1 - lam) * x[order]
            out = model(x)
            if distill:
                with torch.no_grad():
                    target = F.softmax(teacher(x) / temperature, dim=1)
                loss = F.kl_div(F.log_softmax(out / temperature, dim=1), target,
                                reduction="batchmean") * temperature ** 2
            else:
                loss = (lam * F.cross_entropy(out, y, label_smoothing=0.1)
                        + (1 - lam) * F.cross_entropy(out, y[order], label_smoothing=0.1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step == steps:
                break
    print(f"  fresh student after {steps} steps; last loss {loss.item():.4f}")


def projection(energy: float):
    return lambda model, loader: project_to_clean_inputs(model, loader, energy)


# name → (operation on the purified model, whether TSC's last fine-tune follows)
CANDIDATES = {"as_is": (None, False), "ft15": (None, True), "reinit_head": (reinit_head, True),
              "reinit_first": (reinit_first, True), "reinit_both": (reinit_both, True),
              "noise_03": (add_noise, True),
              "relearn_1": (relearning(1), True), "relearn_3": (relearning(3), True),
              "relearn_3_alone": (relearning(3), False),
              "ibau_15": (unlearning("ibau", rounds=15), False),
              "sau_15": (unlearning("sau", epochs=15), False),
              "project_999": (projection(0.999), True),
              "project_99_alone": (projection(0.99), False),
              "project_99": (projection(0.99), True),
              "project_95_alone": (projection(0.95), False),
              "distill_fresh": (lambda m, loader: fresh_student(m, loader, distill=True), False),
              "scratch": (lambda m, loader: fresh_student(m, loader, distill=False), False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suspect")
    parser.add_argument("purified")
    parser.add_argument("floor")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--skip-references", action="store_true")
    parser.add_argument("--no-retune", action="store_true",
                        help="ACC and ASR only (no re-tune, no head-only rows)")
    parser.add_argument("--layers-up", default="",
                        help="e.g. 2,3: also re-tune the references with only their last 2, "
                             "then 3, conv / linear layers trainable")
    parser.add_argument("--out", help="the JSON record (default: PURIFIED/deepen.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    suspect, sidecar, attack = load_run(args.suspect)
    purified, _, _ = load_run(args.purified)
    floor, _, _ = load_run(args.floor)
    train = load_dataset(sidecar.dataset.name, "train", sidecar.dataset.root)
    test = load_dataset(sidecar.dataset.name, "test", sidecar.dataset.root)
    clean = train.subset(select_clean_subset(train.labels, CLEAN_FRACTION,
                                             derive_seed(args.seed, "clean")))
    ordered = DataLoader(clean.tensor_dataset(), batch_size=256)
    retune = RetuneSettings()
    rseed = derive_seed(args.seed, "retune")  # the bench's re-tune images and shuffles
    rows: dict[str, dict] = {}

    def measure(name: str, model: nn.Module, head: bool = False, layers_up: int = 0) -> None:
        began = time.perf_counter()
        tuned = (head_only(model) if head else trainable_from(model, layers_up) if layers_up
                 else model)
        metrics = evaluate(model, test, attack)
        if args.no_retune:
            rows[name] = {"acc": metrics.acc, "asr": metrics.asr}
            print(f"{name:28s} ACC {metrics.acc:6.2f} ASR {metrics.asr:6.2f}", flush=True)
            return
        profile = retune_profile(tuned, train, test, attack, retune, seed=rseed)
        rows[name] = {"acc": metrics.acc, "asr": metrics.asr, "retune_asr": profile["asr"],
                      "retune_acc": profile["acc"]}
        print(f"{name:28s} ACC {metrics.acc:6.2f} ASR {metrics.asr:6.2f}  re-tune ASR "
              + " / ".join(f"{a:5.1f}" for a in profile["asr"])
              + f"  ({time.perf_counter() - began:.0f} s)", flush=True)

    references = [("suspect", suspect), ("purified", purified), ("floor", floor)]
    if args.purified == args.suspect:  # the candidates as defenses of their own
        references = [("suspect", suspect), ("floor", floor)]
    if not args.skip_references:
        for name, model in references:
            measure(f"{name} (head-only re-tune)", model, head=True)
        for name, model in references:
            measure(name, model)
    for layers_up in [int(k) for k in args.layers_up.split(",") if k]:
        for name, model in references:
            measure(f"{name} (last {layers_up} layers re-tuned)", model, layers_up=layers_up)
    for name in [c for c in args.candidates.split(",") if c]:
        seed_everything(derive_seed(args.seed, "deepen", name))
        model = copy.deepcopy(purified)
        operation, finetune = CANDIDATES[name]
        if operation is not None:
            operation(model, ordered)
        if finetune:
            loader = DataLoader(clean.tensor_dataset(), batch_size=256, shuffle=True)
            train_classifier(model, loader, FINAL_FT, progress=False,
                             loss_fn=cross_entropy_loss(random_crop_flip, label_smoothing=0.1))
        measure(name, model.eval())
        if not args.no_retune:
            measure(f"{name} (head-only re-tune)", model, head=True)
    out = Path(args.out or Path(args.purified) / "deepen.json")
    out.write_text(json.dumps({"seed": args.seed, "suspect": args.suspect, "rows": rows},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
