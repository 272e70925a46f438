"""ANP: Adversarial Neuron Pruning. Neurons whose perturbation most easily breaks the model are
the backdoor's; learn a mask under adversarial neuron perturbation and prune the low ones.

Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021,
https://arxiv.org/abs/2110.14430. Reference implementations: csdongxian/ANP_backdoor
(`optimize_mask_cifar.py`, `prune_neuron_cifar.py`, `models/anp_batchnorm.py`) and
SCLBD/BackdoorBench `defense/anp.py`.

A neuron is a channel of an affine BatchNorm layer (the reference's noisy BN layers), or an output
feature of a hidden Linear layer that no BatchNorm follows (see "Differs"); the output layer is
never masked. Neuron k has scale weights w_k (the BN's γ_k, or row k of the Linear's weight) and a
shift b_k (β_k, or the Linear's bias b_k).

Plan:
  1. Every neuron k gets a mask m_k = 1 and perturbations δ_k (scale) and ξ_k (shift):
     w_k → (m_k + δ_k)·w_k, b_k → (1 + ξ_k)·b_k.
  2. For `iterations` mini-batches (randomly cropped and flipped, as the reference's clean
     data), the model in train mode (BatchNorm on batch statistics): draw δ, ξ uniformly in
     [-eps, eps]; take `steps` signed gradient-ascent steps of size eps/steps on the CE loss,
     not projected back (inner maximisation); then one SGD step on the masks for
     alpha·CE(m) + (1 − alpha)·CE(m + δ, 1 + ξ), and clip the masks to [0, 1].
  3. Prune a copy of the original weights: every neuron with m_k ≤ threshold gets w_k = 0 (its
     shift stays, as in the reference); every other tensor is left exactly as it was.

Differs from the reference: hidden Linear layers without BatchNorm are masked too, because the
paper's neurons include them and the reference's noisy layers exist for BatchNorm only; batches
come from the loader pass after pass (the reference draws them with replacement), because the
loader is the caller's; masks are learnt through functional_call on cloned buffers, because the
returned model must keep the input's running statistics (the reference prunes a fresh checkpoint).

Settings (defaults, the authors' code; BackdoorBench's config uses a mask lr of 0.01): eps 0.4,
steps 1, alpha 0.2, mask_lr 0.2, momentum 0.9, iterations 2000, threshold 0.2 (fixed in advance,
never tuned on ASR), augment True (crop and flip; the fair grid's first ANP runs, before
2026-12-04, learnt masks on un-augmented batches: docs/fair-fight.md).

Example:
    >>> result = defend("anp", model, clean_loader)
    >>> result.details["pruned"]          # {layer: [neuron indices]}
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.augment import random_crop_flip
from ..errors import DataError, SettingsError, SpecError
from ..resume import EpochCheckpoints
from ..training import device_of
from ._common import BatchNorm, inputs_of, module_calls
from .base import DefenseResult
from .registered import DEFENSES

Noise = tuple[dict[str, Tensor], dict[str, Tensor]]  # (scale noise δ, shift noise ξ) per layer


@dataclass(frozen=True)
class ANPSettings:
    eps: float = field(default=0.4, metadata={"help": "size of the initial neuron perturbations"})
    steps: int = field(default=1, metadata={
        "help": "signed ascent steps of size eps/steps on the perturbations, per batch"})
    alpha: float = field(default=0.2, metadata={
        "help": "weight of the unperturbed loss; 1 − alpha weighs the perturbed one"})
    mask_lr: float = field(default=0.2, metadata={"help": "SGD learning rate of the masks"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum of the masks"})
    iterations: int = field(default=2000, metadata={
        "help": "mask updates, one clean mini-batch each (the step budget)"})
    threshold: float = field(default=0.2, metadata={
        "help": "neurons whose mask ends at or below this are pruned (fixed, paper default)"})
    augment: bool = field(default=True, metadata={
        "help": "random crop and flip of each clean batch, as the reference's clean data "
                "(its transform_train)"})

    def __post_init__(self) -> None:
        if self.eps < 0 or self.steps < 1 or not 0 <= self.alpha <= 1 or self.iterations < 0:
            raise SettingsError(f"ANP needs eps ≥ 0, steps ≥ 1, 0 ≤ alpha ≤ 1, iterations ≥ 0; "
                                f"got {self.eps}, {self.steps}, {self.alpha}, {self.iterations}")
        if self.mask_lr <= 0 or not 0 <= self.momentum < 1:
            raise SettingsError(f"ANP needs mask_lr > 0 and 0 ≤ momentum < 1; got "
                                f"{self.mask_lr}, {self.momentum}")

    def planned_steps(self, batches_per_epoch: int) -> int:
        """One mask update per iteration, whatever the loader's length."""
        return self.iterations

    def at_budget(self, steps: int, batches_per_epoch: int) -> ANPSettings:
        if steps < 1 or batches_per_epoch < 1:
            raise SettingsError(f"a step budget needs steps ≥ 1 and at least one batch per "
                                f"epoch; got {steps} steps, {batches_per_epoch} batches")
        return dataclasses.replace(self, iterations=steps)


