"""TSC: Two-stage Symmetry Connectivity.

Peng, Yang, Zhao, Dong, He, Zhang & He, "Circumventing Backdoor Space via Weight Symmetry",
ICML 2025, https://arxiv.org/abs/2506.07467. Reference code: github.com/JiePeng104/TSC.
Differs from the reference: the default's four settings in the README's table (fresh control
point, curve lr 0.1 over 30 epochs, 5-epoch fine-tunes at 0.01, a label-smoothed last
fine-tune), because the reference's literal settings left the backdoor in place here; the
"paper" preset holds the reference's. `permutation` ("random", "identity") is our ablation.

Plan, per round r (θ_0 = the suspect model):
  1. Stage 1, loss amplification: un-align a copy of θ_r against θ_r itself (each hidden unit
     swapped with its least correlated sibling: same function, far-away weights), train a
     quadratic Bezier curve between θ_r (t=0) and the copy (t=1) on clean data, take the point
     at t, re-estimate BatchNorm statistics → θ_1.
  2. Stage 2, recovery: permute θ_r to align with θ_1, train a curve from the aligned θ_r
     (t=0) to θ_1 (t=1), take the point at `t2` (the paper: t) → θ_{r+1}.
  3. Between rounds, optionally fine-tune θ_{r+1} briefly on the clean data; after the last
     round, a longer one with label-smoothed cross-entropy (an addition to the paper that wins
     back accuracy; see TSCSettings.final_ft_label_smoothing and .distill).
The curve's loss is any callable (cross-entropy with labels, or a self-supervised loss), so
the defense needs labels only if its loss does. Nothing here reads the trigger, poisoned
data or ASR: `evaluate` callbacks are only called and recorded, never consulted.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from .. import distributed as dist
from ..curve import (
    BezierCurve,
    CurveSettings,
    cross_entropy_loss,
    fresh_control_point,
    recompute_bn_stats,
    train_curve,
)
from ..curve.profile import default_ts
from ..curve.train import LossFn, distillation_loss, path_aware_loss
from ..data.augment import random_crop_flip
from ..errors import CheckpointError, DataError, SettingsError, SpecError
from ..outputs import write_atomic
from ..permutation import (
    PermutationSpec,
    apply_permutation,
    derive_spec,
    match,
    random_permutation,
    verify_spec,
)
from ..report.schema import PurifyReport, StageRecord
from ..seeding import derive_seed, seed_everything
from ..settings import replace_settings, validate_settings
from ..training import TrainSettings, device_of, train_classifier
from ..version import __version__
from .base import DefenseResult
from .budget import scale_counts
from .registered import DEFENSES

log = logging.getLogger(__name__)
Evaluate = Callable[[nn.Module], dict[str, float]]
PERMUTATIONS = ("unalign", "random", "identity")
LOW_COVERAGE = 0.5  # below this share of weights permuted, purify warns


# TSC's curves at a CPU budget: 30 epochs a curve (paper: 200) at learning rate 0.1 (paper:
# 0.02), annealed to zero over the curve (paper: T_max 100 of 200 epochs, climbing back after).
# Momentum, weight decay and the L2 regulariser keep the paper's values.
TSC_CURVE = CurveSettings(epochs=30, lr=0.1, cosine_t_max=None)


@dataclass(frozen=True)
class TSCSettings:
    """TSC's knobs. The defaults are the "default" preset, which works at a CPU budget; the
    "paper" preset holds the reference implementation's values. Every default was fixed on
    tuning models (never on benchmark cells) and none is chosen at run time from anything but
    clean data."""

    rounds: int = field(default=3, metadata={"help": "number of two-stage rounds (paper: 3)"})
    t: float = field(default=0.4, metadata={
        "help": "where on the stage-1 curve the point is taken (paper: 0.4)"})
    t2: float | None = field(default=None, metadata={
        "help": "where on the stage-2 curve the point is taken; None = same as t (paper)"})
    curve: CurveSettings = field(default_factory=lambda: TSC_CURVE, metadata={
        "help": "the curves' training (curve.train.CurveSettings, whose defaults are the "
                "paper's); a curve field may also be named alone, e.g. epochs=60"})
    mid_init: str = field(default="random", metadata={
        "help": "control point init: 'random' = a fresh initialisation of the architecture, "
                "'linear' = (start+end)/2 (paper)"})
    mid_init2: str | None = field(default=None, metadata={
        "help": "stage-2 control point init: None = as mid_init, 'random', 'linear', or 'end' "
                "= the stage-1 point (the stage-2 curve's clean end). 'end' kept about 0.4 "
                "points more accuracy on tuning models, but the curves removed less of the "
                "backdoor and left the rest to the last fine-tune (docs/tuning.md, fourth look)"})
    ft_epochs: int = field(default=5, metadata={
        "help": "clean fine-tuning epochs after each round but the last (paper: 10)"})
    ft_lr: float = field(default=0.01, metadata={
        "help": "learning rate of those fine-tunes (paper: 1e-4)"})
    final_ft_epochs: int = field(default=15, metadata={
        "help": "clean fine-tuning epochs after the last round, 0 = none (paper: none)"})
    final_ft_lr: float = field(default=0.03, metadata={
        "help": "learning rate of the fine-tune after the last round"})
    distill: float = field(default=0.0, metadata={
        "help": "weight of distillation from the suspect model in the fine-tune after the last "
                "round, the rest being the task loss (0 = none; paper: none). Used with the "
                "default cross-entropy loss only. It wins accuracy but can let the backdoor back "
                "in: at 0.25 a Blended tuning model went from 3.0% to 7.3% ASR (docs/tuning.md)"})
    distill_temperature: float = field(default=2.0, metadata={
        "help": "softmax temperature of that distillation"})
    final_ft_label_smoothing: float = field(default=0.1, metadata={
        "help": "label smoothing of the cross-entropy in the fine-tune after the last round "
                "(0 = none; paper: no fine-tune). Used with the default cross-entropy loss only. "
                "On tuning models it kept a Blended backdoor from waking up, which plain and "
                "distilling fine-tunes did not always (docs/tuning.md)"})
    batch_size: int | None = field(default=256, metadata={
        "help": "clean-data batch size of the curves and fine-tunes; the clean loader is "
                "re-batched to it (None = the loader's own batches; paper: 256). 64 kept about "
                "0.8 points more accuracy on tuning models, but a benchmark cell's backdoor "
                "survived it at 25% ASR (docs/tuning.md, sixth look). A custom loss_fn keeps "
                "the loader's batches"})
    profile_points: int = field(default=11, metadata={
        "help": "points along each curve at which metrics are recorded (0 = none)"})
    final_ft_path_aware: float = field(default=0.0, metadata={
        "help": "rho of a path-aware last fine-tune (curve.path_aware_loss): the loss is taken "
                "a fraction rho of the way towards the suspect model, aligned to the point, "
                "which pushes the result away from it, in the spirit of PAM (Min et al., "
                "NeurIPS 2024). 0 = off; a lever of the deep-purification study"})
    permutation: str = field(default="unalign", metadata={
        "help": "the symmetry ablation: 'unalign' = stage 1 permutes each unit to its least "
                "correlated sibling (the paper); 'random' = a seeded random permutation in "
                "stage 1; 'identity' = no permutation in either stage (TSC's recipe without the "
                "symmetry: MCR with TSC's settings). Stage 2 aligns unless 'identity'"})

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise SettingsError(f"TSC needs at least one round, got {self.rounds}")
        for name in ("t", "t2"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise SettingsError(f"{name} must lie in [0, 1], got {value}")
        if self.mid_init not in ("random", "linear"):
            raise SettingsError(f"mid_init must be 'random' or 'linear', got {self.mid_init!r}")
        if self.mid_init2 not in (None, "random", "linear", "end"):
            raise SettingsError(f"mid_init2 must be None, 'random', 'linear' or 'end', got "
                                f"{self.mid_init2!r}")
        if min(self.ft_epochs, self.final_ft_epochs) < 0 or min(self.ft_lr,
                                                                self.final_ft_lr) <= 0:
            raise SettingsError(f"fine-tuning needs epochs ≥ 0 and lr > 0; got ft_epochs "
                                f"{self.ft_epochs}, final_ft_epochs {self.final_ft_epochs}, "
                                f"ft_lr {self.ft_lr}, final_ft_lr {self.final_ft_lr}")
        if not 0 <= self.final_ft_label_smoothing < 1:
            raise SettingsError(f"final_ft_label_smoothing must lie in [0, 1), got "
                                f"{self.final_ft_label_smoothing}")
        if not 0 <= self.distill <= 1 or self.distill_temperature <= 0:
            raise SettingsError(f"distill must lie in [0, 1] and distill_temperature be > 0; "
                                f"got {self.distill} and {self.distill_temperature}")
        if self.batch_size is not None and self.batch_size < 2:
            raise SettingsError(f"batch_size must be at least 2 (BatchNorm trains on batch "
                                f"statistics) or None, got {self.batch_size}")
        if self.profile_points == 1:
            raise SettingsError("profile_points must be 0 (off) or at least 2")
        if self.permutation not in PERMUTATIONS:
            raise SettingsError(f"permutation must be one of {', '.join(PERMUTATIONS)}, got "
                                f"{self.permutation!r}")
        if not 0 <= self.final_ft_path_aware < 1:
            raise SettingsError(f"final_ft_path_aware must lie in [0, 1), got "
                                f"{self.final_ft_path_aware}")
        if self.profile_points < 0:
            raise SettingsError(f"profile_points must be ≥ 0, got {self.profile_points}")
        if not isinstance(self.curve, CurveSettings):
            raise SettingsError(f"curve must be CurveSettings, got {self.curve!r}")

    def planned_steps(self, batches_per_epoch: int) -> int:
        """Curve steps (two curves a round) plus the fine-tunes, at `batches_per_epoch`
        batches of this setting's own batch size."""
        epochs = (2 * self.rounds * self.curve.epochs + (self.rounds - 1) * self.ft_epochs
                  + self.final_ft_epochs)
        return epochs * batches_per_epoch

    def at_budget(self, steps: int, batches_per_epoch: int) -> TSCSettings:
        """Curves and fine-tunes resized together, keeping their ratio; a cosine T_max shorter
        than the curves (the paper's 100 of 200) keeps its share of them."""
        counts = scale_counts(
            {"epochs": self.curve.epochs, "ft_epochs": self.ft_epochs,
             "final_ft_epochs": self.final_ft_epochs},
            {"epochs": 2 * self.rounds * batches_per_epoch,
             "ft_epochs": (self.rounds - 1) * batches_per_epoch,
             "final_ft_epochs": batches_per_epoch}, steps)
        t_max = self.curve.cosine_t_max
        if t_max is not None and self.curve.epochs > 0:
            t_max = max(1, round(t_max * counts["epochs"] / self.curve.epochs))
        curve = replace(self.curve, epochs=counts.pop("epochs"), cosine_t_max=t_max)
        return replace(self, **counts, curve=curve)

    def loader_batch_size(self) -> int:
        """The batch size to build a clean loader at: `batch_size`, or the reference's 256 for
        settings that keep the loader's own batches (the SimCLR loss's)."""
        return self.batch_size or 256


