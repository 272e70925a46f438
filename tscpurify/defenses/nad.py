"""NAD: Neural Attention Distillation. A fine-tuned teacher guides the backdoored student's
attention maps back to clean features.

Li, Lyu, Koren, Lyu, Li & Ma, "Neural Attention Distillation: Erasing Backdoor Triggers from
Deep Neural Networks", ICLR 2021, https://arxiv.org/abs/2101.05930.

Plan:
  1. Teacher: a copy of the backdoored model fine-tuned on the clean data (`teacher_epochs`).
  2. Stages: the outputs of the model's last len(betas) resolution stages, found from one
     forward pass (e.g. PreAct-ResNet18: layer2, layer3 and the final BN, where BackdoorBench
     taps layer3, layer4 and its 1×1 average pool, whose attention term is always zero; our
     CNN: its three stages).
  3. Student (the backdoored model itself): SGD on CE + Σ_i beta_i · AT(student_i, teacher_i),
     AT = mean squared difference of L2-normalised attention maps A(F) = mean_c |F_c|^p.

Reference: bboylyg/NAD and SCLBD/BackdoorBench `defense/nad.py`.
Differs from the reference: the attention taps are found by resolution stage for any model
rather than named per architecture, because defenses here know no architecture names.

Adapted: AT is the squared-mean form of NAD's reference code (rather than the paper's L2 norm),
so the reference's betas keep their scale; the attention is averaged over channels with |F|
(the same as F² for p = 2) so pre-activation maps are handled. Stages are found generically.

Settings (defaults): teacher_epochs 10 (BackdoorBench te_epochs), epochs 20 (the original NAD's;
BackdoorBench trains its student for te_epochs too), lr 0.01 cosine to 0 over each phase (the
original: 0.1 for two epochs, then 0.01, with Nesterov; BackdoorBench: a constant 0.01), momentum
0.9, weight decay 1e-4 (the original NAD's; BackdoorBench's optimizer takes 5e-4), betas
"500,1000,1000" and p 2.0 (NAD / BackdoorBench), crop/flip augmentation.

Example:
    >>> result = defend("nad", model, clean_loader, epochs=20)
    >>> result.details["stages"], result.details["attention"]   # per-epoch AT loss
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.augment import random_crop_flip
from ..errors import SettingsError
from ..resume import EpochCheckpoints, PhasedCheckpoints
from ..training import CLASSIFIER_STATE, TrainSettings, device_of, train_classifier
from ._common import inputs_of, stage_outputs
from .base import DefenseResult
from .budget import scale_counts
from .registered import DEFENSES


@dataclass(frozen=True)
class NADSettings:
    teacher_epochs: int = field(default=10, metadata={"help": "teacher fine-tuning epochs"})
    epochs: int = field(default=20, metadata={"help": "student (distillation) epochs"})
    lr: float = field(default=0.01, metadata={"help": "SGD learning rate, teacher and student"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=1e-4, metadata={"help": "SGD weight decay"})
    betas: str = field(default="500,1000,1000", metadata={
        "help": "attention loss weight per stage, comma-separated, for the last stages"})
    power: float = field(default=2.0, metadata={"help": "p of the attention map mean_c |F_c|^p"})
    augment: bool = field(default=True, metadata={"help": "random crop and flip"})

    def __post_init__(self) -> None:
        try:
            betas = self.beta_values()
        except ValueError:
            raise SettingsError(f"betas must be comma-separated numbers, got {self.betas!r}") \
                from None
        if not betas or min(betas) < 0 or self.power <= 0:
            raise SettingsError(f"NAD needs at least one beta ≥ 0 and p > 0; got {self.betas!r}, "
                                f"{self.power}")

    def planned_steps(self, batches_per_epoch: int) -> int:
        return (self.teacher_epochs + self.epochs) * batches_per_epoch

    def at_budget(self, steps: int, batches_per_epoch: int) -> NADSettings:
        """Teacher and student resized together, keeping their ratio (10:20 by default)."""
        counts = scale_counts({"teacher_epochs": self.teacher_epochs, "epochs": self.epochs},
                              {"teacher_epochs": batches_per_epoch,
                               "epochs": batches_per_epoch}, steps)
        return replace(self, **counts)

    def beta_values(self) -> list[float]:
        return [float(b) for b in self.betas.split(",")]


def attention(feature: Tensor, power: float) -> Tensor:
    """(N, H·W) attention maps, each of unit L2 norm."""
    return F.normalize(feature.abs().pow(power).mean(1).flatten(1), dim=1)


def attention_loss(student: Tensor, teacher: Tensor, power: float) -> Tensor:
    return (attention(student, power) - attention(teacher, power)).pow(2).mean()


class _Taps:
    """Forward hooks keeping the latest output of each named module."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        self.outputs: dict[str, Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str):
        def hook(_module: nn.Module, _args: object, output: Tensor) -> None:
            self.outputs[name] = output
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@DEFENSES.register("nad", settings=NADSettings, needs_labels=True)
def nad(model: nn.Module, clean: DataLoader, settings: NADSettings, *, seed: int,
        progress: bool, callbacks: dict) -> DefenseResult:
    began = time.perf_counter()
    teacher = copy.deepcopy(model)
    train = TrainSettings(epochs=settings.teacher_epochs, lr=settings.lr,
                          momentum=settings.momentum, weight_decay=settings.weight_decay,
                          augment=settings.augment, batch_size=clean.batch_size or 1)
    # A run cut short resumes after its last saved epoch (resume.py), counted over both phases:
    # the teacher's fine-tune, then the student's distillation.
    run = PhasedCheckpoints(EpochCheckpoints.from_callbacks(callbacks, "nad", settings),
                            {"teacher": (settings.teacher_epochs, CLASSIFIER_STATE),
                             "student": (settings.epochs, CLASSIFIER_STATE)})
    teacher_losses = train_classifier(teacher, clean, train, progress=progress, desc="teacher",
                                      checkpoints=run.phase("teacher"))
    seconds = {"teacher": time.perf_counter() - began}

    betas = settings.beta_values()
    stages = stage_outputs(model, inputs_of(next(iter(clean)))[:2])
    if len(stages) < len(betas):
        raise SettingsError(f"{len(betas)} betas but the model has only {len(stages)} stages "
                            f"({[s.name for s in stages]}); pass fewer betas")
    names = [s.name for s in stages[-len(betas):]]
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, settings.epochs * len(clean)))
    # Resumed after the batch read above: its shuffle is then in the restored generators.
    student = run.phase("student")
    stateful = dict(zip(CLASSIFIER_STATE, (model, optimizer, scheduler), strict=True))
    done, saved = student.resume(stateful)
    history: list[dict[str, float]] = list(saved.get("history", []))

    # Distil: CE on the clean labels plus the attention term against the frozen teacher.
    began = time.perf_counter()
    device = device_of(model)
    student_taps, teacher_taps = _Taps(model, names), _Taps(teacher, names)
    teacher.eval()
    try:
        for epoch in tqdm(range(done, settings.epochs), desc="nad", disable=not progress,
                          leave=False, initial=done, total=settings.epochs):
            model.train()
            sums, count = torch.zeros(2), 0
            for x, y, *_ in clean:
                x, y = x.to(device), y.to(device)
                if settings.augment:
                    x = random_crop_flip(x)
                with torch.no_grad():
                    teacher(x)
                ce = F.cross_entropy(model(x), y)
                at = sum(beta * attention_loss(student_taps.outputs[n],
                                               teacher_taps.outputs[n], settings.power)
                         for beta, n in zip(betas, names, strict=True))
                optimizer.zero_grad(set_to_none=True)
                (ce + at).backward()
                optimizer.step()
                scheduler.step()
                sums += torch.tensor([ce.item(), float(at.detach())]) * len(y)
                count += len(y)
            history.append({"ce": float(sums[0]) / count, "attention": float(sums[1]) / count})
            student.save(epoch + 1, stateful, {"history": history},
                         final=epoch + 1 == settings.epochs)
    finally:
        student_taps.remove()
        teacher_taps.remove()
    seconds["distill"] = time.perf_counter() - began
    details = {"stages": names, "betas": betas, "teacher": teacher.eval(),
               "teacher_losses": teacher_losses, "history": history}
    steps = (settings.teacher_epochs + settings.epochs) * len(clean)
    return DefenseResult(model, details, {**seconds, **run.seconds()}, steps=steps)
