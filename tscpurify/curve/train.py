"""Train a curve's control point: the inner loop of both TSC stages.

Plan, per epoch:
  1. for each mini-batch draw one t ~ U(0, 1) and build θ(t) once;
  2. loss = loss_fn(model at t, batch) + 0.5 · l2_reg · ‖θ(t)‖² (the reference's curve L2
     regulariser), with BatchNorm in train mode, so it normalises with batch statistics;
  3. SGD step on mid only (start and end are fixed, as with the reference's --fix_start --fix_end);
  4. step the cosine schedule, log, call the callbacks and save to the checkpoints, if any.
The loop knows no labels: supervised, SimCLR and CLIP objectives all enter through `loss_fn`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .. import distributed as dist
from ..errors import DataError, SettingsError
from .bezier import BezierCurve, CurveFunction

ModelFn = Callable[[Tensor], Tensor]
LossFn = Callable[[ModelFn, Any], Tensor]
Callback = Callable[[int, dict], None]


class Checkpoints(Protocol):
    """Where a training loop (`train_curve`, `training.train_classifier`) saves its state after
    each epoch and resumes from, so that a run cut short ends as one never stopped; duck-typed,
    `tscpurify.resume.EpochCheckpoints` is one.

    `resume(stateful)` loads the last save into `stateful` (objects with `state_dict` and
    `load_state_dict`) and the random generators, and returns (epochs done, the loop's record
    saved with them), (0, {}) if none; `save(epochs, stateful, record, final)` saves them after
    `epochs` epochs, `final` on the loop's last.
    """

    def resume(self, stateful: Mapping[str, Any]) -> tuple[int, dict[str, Any]]: ...

    def save(self, epochs: int, stateful: Mapping[str, Any], record: Mapping[str, Any],
             final: bool = False) -> None: ...


class _GeneratorState:
    """A torch.Generator as a state to save and load (`state_dict`, `load_state_dict`)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["state"])


@dataclass(frozen=True)
class CurveSettings:
    epochs: int = field(default=200, metadata={
        "help": "passes over the clean set (reference README example: 200)"})
    lr: float = field(default=0.02, metadata={
        "help": "initial SGD learning rate (reference README: 0.02)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={
        "help": "SGD weight decay on the control point (reference: 5e-4)"})
    l2_reg: float = field(default=1e-4, metadata={
        "help": "curve L2 regulariser: adds 0.5·l2_reg·‖θ(t)‖² to the loss "
                "(the reference's wd, 1e-4 for CIFAR-10)"})
    bf16: bool = field(default=False, metadata={
        "help": "bfloat16 autocast for the forward pass and the loss (the control point, its "
                "gradient and the optimiser stay float32): faster on GPUs with bf16 "
                "(Ampere and later); results differ slightly from float32"})
    cosine_t_max: int | None = field(default=100, metadata={
        "help": "T_max of the per-epoch cosine schedule; None means epochs. The reference uses "
                "100 with 200 epochs, so the rate reaches 0 at epoch 100 and climbs back"})

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.lr <= 0:
            raise SettingsError(f"curve training needs epochs ≥ 0 and lr > 0; got "
                                f"{self.epochs}, {self.lr}")
        # momentum ≥ 1 never decays the velocity: the curve diverges (as TrainSettings' range)
        if not 0 <= self.momentum < 1 or self.weight_decay < 0 or self.l2_reg < 0:
            raise SettingsError(f"curve training needs 0 ≤ momentum < 1 and weight_decay, "
                                f"l2_reg ≥ 0; got {self.momentum}, {self.weight_decay}, "
                                f"{self.l2_reg}")
        if self.cosine_t_max is not None and self.cosine_t_max < 1:
            raise SettingsError(f"cosine_t_max must be ≥ 1 or None, got {self.cosine_t_max}")


def bf16_autocast(device: torch.device | str, enabled: bool) -> torch.autocast:
    """bfloat16 autocast on `device` when `enabled` (a no-op context otherwise): matrix products
    and convolutions run in bfloat16, reductions and the loss in float32, parameters stay
    float32. One definition for the curves and every fine-tune."""
    kind = torch.device(device).type
    return torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=enabled)