PRESETS: dict[str, TSCSettings] = {
    # The reference implementation's CIFAR-10 example, literally: on Fashion-MNIST its stage 2
    # brings the backdoor back, at 20 curve epochs and at these 200 alike (about 30 minutes on
    # the small CNN, ASR 75-98% after; docs/tuning.md, ninth look).
    "paper": TSCSettings(rounds=3, curve=CurveSettings(), mid_init="linear", ft_epochs=10,
                         ft_lr=1e-4, final_ft_epochs=0, distill=0.0,
                         final_ft_label_smoothing=0.0, batch_size=256),
    # What works at a CPU budget (chosen on tuning models, see docs/tuning.md): a freshly
    # initialised control point, a larger curve learning rate annealed to zero, the paper's
    # three rounds with a short clean fine-tune after each, and after the last a longer one
    # with label smoothing, to win back accuracy without waking the backdoor.
    # Two rounds of 45 epochs (the same curve steps) keep more accuracy on the small CNN but
    # left a PreAct-ResNet18's Blended backdoor at 10-18% (docs/tuning.md, third look).
    "default": TSCSettings(),
    # Self-supervised encoders and CLIP: the setting their results were measured with (the
    # SimCLR point t = 0.25 of the reference's SSL example, two rounds, a plain 5-epoch
    # fine-tune after each round, 30-epoch curves, the loader's batches of 256). The classifier
    # default's third round and smoothed fine-tune were tuned on classifiers and have not been
    # measured on encoders.
    "ssl": TSCSettings(rounds=2, t=0.25, final_ft_epochs=5, final_ft_lr=0.01,
                       distill=0.0, final_ft_label_smoothing=0.0, batch_size=None),
}


