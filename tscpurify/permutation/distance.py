"""How far a model moved from another, measured so that permuting hidden units does not count.

A purified model can sit far from the suspect model in raw weights only because its units are
in another order (TSC's stage 1 permutes them on purpose). Aligning it to the suspect model by
activation matching first, then measuring, gives the distance that permutation symmetry cannot
fake. A defender can compute both numbers from the two models and clean data alone, without
knowing the attack; the deep-purification study asks whether the aligned one predicts how fast a
backdoor returns under re-tuning (docs/fair-fight.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .apply import apply_permutation, weight_distance
from .match import match
from .spec import PermutationSpec
from .trace import derive_spec


def _inputs(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def parameter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters only (no BatchNorm running statistics)."""
    return {name: p.detach() for name, p in model.named_parameters()}


@torch.no_grad()
def model_distances(reference: nn.Module, model: nn.Module, loader: Iterable[Any],
                    spec: PermutationSpec | None = None,
                    leaf_modules: tuple = ()) -> dict[str, float]:
    """{"raw": ‖θ − θ_ref‖ / ‖θ_ref‖, "aligned": the same after permuting `model`'s units to
    match `reference`'s on the clean data in `loader`, or the raw distance where that is
    smaller} over the models' parameters. Neither model is modified; the spec is derived from
    `reference` when not given (keeping `leaf_modules` opaque, as derive_spec does)."""
    if spec is None:
        example = _inputs(next(iter(loader)))[:2]
        device = next(reference.parameters()).device
        spec = derive_spec(reference, example.to(device), leaf_modules=leaf_modules)
    perm = match(reference, model, spec, loader, mode="align")
    aligned = apply_permutation(model.state_dict(), spec, perm)
    names = parameter_state(reference).keys()
    raw = weight_distance(parameter_state(reference), parameter_state(model))
    matched = weight_distance(parameter_state(reference), {k: aligned[k] for k in names})
    # Activation matching pairs units by what they compute, not by their weights: on a model
    # whose units were never permuted (FST's re-initialised head, SAU) it can pick an order
    # farther away than the one the model has. The identity is a permutation too, so the
    # distance up to permutation is at most the raw one.
    return {"raw": raw, "aligned": min(raw, matched)}
