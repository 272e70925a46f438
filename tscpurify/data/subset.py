"""The defender's clean data: a seeded, class-stratified subset of the training split."""

from __future__ import annotations

import math

import torch

from ..errors import SettingsError

# The defender's clean data by default: 5% of the training split (3,000 Fashion-MNIST images),
# BackdoorBench's default share for defenses. Declared here once.
CLEAN_FRACTION = 0.05


def subset_kind(amount: float) -> str:
    """'fraction' for an amount in (0, 1), 'count' for a whole number ≥ 1; anything else (NaN,
    infinity, 1.5, a negative) is refused, never rounded."""
    finite = (isinstance(amount, (int, float)) and not isinstance(amount, bool)
              and math.isfinite(amount))
    if finite and 0 < amount < 1:
        return "fraction"
    if finite and amount >= 1 and float(amount).is_integer():
        return "count"
    raise SettingsError(f"clean subset must be a fraction in (0, 1) or a whole count ≥ 1, got "
                        f"{amount}")


def subset_size(n: int, amount: float) -> int:
    """How many of n images `amount` asks for: a fraction in (0, 1), or a whole count in
    [1, n] (`subset_kind`)."""
    count = round(amount * n) if subset_kind(amount) == "fraction" else int(amount)
    if count < 1 or count > n:
        raise SettingsError(f"clean subset must be a fraction in (0, 1) or a whole count in "
                            f"[1, {n}], got {amount}")
    return count


def select_clean_subset(labels: torch.Tensor, amount: float, seed: int) -> torch.Tensor:
    """Indices of a stratified subset: `amount` < 1 is a fraction, ≥ 1 a count.

    Each class contributes in proportion to its size (largest remainders get the
    rounding), so a 5% subset of a balanced set is exactly balanced.
    """
    n = len(labels)
    count = subset_size(n, amount)
    generator = torch.Generator().manual_seed(seed)
    classes, sizes = labels.unique(return_counts=True)
    exact = sizes.double() * count / n
    quota = exact.floor().long()
    leftover = count - int(quota.sum())
    quota[torch.argsort(exact - quota, descending=True)[:leftover]] += 1
    chosen = []
    for cls, k in zip(classes.tolist(), quota.tolist(), strict=True):
        members = (labels == cls).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(chosen).sort().values