def neuron_layers(model: nn.Module, x: Tensor) -> dict[str, nn.Module]:
    """The layers whose neurons ANP masks, by name, in call order (one eval forward on `x`):
    every affine BatchNorm, and every Linear that is neither the last one called (the output
    layer) nor followed by a BatchNorm (which then carries those neurons). Buffers and training
    flags are left as they were."""
    calls = module_calls(model, x, keep=lambda name, m: isinstance(m, (BatchNorm, nn.Linear)))
    normalised = {id(c.input) for c in calls if isinstance(c.module, BatchNorm)}
    linears = [c.name for c in calls if isinstance(c.module, nn.Linear)]
    output_layer = linears[-1] if linears else None
    layers: dict[str, nn.Module] = {}
    for c in calls:
        m = c.module
        affine_norm = isinstance(m, BatchNorm) and m.weight is not None and m.bias is not None
        hidden_linear = (isinstance(m, nn.Linear) and c.name != output_layer
                         and id(c.output) not in normalised)
        if affine_norm or hidden_linear:
            layers.setdefault(c.name, m)
    if not layers:
        raise SpecError("ANP masks the channels of affine BatchNorm layers and the features of "
                        "hidden Linear layers, and this model has neither")
    return layers


def _per_neuron(scale: Tensor | float, weight: Tensor) -> Tensor | float:
    """`scale` (one value per neuron) shaped to multiply `weight` row by row."""
    if isinstance(scale, Tensor):
        return scale.view(-1, *[1] * (weight.dim() - 1))
    return scale


def neuron_forward(model: nn.Module, layers: dict[str, nn.Module], x: Tensor,
                   mask: dict[str, Tensor], noise: Noise | None = None,
                   buffers: dict[str, Tensor] | None = None) -> Tensor:
    """The model with each neuron's scale weights times (mask + δ) and its shift times (1 + ξ).
    `buffers` replace the model's own (e.g. clones, so a train-mode pass leaves them as they
    were)."""
    params: dict[str, Tensor] = dict(buffers or {})
    for name, layer in layers.items():
        scale = mask[name] if noise is None else mask[name] + noise[0][name]
        params[f"{name}.weight"] = layer.weight * _per_neuron(scale, layer.weight)
        if noise is not None and name in noise[1]:
            params[f"{name}.bias"] = layer.bias * (1 + noise[1][name])
    return functional_call(model, params, (x,))


def perturb_neurons(model: nn.Module, layers: dict[str, nn.Module], x: Tensor, y: Tensor,
                    mask: dict[str, Tensor], eps: float, steps: int,
                    buffers: dict[str, Tensor] | None = None) -> Noise:
    """(scale noise, shift noise): uniform in [-eps, eps], then `steps` signed ascent steps of
    size eps/steps on the loss of the masked model. Like the reference, the result is not
    projected back to [-eps, eps], so it can reach 2·eps."""
    fixed = {n: m.detach() for n, m in mask.items()}
    scale = {n: torch.empty_like(m).uniform_(-eps, eps).requires_grad_() for n, m in fixed.items()}
    shift = {n: torch.empty_like(m).uniform_(-eps, eps).requires_grad_()
             for n, m in fixed.items() if layers[n].bias is not None}
    leaves = [*scale.values(), *shift.values()]
    for _ in range(steps):
        loss = F.cross_entropy(neuron_forward(model, layers, x, fixed, (scale, shift), buffers), y)
        grads = torch.autograd.grad(loss, leaves)
        with torch.no_grad():
            for t, g in zip(leaves, grads, strict=True):
                t.add_(g.sign(), alpha=eps / steps)
    return ({n: t.detach() for n, t in scale.items()}, {n: t.detach() for n, t in shift.items()})


