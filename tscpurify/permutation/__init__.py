"""The permutation engine: a model's weight symmetry as data, derived by tracing, applied to
state dicts, and chosen by activation matching (the building blocks of TSC).

Example:
    >>> spec = derive_spec(model, torch.rand(2, 1, 28, 28))
    >>> verify_spec(model, spec, x)                                  # raises if not a symmetry
    >>> perm = match(model, model, spec, loader, mode="unalign")
    >>> far = apply_permutation(model.state_dict(), spec, perm)      # same function
    >>> assert max_output_change(model, spec, perm, x) < 1e-5
"""

from .apply import (
    Permutation,
    apply_permutation,
    compose,
    identity_permutation,
    invert,
    max_output_change,
    random_permutation,
    verify_spec,
    weight_distance,
)
from .distance import model_distances
from .match import CorrelationStats, correlations, match, solve, unit_features
from .spec import Axis, PermutationGroup, PermutationSpec
from .trace import derive_spec

__all__ = [
    "Axis",
    "CorrelationStats",
    "Permutation",
    "PermutationGroup",
    "PermutationSpec",
    "apply_permutation",
    "compose",
    "correlations",
    "derive_spec",
    "identity_permutation",
    "invert",
    "match",
    "model_distances",
    "max_output_change",
    "random_permutation",
    "solve",
    "unit_features",
    "verify_spec",
    "weight_distance",
]
