"""One training budget for every defense, counted in steps.

A step is one optimizer update of what the defense returns (the model's weights, or ANP's
neuron masks) computed from one clean mini-batch. Inner maximisations that serve such an update
(i-BAU's and SAU's perturbations, ANP's neuron noise, SAM's ascent) are part of their step: they
cost time, which the bench records beside the steps, not extra steps.

A training defense's settings class offers two methods, so a grid can give every defense the
same number of steps without knowing how each spends them:
    planned_steps(batches_per_epoch) -> int       the steps these settings will take;
    at_budget(steps, batches_per_epoch) -> Self   the same settings, resized to about `steps`.
Defenses that do not train (CLP) have neither and take 0 steps. Each defense also reports the
steps it really took in `DefenseResult.steps`; a contract test checks the two agree.
"""

from __future__ import annotations

from typing import Any

from ..errors import SettingsError


def epochs_for(steps: int, batches_per_epoch: int) -> int:
    """Whole passes over the clean data closest to `steps` updates (at least one)."""
    if steps < 1 or batches_per_epoch < 1:
        raise SettingsError(f"a step budget needs steps ≥ 1 and at least one batch per epoch; "
                            f"got {steps} steps, {batches_per_epoch} batches")
    return max(1, round(steps / batches_per_epoch))


def scale_counts(counts: dict[str, int], steps_each: dict[str, int], steps: int
                 ) -> dict[str, int]:
    """Resize several phase lengths together so that Σ counts·steps_each ≈ `steps`.

    `counts` are the phases' lengths (epochs, iterations), `steps_each` the steps one unit of each
    phase takes. Their ratios are kept, a phase of length 0 stays 0, and every other phase keeps
    at least 1, so a budget never removes a phase the settings asked for.
    """
    planned = sum(counts[k] * steps_each[k] for k in counts)
    if planned == 0:
        return dict(counts)
    factor = steps / planned
    return {k: (max(1, round(v * factor)) if v > 0 else 0) for k, v in counts.items()}


def planned_steps(settings: Any, batches_per_epoch: int) -> int:
    """The steps `settings` will take (0 for a defense that does not train)."""
    plan = getattr(settings, "planned_steps", None)
    return 0 if plan is None else int(plan(batches_per_epoch))


def at_budget(settings: Any, steps: int | None, batches_per_epoch: int) -> Any:
    """`settings` resized to `steps` (unchanged when steps is None or the defense does not
    train)."""
    if steps is None or not hasattr(settings, "at_budget"):
        return settings
    return settings.at_budget(steps, batches_per_epoch)