def to_device(batch: Any, device: torch.device) -> Any:
    """`batch` with every tensor moved to `device`, through tuples, lists and dicts."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def device_of(model_fn: ModelFn) -> torch.device:
    """Where a model function computes: a CurveFunction's device, a module's first tensor, or CPU.

    Lets one loss function serve the curve and a plain nn.Module alike.
    """
    device = getattr(model_fn, "device", None)
    if isinstance(device, torch.device):
        return device
    if isinstance(model_fn, nn.Module):
        for tensor in (*model_fn.parameters(), *model_fn.buffers()):
            return tensor.device
    return torch.device("cpu")


def cross_entropy_loss(augment: Callable[[Tensor], Tensor] | None = None, *,
                       label_smoothing: float = 0.0) -> LossFn:
    """Supervised loss for batches (x, y): cross-entropy of model(augment(x)) against y, with
    the targets smoothed by `label_smoothing` (0 = one-hot).

    Augmentation runs after the move to the device, so it costs no extra host copy.
    """
    def loss(model_fn: ModelFn, batch: Any) -> Tensor:
        x, y = to_device(batch[:2], device_of(model_fn))
        return F.cross_entropy(model_fn(augment(x) if augment is not None else x), y,
                               label_smoothing=label_smoothing)
    return loss


def distillation_loss(teacher: nn.Module, augment: Callable[[Tensor], Tensor] | None = None, *,
                      weight: float = 0.5, temperature: float = 2.0,
                      label_smoothing: float = 0.0) -> LossFn:
    """Cross-entropy with labels, mixed with knowledge distillation from a frozen `teacher`:
    (1 − weight) · CE(s, y) + weight · T² · KL(softmax(teacher/T) ‖ softmax(s/T)), with the
    student and the teacher seeing the same augmented images. weight = 1 needs no labels;
    `label_smoothing` smooths the CE term's targets.
    """
    teacher.eval()

    def loss(model_fn: ModelFn, batch: Any) -> Tensor:
        device = device_of(model_fn)
        x = to_device(batch[0] if isinstance(batch, (tuple, list)) else batch, device)
        x = augment(x) if augment is not None else x
        logits = model_fn(x)
        with torch.no_grad():
            target = F.softmax(teacher(x) / temperature, dim=1)
        kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), target,
                      reduction="batchmean") * temperature ** 2
        if weight >= 1:
            return kd
        y = to_device(batch[1], device)
        ce = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        return (1 - weight) * ce + weight * kd
    return loss


def path_aware_loss(loss_fn: LossFn, anchor: dict[str, Tensor], rho: float) -> LossFn:
    """`loss_fn` taken at the point a fraction `rho` of the way from the model to `anchor`:
    L((1 − rho)·θ + rho·θ_anchor), differentiated with respect to θ.

    Fine-tuning θ this way asks the segment towards the anchor to fit the data, which is meant
    to push θ itself away from the anchor. With the suspect model (aligned to θ) as anchor this
    is a path-aware fine-tune in the spirit of PAM (Min et al., "Uncovering, Explaining, and
    Mitigating the Superficial Safety of Backdoor Defense", NeurIPS 2024), against a purified
    model drifting back to the backdoor when fine-tuned. As TSC's last step on our tuning
    models it did not help (docs/tuning.md), so no default uses it.
    BatchNorm normalises with batch statistics as usual, but its running statistics are then
    those of the shifted point: re-estimate them (`recompute_bn_stats`) afterwards.
    """
    if not 0 <= rho < 1:
        raise SettingsError(f"rho must lie in [0, 1), got {rho}")

    def loss(model: nn.Module, batch: Any) -> Tensor:
        weights = {k: p * (1 - rho) + anchor[k] * rho for k, p in model.named_parameters()
                   if k in anchor}
        device = next(iter(weights.values())).device
        return loss_fn(CurveFunction(model, weights, rho, device), batch)
    return loss


def _squared_norm(weights: dict[str, Tensor]) -> Tensor:
    # One fused reduction per tensor, then one stack: fewer ops than summing w.pow(2) piecewise.
    return torch.stack(torch._foreach_norm(list(weights.values()))).square().sum()


# What `train_curve` saves to its checkpoints, the generator last and only when one is given
# (a phased run declares it: resume.py).
CURVE_STATE = ("curve", "template", "optimizer", "scheduler", "generator")


def train_curve(curve: BezierCurve, loader: Iterable[Any], loss_fn: LossFn,
                settings: CurveSettings, *, callbacks: Sequence[Callback] = (),
                progress: bool = True, generator: torch.Generator | None = None,
                distributed: bool = False, checkpoints: Checkpoints | None = None,
                desc: str = "curve") -> list[dict]:
    """Train `curve.mid` in place; returns one log entry per epoch (epoch, loss, lr, seconds).

    `loss` is the epoch's mean over mini-batches of the full objective (task loss + L2 term);
    `lr` is the rate the epoch used.

    `generator` (a CPU generator) draws the t of each mini-batch, so two runs with equal seeds,
    equal data order and equal augmentation randomness give identical control points.
    `callbacks(epoch, entry)` run after each epoch (evaluation, profiles, checkpoints).

    `distributed`: this process is one of several, each with its shard of the batches (see
    tscpurify.distributed): the control point's gradient is averaged over the processes after
    each backward, so each step follows the union batch's gradient (the L2 term, the same on
    every process, counts once), and the logged loss is the processes' mean. `generator` must
    then be seeded alike on every process, so all take the same t.

    `checkpoints` (one process only): resume from its last save, then save after each epoch,
    after the callbacks: the curve (its control point and its template's BatchNorm
    statistics), the optimiser, the schedule, `generator` and the log so far (record "log").
    The log returned then holds the entries of the epochs run before the save too.
    """
    if checkpoints is not None and distributed:
        raise SettingsError("curve training saves checkpoints from one process only; "
                            "distributed training takes none")
    params = list(curve.parameters())
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=settings.cosine_t_max or max(settings.epochs, 1))
    half_l2 = 0.5 * settings.l2_reg
    saved_objects: list[Any] = [curve, curve.template, optimizer, scheduler]
    if generator is not None:
        saved_objects.append(_GeneratorState(generator))
    stateful = dict(zip(CURVE_STATE, saved_objects, strict=False))  # generator: if given
    done, saved = checkpoints.resume(stateful) if checkpoints is not None else (0, {})
    log: list[dict] = list(saved.get("log", []))
    bar = tqdm(range(done, settings.epochs), desc=desc, disable=not progress, initial=done,
               total=settings.epochs)
    for epoch in bar:
        began = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        curve.train()  # every epoch: a callback may have left the curve in eval mode
        # Accumulate on the device: calling .item() per step would force a sync on GPUs.
        total = torch.zeros((), device=curve.device)
        steps = 0
        for batch in loader:
            t = float(torch.rand((), generator=generator))
            weights = curve.weights(t)
            with bf16_autocast(curve.device, settings.bf16):
                loss = loss_fn(curve.as_function(t, weights), batch)
            if half_l2:
                loss = loss + half_l2 * _squared_norm(weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if distributed:
                dist.all_reduce_gradients(params)
            optimizer.step()
            total += loss.detach()
            steps += 1
        if steps == 0:
            raise DataError("curve training needs data: the loader gave no batches")
        if distributed:
            dist.all_reduce_mean(total)
        scheduler.step()
        entry = {"epoch": epoch, "loss": float(total) / steps, "lr": lr,
                 "seconds": time.perf_counter() - began}
        log.append(entry)
        bar.set_postfix(loss=f"{entry['loss']:.4f}")
        for callback in callbacks:
            callback(epoch, entry)
        if checkpoints is not None:
            checkpoints.save(epoch + 1, stateful, {"log": log},
                             final=epoch + 1 == settings.epochs)
    return log