def rebatched(loader: DataLoader, batch_size: int | None) -> DataLoader:
    """`loader` with shuffled batches of `batch_size` over the same data (None: as it is).
    The global RNG shuffles, as in a loader without a generator, so seeding reproduces it."""
    if isinstance(loader.dataset, IterableDataset):
        raise DataError("the clean loader streams an iterable data set; TSC re-batches its clean "
                        "data and counts its batches, so it needs a map-style one (e.g. a "
                        "TensorDataset of the clean images)")
    if batch_size is None or loader.batch_size == batch_size:
        return loader
    log.info("clean loader re-batched from %s to %d (TSCSettings.batch_size)",
             loader.batch_size, batch_size)
    return DataLoader(loader.dataset, batch_size=batch_size, shuffle=True,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last)


def example_batch(loader: DataLoader) -> torch.Tensor:
    batch = next(iter(loader))
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def check_inputs(model: nn.Module, clean: DataLoader, loss_fn: LossFn | None) -> None:
    """What would otherwise fail deep inside a run, or silently: checked on the first batch.

    Frozen parameters are refused: every parameter lies on TSC's curves, so a frozen one would
    be moved anyway (or, if skipped, leave the permuted copy inconsistent)."""
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        raise SettingsError(f"TSC moves every parameter along its curves, and {len(frozen)} "
                            f"are frozen (requires_grad=False: {', '.join(frozen[:3])}"
                            f"{', ...' if len(frozen) > 3 else ''}); unfreeze them to purify")
    try:
        batch = next(iter(clean))
    except StopIteration:
        raise DataError("the clean data loader gave no batches") from None
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(f"clean batches must start with a float image tensor, got {got}")
    if not bool(torch.isfinite(images).all()):
        raise DataError("the clean images hold NaN or infinite values")
    norms = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if norms and len(images) < 2:
        raise DataError("the clean loader gives batches of one image, and the model has "
                        "BatchNorm layers, which train on batch statistics: use batches of 2 or "
                        "more")
    probe = copy.deepcopy(model).eval()
    with torch.no_grad():
        device = device_of(probe)
        if loss_fn is not None:
            value = loss_fn(probe, batch)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else \
                    type(value).__name__
                raise DataError(f"loss_fn must return a scalar tensor, got {shape}")
            return
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DataError("the clean loader yields bare images: pass a label-free loss_fn "
                            "(e.g. a SimCLR loss) or a loader of (images, labels)")
        output = probe(images[:2].to(device))
        if not isinstance(output, torch.Tensor) or output.dim() != 2:
            what = type(output).__name__ if not isinstance(output, torch.Tensor) else \
                f"a tensor of shape {tuple(output.shape)}"
            raise DataError(f"with the default cross-entropy loss the model must return (N, "
                            f"classes) scores, but it returns {what}; wrap the model, or pass "
                            f"a loss_fn")
        labels = batch[1]
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() \
                or labels.is_complex() or labels.dtype == torch.bool:
            raise DataError(f"labels must be an integer tensor of class indices, got "
                            f"{getattr(labels, 'dtype', type(labels).__name__)}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= output.shape[1]):
            raise DataError(f"labels must lie in [0, {output.shape[1] - 1}] (the model's "
                            f"classes), got values from {int(labels.min())} to "
                            f"{int(labels.max())}")


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """Stop with the stage's name rather than carry NaN weights into the next stage."""
    bad = [k for k, v in state.items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise DataError(f"{where} produced NaN or infinite weights ({bad[0]}, ...): the "
                        f"training diverged; lower the learning rate")


@torch.no_grad()
def mean_loss(model: nn.Module, loader: DataLoader, loss_fn: LossFn,
              distributed: bool = False) -> float:
    """The curve's own objective at a point, on the clean data: the defender's one gauge.
    `distributed`: the mean over every process's shard batches (over equal shards, the union
    batches' mean)."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        total += float(loss_fn(model, batch))
        count += 1
    if distributed and dist.active():
        sums = dist.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64,
                                                device=device_of(model)))
        total, count = float(sums[0]), int(sums[1])
    return total / max(count, 1)


class _Stages:
    """Runs and records the stages of one purification; saves each finished stage."""

    def __init__(self, template: nn.Module, clean: DataLoader, settings: TSCSettings,
                 loss_fn: LossFn, evaluate: Evaluate | None, seed: int, progress: bool,
                 resume_dir: Path | None, spec: PermutationSpec | None,
                 resume_identity: dict[str, Any] | None = None,
                 leaf_modules: tuple = (), distributed: bool = False) -> None:
        self.template, self.clean, self.settings = template, clean, settings
        # One of several processes, each with its shard of `clean` (tscpurify.distributed):
        # every step's statistics are the union's, rank 0 alone evaluates, reads and writes.
        self.distributed = distributed
        self.main = dist.is_main() if distributed else True
        self.loss_fn, self.evaluate, self.seed, self.progress = loss_fn, evaluate, seed, progress
        self.resume_dir = resume_dir
        self.resume_identity = dict(resume_identity or {})
        if distributed:  # other shards make other curves: never resumed across process counts
            self.resume_identity["processes"] = dist.world_size()
        # "report": the report's before/after measurements, taken once "total" is known; every
        # other phase lies within "total" (the bench subtracts "caller_evaluation" from it).
        self.seconds = {"permutation": 0.0, "curve": 0.0, "batchnorm": 0.0, "finetune": 0.0,
                        "evaluation": 0.0, "caller_evaluation": 0.0, "profile": 0.0,
                        "report": 0.0}
        self.resumed: list[StageRecord] = []  # stages loaded from resume_dir, not run here
        self.overall: tqdm | None = None  # the whole run's bar, in steps (run())
        self.batches: int | None = None  # clean batches a pass, when the loader has a length
        example = example_batch(clean)[:4].to(device_of(template))
        self.spec = (spec if spec is not None
                     else derive_spec(template, example, leaf_modules=leaf_modules))
        # Derived or hand-written, a spec is trusted only once it provably keeps the function.
        verify_spec(template, self.spec, example, generator=torch.Generator().manual_seed(seed))
        if not self.spec.groups and settings.permutation != "identity":
            # Without groups TSC silently becomes its identity ablation: say so instead.
            raise SpecError(f"the permutation spec of {type(template).__name__} has no groups, "
                            f"so TSC would permute nothing; pass a spec that permutes its hidden "
                            f"units, or permutation='identity' to run the recipe without one")
        self.coverage = self.spec.coverage(template.state_dict())
        if self.coverage < LOW_COVERAGE and settings.permutation != "identity":
            warnings.warn(f"the permutation spec of {type(template).__name__} moves only "
                          f"{100 * self.coverage:.0f}% of its weights (the rest stay where they "
                          f"are, e.g. inside leaf_modules or after ops it cannot follow): TSC's "
                          f"far end lies close to the model, which weakens the purification",
                          UserWarning, stacklevel=4)
        if resume_dir is not None:
            self.on_main(self.check_resume_dir)

    def model_from(self, state: dict[str, torch.Tensor]) -> nn.Module:
        model = self._copy_template()
        model.load_state_dict(state)
        return model.eval()

    def on_main(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function` on rank 0 alone, its result (or its refusal) passed to every process."""
        return dist.on_main(function, *args) if self.distributed else function(*args)

    def seed_process(self, *parts: Any) -> None:
        """Distributed: every rank but 0 re-seeds the global RNG apart, so that the processes'
        augmentations of their shards are independent draws. Whatever all processes must
        draw alike (t, the control point, permutations, shuffles) has its own seeded
        generator."""
        if self.distributed and dist.rank() > 0:
            seed_everything(derive_seed(self.seed, *parts, "rank", dist.rank()))

    def _copy_template(self) -> nn.Module:
        return copy.deepcopy(self.template)

    def timed(self, phase: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            self.seconds[phase] += time.perf_counter() - began

    def measure(self, model: nn.Module, phase: str = "evaluation") -> dict[str, float]:
        """Clean loss (the defender's own) plus whatever the caller's evaluator reports."""
        metrics = {"loss": self.timed(phase, mean_loss, model, self.clean, self.loss_fn,
                                      self.distributed)}
        if self.evaluate is not None and self.main:  # distributed: rank 0 evaluates
            # The caller's evaluation must not change the run: its random draws are undone
            # and its time is booked apart ("caller_evaluation"), so that a run with an
            # evaluator ends with the same weights as one without (a bench row that records
            # its stages stays comparable with one that does not).
            device = device_of(model)
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda"
                                       else []):
                metrics.update(self.timed("caller_evaluation" if phase == "evaluation" else phase,
                                          self.evaluate, model))
        return metrics

    def since(self, before: dict[str, float]) -> dict[str, float]:
        """Seconds per phase spent since `before` (a copy of self.seconds)."""
        return {k: self.seconds[k] - before.get(k, 0.0) for k in self.seconds}

    def advance(self, epochs: int) -> None:
        """Move the whole run's bar on by `epochs` passes over the clean data."""
        if self.overall is not None and self.batches is not None:
            self.overall.update(epochs * self.batches)

    def stage_epochs(self, round_: int, stage: int) -> int:
        """Passes over the clean data a stage takes: its curve, and stage 2's fine-tune."""
        if stage == 1:
            return self.settings.curve.epochs
        last = round_ == self.settings.rounds - 1
        return self.settings.curve.epochs + (self.settings.final_ft_epochs if last
                                             else self.settings.ft_epochs)

    def where(self, round_: int) -> str:
        """The progress bars' label: a run is six or more bars, and each says which it is."""
        return f"TSC round {round_ + 1}/{self.settings.rounds}"

    def connect(self, start: dict, end: dict, t: float, round_: int, stage: int,
                began: dict[str, float] | None = None
                ) -> tuple[dict[str, torch.Tensor], StageRecord]:
        """Train a curve from `start` to `end`, take the point at t, re-estimate BatchNorm."""
        # The stage's seconds count from `began`, so its permutation search is booked too.
        seconds_before = dict(self.seconds) if began is None else began
        curve = BezierCurve(self._copy_template(), start, end,
                            self.initial_mid(round_, stage, end))
        self.seed_process(round_, stage, "curve")  # a fresh control point seeds the global RNG
        generator = torch.Generator().manual_seed(derive_seed(self.seed, round_, stage, "t"))
        self.timed("curve", train_curve, curve, self.clean, self.loss_fn, self.settings.curve,
                   progress=self.progress, generator=generator, distributed=self.distributed,
                   desc=f"{self.where(round_)} · stage {stage} curve",
                   callbacks=[lambda epoch, entry: self.advance(1)])
        point = curve.point(t)
        self.timed("batchnorm", recompute_bn_stats, point, self.clean,
                   distributed=self.distributed)
        check_finite(point.state_dict(), f"round {round_}, stage {stage}'s curve")
        metrics = self.measure(point)
        # The profile is for people reading the report; its cost is booked apart ("profile").
        profile = [{"t": t, **metrics}] if self.settings.profile_points else []
        for value in default_ts(self.settings.profile_points) if profile else ():
            if value != t:
                other = curve.point(value)
                self.timed("profile", recompute_bn_stats, other, self.clean,
                           distributed=self.distributed)
                profile.append({"t": value, **self.measure(other, phase="profile")})
        profile.sort(key=lambda row: row["t"])
        record = StageRecord(round_, stage, t, metrics, profile, self.since(seconds_before))
        state = {k: v.detach().clone() for k, v in point.state_dict().items()}
        return state, record

    def initial_mid(self, round_: int, stage: int, end: dict
                    ) -> dict[str, torch.Tensor] | None:
        how = self.settings.mid_init
        if stage == 2 and self.settings.mid_init2 is not None:
            how = self.settings.mid_init2
        if how == "linear":
            return None
        if how == "end":  # BezierCurve copies what it is given, so no clone here
            return {k: end[k] for k, _ in self.template.named_parameters()}
        return fresh_control_point(self.template, derive_seed(self.seed, round_, stage, "mid"))

    # --- resume -----------------------------------------------------------------------------
    def _paths(self, round_: int, stage: int) -> tuple[Path, Path]:
        return stage_files(self.resume_dir, round_, stage)

    def resume_key(self) -> dict[str, Any]:
        """What the saved stages depend on: every setting but the profiles, the seed, and the
        clean loader's size and batch size (another clean set or batch makes other curves)."""
        # The curve's knobs by their own names (no curve field shares one), as stages saved
        # before CurveSettings was nested in TSCSettings recorded them.
        settings = asdict(self.settings)
        key = {k: v for k, v in {**settings.pop("curve"), **settings}.items()
               if k != "profile_points"}
        dataset = getattr(self.clean, "dataset", None)
        images = len(dataset) if hasattr(dataset, "__len__") else None
        return {**key, "seed": self.seed, "clean_images": images,
                "batch_size": self.clean.batch_size, **self.resume_identity}

    def check_resume_dir(self) -> None:
        """Refuse stages saved by a run with other settings: resuming them would silently mix
        two configurations into one result."""
        path = self.resume_dir / "settings.json"
        if not path.exists():
            return
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path} is corrupt ({err}); start over without resuming, or "
                                  f"delete {self.resume_dir}") from None
        wanted = self.resume_key()
        # A settings key the saved record lacks was not recorded yet when it was made: not
        # compared. The identity of the model, data and environment always is.
        changed = sorted(k for k in saved.keys() | wanted.keys()
                         if (k in saved or k in self.resume_identity)
                         and saved.get(k) != wanted.get(k))
        if changed:
            raise SettingsError(
                f"the finished stages in {self.resume_dir} were made from another model, data "
                f"or settings ("
                + ", ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} now"
                            for k in changed)
                + "); resume with the same settings, or start over without resuming")

    def load_finished(self, round_: int, stage: int) -> tuple[dict, StageRecord] | None:
        if self.resume_dir is None:
            return None
        try:
            loaded = finished_stage(self.resume_dir, round_, stage)
        except CheckpointError as err:
            raise CheckpointError(f"{err}; start over without resuming") from None
        if loaded is None:
            return None
        state, finished = loaded
        weights, _ = self._paths(round_, stage)
        expected = self.template.state_dict()
        if set(state) != set(expected) or any(state[k].shape != v.shape
                                               for k, v in expected.items()):
            raise CheckpointError(f"the saved stage {weights.name} in {self.resume_dir} does "
                                  f"not fit this model; start over without resuming")
        return state, finished

    def save_finished(self, round_: int, stage: int, state: dict, record: StageRecord) -> None:
        if self.resume_dir is None:
            return
        self.resume_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.resume_dir / "settings.json", json.dumps(self.resume_key()))
        weights, record_path = self._paths(round_, stage)
        save_file({k: v.cpu().contiguous() for k, v in state.items()}, str(weights) + ".tmp")
        Path(str(weights) + ".tmp").rename(weights)
        # The record is written last and whole: it marks the stage done.
        write_atomic(record_path, json.dumps(asdict(record)))

    # --- the algorithm -----------------------------------------------------------------------
    def stage_one(self, current: dict, round_: int) -> tuple[dict, StageRecord]:
        began = dict(self.seconds)
        how = self.settings.permutation
        if how == "identity":  # the ablation: the curve's far end is the model itself
            far_copy = current
        else:
            if how == "random":
                generator = torch.Generator().manual_seed(derive_seed(self.seed, round_, "perm"))
                perm = random_permutation(self.spec, generator)
            else:
                model = self.model_from(current)
                perm = self.timed("permutation", match, model, model, self.spec, self.clean,
                                  mode="unalign", distributed=self.distributed)
            far_copy = apply_permutation(current, self.spec, perm)
        return self.connect(current, far_copy, self.settings.t, round_, 1, began)

    def stage_two(self, current: dict, theta_1: dict, round_: int) -> tuple[dict, StageRecord]:
        began = dict(self.seconds)
        aligned = current
        if self.settings.permutation != "identity":
            perm = self.timed("permutation", match, self.model_from(theta_1),
                              self.model_from(current), self.spec, self.clean, mode="align",
                              distributed=self.distributed)
            aligned = apply_permutation(current, self.spec, perm)
        t2 = self.settings.t if self.settings.t2 is None else self.settings.t2
        state, record = self.connect(aligned, theta_1, t2, round_, 2, began)
        settings, last = self.settings, round_ == self.settings.rounds - 1
        epochs, lr = ((settings.final_ft_epochs, settings.final_ft_lr) if last
                      else (settings.ft_epochs, settings.ft_lr))
        if epochs > 0:
            model = self.model_from(state)
            ft = TrainSettings(epochs=epochs, lr=lr, batch_size=self.clean.batch_size or 1,
                               bf16=self.settings.curve.bf16)  # the curves' precision too
            # The curve's own objective, so a label-free purification stays label-free; the
            # last fine-tune's extras (distillation, label smoothing) exist for cross-entropy
            # only, and purify() switches them off for a custom loss.
            loss_fn = self.loss_fn
            if last and settings.distill > 0:
                loss_fn = distillation_loss(self.template, random_crop_flip,
                                            weight=settings.distill,
                                            temperature=settings.distill_temperature,
                                            label_smoothing=settings.final_ft_label_smoothing)
            elif last and settings.final_ft_label_smoothing > 0:
                loss_fn = cross_entropy_loss(random_crop_flip,
                                             label_smoothing=settings.final_ft_label_smoothing)
            if last and settings.final_ft_path_aware > 0:
                # The suspect model, its units aligned to this point, is the anchor the
                # fine-tune is pushed away from (curve.path_aware_loss).
                perm = self.timed("permutation", match, model, self.template, self.spec,
                                  self.clean, mode="align", distributed=self.distributed)
                anchor = apply_permutation(self.template.state_dict(), self.spec, perm)
                loss_fn = path_aware_loss(loss_fn, anchor, settings.final_ft_path_aware)
            self.timed("finetune", train_classifier, model, self.clean, ft,
                       progress=self.progress, loss_fn=loss_fn,
                       desc=f"{self.where(round_)} · {'last ' if last else ''}fine-tune",
                       distributed=self.distributed,
                       callbacks=[lambda epoch, model: self.advance(1)])
            if last and settings.final_ft_path_aware > 0:
                # Its batches were normalised at the shifted point: statistics for this one.
                self.timed("batchnorm", recompute_bn_stats, model, self.clean,
                           distributed=self.distributed)
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            check_finite(state, f"round {round_}'s fine-tune")
            record = replace(record, finetuned=self.measure(model.eval()),
                             seconds=self.since(began))
        return state, record

    def run(self, start: dict) -> tuple[dict, list[StageRecord]]:
        # The whole run in one bar, with its time left: each stage's own bar shows only its part.
        try:
            self.batches = len(self.clean)
        except TypeError:  # a loader without a length (an IterableDataset's): no whole-run bar
            return self._run(start)
        self.overall = tqdm(total=self.settings.planned_steps(self.batches), desc="TSC",
                            unit="step", disable=not self.progress or not self.main)
        try:
            return self._run(start)
        finally:
            self.overall.close()
            self.overall = None

    def _run(self, start: dict) -> tuple[dict, list[StageRecord]]:
        current, records = start, []
        for round_ in range(self.settings.rounds):
            theta_1 = None
            for stage in (1, 2):
                finished = self.on_main(self.load_finished, round_, stage)
                if finished is None:
                    seed_everything(derive_seed(self.seed, round_, stage))
                    self.seed_process(round_, stage)
                    dist.reseed_shards(self.clean, derive_seed(self.seed, round_, stage, "shards"))
                    if stage == 1:
                        state, record = self.stage_one(current, round_)
                    else:
                        state, record = self.stage_two(current, theta_1, round_)
                    if self.distributed:  # every process goes on from rank 0's very weights
                        state = dist.broadcast_state(state)
                    self.on_main(self.save_finished, round_, stage, state, record)
                else:
                    state, record = finished
                    self.resumed.append(record)
                    self.advance(self.stage_epochs(round_, stage))
                    log.info("resumed round %d stage %d from %s", round_ + 1, stage,
                             self.resume_dir)
                records.append(record)
                if stage == 1:
                    theta_1 = state
                else:
                    current = state
        return current, records