class _Tensors:
    """Named tensors as a state, restored in place, so that the optimiser's references (the
    masks) and functional_call's (the buffers) keep pointing at them."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, Any]:
        return {n: t.detach() for n, t in self.tensors.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, t in self.tensors.items():
            t.copy_(state[n])


@DEFENSES.register("anp", settings=ANPSettings, needs_labels=True)
def anp(model: nn.Module, clean: DataLoader, settings: ANPSettings, *, seed: int,
        progress: bool, callbacks: dict) -> DefenseResult:
    began = time.perf_counter()
    device, s = device_of(model), settings
    layers = neuron_layers(model, inputs_of(next(iter(clean))))
    mask = {n: torch.ones(layer.weight.shape[0], device=device, requires_grad=True)
            for n, layer in layers.items()}
    optimizer = torch.optim.SGD(mask.values(), lr=s.mask_lr, momentum=s.momentum)
    # Train-mode BatchNorm updates running statistics: let it update clones, never the model's.
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    history: list[float] = []
    steps, elapsed = 0, 0.0
    # A run cut short resumes after its last saved pass over the loader (resume.py): the
    # batches come pass after pass, so only there does a resumed run read the very batches an
    # uninterrupted one does. The model's own weights and buffers do not change here.
    checkpoints = EpochCheckpoints.from_callbacks(callbacks, "anp", s)
    stateful = {"masks": _Tensors(mask), "buffers": _Tensors(buffers), "optimizer": optimizer}
    passes, saved = checkpoints.resume(stateful)
    if saved:
        history, steps, elapsed = saved["loss"], saved["steps"], saved["seconds"]
    bar = tqdm(total=s.iterations, initial=steps, desc="anp", disable=not progress, leave=False)
    try:
        model.train()  # as the reference: BatchNorm normalises with the batch's statistics
        for p in flags:
            p.requires_grad_(False)
        while steps < s.iterations:  # passes over the loader, reshuffled, as long as needed
            empty = True
            for x, y, *_ in clean:
                empty = False
                x, y = x.to(device), y.to(device)
                if s.augment:  # one draw per batch: noise and mask step see the same images
                    x = random_crop_flip(x)
                natural = F.cross_entropy(neuron_forward(model, layers, x, mask,
                                                         buffers=buffers), y)
                loss = s.alpha * natural
                if s.eps > 0:  # with eps = 0 the reference drops the perturbed term altogether
                    # 1. inner maximisation over the neuron perturbations, masks held fixed
                    noise = perturb_neurons(model, layers, x, y, mask, s.eps, s.steps, buffers)
                    perturbed = neuron_forward(model, layers, x, mask, noise, buffers)
                    loss = loss + (1 - s.alpha) * F.cross_entropy(perturbed, y)
                # 2. outer minimisation over the masks
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                with torch.no_grad():
                    for m in mask.values():
                        m.clamp_(0, 1)
                history.append(loss.item())
                bar.update()
                if steps == s.iterations:  # mid-pass: the rest of this pass is never read
                    break
            if empty:
                raise DataError("the clean data loader gave no batches")
            passes += 1
            checkpoints.save(passes, stateful,
                             {"loss": history, "steps": steps,
                              "seconds": elapsed + time.perf_counter() - began},
                             final=steps == s.iterations)
    finally:
        bar.close()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode
    seconds = {"masks": elapsed + time.perf_counter() - began, **checkpoints.seconds()}

    # 3. prune by the fixed threshold (≤, as the reference's threshold sweep)
    pruned = {}
    with torch.no_grad():
        for name, layer in layers.items():
            low = (mask[name] <= s.threshold).nonzero().flatten()
            layer.weight[low] = 0
            pruned[name] = low.tolist()
    details = {"masks": {n: m.detach().cpu().tolist() for n, m in mask.items()},
               "pruned": pruned, "count": sum(len(v) for v in pruned.values()),
               "loss": history}
    return DefenseResult(model, details, seconds, steps=steps)