def purify(model: nn.Module, clean: DataLoader, settings: TSCSettings | None = None, *,
           loss_fn: LossFn | None = None, evaluate: Evaluate | None = None, seed: int = 0,
           progress: bool = True, resume_dir: str | Path | None = None,
           spec: PermutationSpec | None = None, resume_identity: dict[str, Any] | None = None,
           leaf_modules: tuple = (), distributed: bool = False,
           **overrides: Any) -> tuple[nn.Module, PurifyReport]:
    """Purify `model` with TSC on the clean data in `clean`; the input model is not modified.

    Args:
        model: the suspect model; any nn.Module whose symmetry `derive_spec` can trace.
        clean: loader of clean data: (images, labels) batches, or bare images with `loss_fn`.
        settings: TSCSettings (default: TSCSettings()); `overrides` replace single fields. Its
            `batch_size` (256) re-batches `clean`; set it to None to keep your loader's batches.
        loss_fn: the curve objective `loss_fn(model_fn, batch)`; default cross-entropy with
            random crop/flip augmentation (needs labels). A custom one keeps the loader's
            batches and a plain last fine-tune (those defaults were tuned on cross-entropy).
        evaluate: optional `evaluate(model) -> metrics` recorded along the curves (e.g. ACC and
            ASR on test data); only called and recorded, never used for any decision.
        resume_dir: where finished stages are saved; an interrupted run with the same folder
            and seed continues from the last finished stage and ends with the same result.
        resume_identity: what else the saved stages must match to be resumed (e.g. the input
            weights' digest, the clean indices, torch version, thread count); any mismatch is
            refused.
        spec: a hand-written PermutationSpec for models torch.fx cannot trace (default:
            derived from the model); either way it is verified before use, and one with no
            groups is refused (TSC would permute nothing).
        leaf_modules: module types or paths the derived spec keeps opaque (`derive_spec`).
        distributed: run as one of the processes of a launched job (torchrun, or a process
            group you initialised; docs/scaling.md): every process calls purify alike; the
            clean data is sharded, its global batch (`batch_size`, or your loader's) split
            evenly over the processes; gradients and statistics are all-reduced; `evaluate`
            runs on rank 0 only, rank 0 alone reads and writes `resume_dir`, and every process
            returns the same weights and rank 0's report.

    Returns:
        (purified model in eval mode, PurifyReport)

    Example:
        purified, report = tscpurify.purify(model, DataLoader(clean_set, batch_size=256,
                                                              shuffle=True), epochs=20)
    """
    settings = replace_settings(settings or TSCSettings(), **overrides)
    validate_settings(settings)
    if loss_fn is not None and (settings.distill > 0 or settings.final_ft_label_smoothing > 0
                                or settings.batch_size is not None):
        # Distillation and label smoothing act on class scores; a custom objective (an
        # encoder's SSL loss, say) says nothing about the outputs being class scores, so the
        # last fine-tune uses it alone. The batch size was chosen on cross-entropy, and a
        # contrastive loss has its own needs (large batches): the caller's loader decides. The
        # report's settings say so.
        log.info("custom loss_fn: the loader's own batches, and a last fine-tune on that loss "
                 "alone (distill 0, no smoothing)")
        settings = replace(settings, distill=0.0, final_ft_label_smoothing=0.0, batch_size=None)
    dataset = getattr(clean, "dataset", None)
    if hasattr(dataset, "__len__") and len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError("the clean data loader is empty")
    if resume_dir is not None and Path(resume_dir).exists() and not Path(resume_dir).is_dir():
        raise SettingsError(f"resume_dir {resume_dir} is a file, not a folder of stages")
    if distributed:
        dist.require(device_of(model))
        progress = progress and dist.is_main()  # one progress bar, rank 0's
        clean = dist.sharded(clean, settings.batch_size, derive_seed(seed, "shards"))
    else:
        clean = rebatched(clean, settings.batch_size)
    check_inputs(model, clean, loss_fn)
    if loss_fn is None:
        loss_fn = cross_entropy_loss(random_crop_flip)
    began = time.perf_counter()
    template = copy.deepcopy(model).eval()
    if distributed:  # every process starts from rank 0's weights
        dist.broadcast_state(template.state_dict())
    stages = _Stages(template, clean, settings, loss_fn, evaluate, seed, progress,
                     Path(resume_dir) if resume_dir else None, spec, resume_identity,
                     tuple(leaf_modules), distributed)
    final_state, records = stages.run({k: v.detach().clone()
                                       for k, v in template.state_dict().items()})
    purified = stages.model_from(final_state)
    stages.seconds["total"] = time.perf_counter() - began
    report = PurifyReport(
        tool_version=__version__, defense="tsc", settings=asdict(settings), seed=seed,
        before=stages.measure(template, phase="report"),
        after=stages.measure(purified, phase="report"), stages=records,
        seconds=stages.seconds, steps=settings.planned_steps(len(clean)),
        symmetry={"groups": len(stages.spec.groups), "coverage": stages.coverage},
        resumed=[[record.round, record.stage] for record in stages.resumed])
    if distributed:  # rank 0's, with its evaluations, on every process
        report = dist.broadcast_object(report)
    return purified, report


def stage_files(resume_dir: str | Path, round_index: int, stage: int) -> tuple[Path, Path]:
    """Where `purify(..., resume_dir=)` keeps a finished stage: its weights and its record."""
    stem = Path(resume_dir) / f"round{round_index}_stage{stage}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def finished_stage(resume_dir: str | Path, round_index: int, stage: int
                   ) -> tuple[dict[str, torch.Tensor], StageRecord] | None:
    """The weights and record of a stage that a `purify(..., resume_dir=)` run finished (rounds
    and stages count from 0 and 1), or None if it has not: stage 1's point on its curve, or
    stage 2's, fine-tuned when a fine-tune follows it. For studies of TSC's inner steps (e.g.
    experiments/final_finetune.py) without reading the stage files' names."""
    weights, record = stage_files(resume_dir, round_index, stage)
    if not (weights.exists() and record.exists()):
        return None
    try:
        return load_file(str(weights)), StageRecord(**json.loads(record.read_text()))
    except Exception as err:  # safetensors, JSON and TypeError alike mean a corrupt stage
        raise CheckpointError(f"the saved stage {weights.name} in {resume_dir} is corrupt "
                              f"({type(err).__name__}: {err})") from None


@DEFENSES.register("tsc", settings=TSCSettings, needs_labels=False)
def tsc(model: nn.Module, clean: DataLoader, settings: TSCSettings, *, seed: int,
        progress: bool, callbacks: dict) -> DefenseResult:
    # A harness may also lend TSC a folder for its finished stages (the bench does, so that a
    # row cut short resumes at its last finished stage); see purify's resume_dir.
    purified, report = purify(model, clean, settings, seed=seed, progress=progress,
                              loss_fn=callbacks.get("loss_fn"), evaluate=callbacks.get("evaluate"),
                              resume_dir=callbacks.get("resume_dir"),
                              resume_identity=callbacks.get("resume_identity"))
    return DefenseResult(purified, {"report": report}, report.seconds, steps=report.steps)
