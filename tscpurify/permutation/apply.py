"""Apply permutations to state dicts, and check that they preserve the function.

Convention: a permutation of a group is a LongTensor `perm` with new_unit[i] = old_unit[perm[i]],
so applying it is `index_select(dim, perm)` on every axis of the group.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call

from ..errors import SpecError
from .spec import Axis, PermutationSpec, StateDict

Permutation = dict[str, torch.Tensor]


def _check(spec: PermutationSpec, perm: Mapping[str, torch.Tensor]) -> None:
    for name, index in perm.items():
        if name not in spec.groups:
            raise SpecError(f"permutation names group {name!r}, which the spec does not have; "
                            f"groups: {list(spec.groups)}")
        size = spec.groups[name].size
        if (index.dtype.is_floating_point or index.dim() != 1 or index.numel() != size
                or not torch.equal(index.sort().values.cpu(), torch.arange(size))):
            raise SpecError(f"permutation of group {name!r} must be a 1-D integer tensor holding "
                            f"each of 0..{size - 1} once, got {index.dtype} "
                            f"{tuple(index.shape)}")


def _expand(index: torch.Tensor, block: int) -> torch.Tensor:
    """Unit permutation -> entry permutation along an axis of `block`-sized blocks."""
    if block == 1:
        return index
    return (index[:, None] * block + torch.arange(block, device=index.device)).reshape(-1)


def _entry_index(index: torch.Tensor, axis: Axis, dim_size: int) -> torch.Tensor:
    """Unit permutation -> entry permutation of a whole tensor dim: the segment's `repeat`
    copies each take it, entries outside the segment stay."""
    entries = _expand(index, axis.block)
    if axis.repeat > 1:
        copies = torch.arange(axis.repeat, device=index.device)[:, None] * entries.numel()
        entries = (copies + entries).reshape(-1)
    if axis.length is None:
        return entries
    full = torch.arange(dim_size, device=index.device)
    full[axis.start:axis.start + entries.numel()] = axis.start + entries
    return full


def apply_permutation(state_dict: StateDict, spec: PermutationSpec,
                      perm: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """A new state dict with `perm` applied; the input is never modified.

    Groups missing from `perm` stay as they are; entries no group moves (num_batches_tracked,
    a Normalize layer's mean/std, the classifier's output axis) are copied through.
    """
    _check(spec, perm)
    spec.validate(state_dict)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state_dict.items():
        moved = value
        for name, axis in spec.entries(key):
            if name in perm:
                index = perm[name].to(device=value.device, dtype=torch.long)
                moved = moved.index_select(axis.dim,
                                           _entry_index(index, axis, value.shape[axis.dim]))
        # Fresh tensors throughout, so later in-place edits of either dict cannot leak across.
        out[key] = moved.clone() if moved is value and isinstance(value, torch.Tensor) else moved
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]  # load_state_dict versioning
    return out


def identity_permutation(spec: PermutationSpec) -> Permutation:
    return {name: torch.arange(group.size) for name, group in spec.groups.items()}


def random_permutation(spec: PermutationSpec,
                       generator: torch.Generator | None = None) -> Permutation:
    """A uniformly random permutation of every group (CPU tensors)."""
    return {name: torch.randperm(group.size, generator=generator)
            for name, group in spec.groups.items()}


def invert(perm: Mapping[str, torch.Tensor]) -> Permutation:
    """The permutation that undoes `perm`: applying both gives back the original."""
    return {name: torch.argsort(index) for name, index in perm.items()}


def compose(first: Mapping[str, torch.Tensor],
            second: Mapping[str, torch.Tensor]) -> Permutation:
    """One permutation equal to applying `first`, then `second` (a missing group: identity)."""
    out = {name: index.clone() for name, index in first.items()}
    for name, index in second.items():
        out[name] = out[name][index] if name in out else index.clone()
    return out


def weight_distance(state_a: StateDict, state_b: StateDict) -> float:
    """Relative L2 distance ‖a − b‖ / ‖a‖ over the floating-point entries of both dicts."""
    if set(state_a) != set(state_b):
        diff = sorted(set(state_a) ^ set(state_b))
        raise SpecError(f"state dicts have different keys, e.g. {diff[:5]}")
    num = den = 0.0
    for key, a in state_a.items():
        if a.is_floating_point():
            a64, b64 = a.detach().double(), state_b[key].detach().to(a.device).double()
            num += float((a64 - b64).pow(2).sum())
            den += float(a64.pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def max_output_change(model: nn.Module, spec: PermutationSpec, perm: Mapping[str, torch.Tensor],
                      x: torch.Tensor) -> float:
    """max |f(x) − f_perm(x)| in eval mode: 0 up to rounding for a correct spec.

    The model (whose forward returns one tensor) is not modified: the permuted weights are
    passed with functional_call, and training flags are restored.
    """
    before, after = _outputs(model, apply_permutation(model.state_dict(), spec, perm), x)
    return float((before - after).abs().max())


def verify_spec(model: nn.Module, spec: PermutationSpec, x: torch.Tensor, *,
                generator: torch.Generator | None = None, rtol: float = 1e-5) -> float:
    """Check that `spec` is a symmetry of `model` before trusting it; raise SpecError if not.

    Every group gets a random cyclic permutation (no unit stays in place, so no group goes
    unchecked) and the eval-mode outputs on `x` must move by at most rtol × max |f(x)|.
    Returns the relative change.
    """
    perm = {}
    for name, group in spec.groups.items():
        order = torch.randperm(group.size, generator=generator)
        perm[name] = torch.empty_like(order)
        perm[name][order] = order.roll(-1)  # unit order[k] takes order[k+1]'s place: one cycle
    before, after = _outputs(model, apply_permutation(model.state_dict(), spec, perm), x)
    change = float((before - after).abs().max()) / max(float(before.abs().max()), 1e-12)
    if change > rtol:
        raise SpecError(f"the spec is not a symmetry of the model: permuting its groups changed "
                        f"the outputs by {change:.2e} of their scale (> {rtol:.0e}); a "
                        f"hand-written spec probably misses an axis")
    return change


def _outputs(model: nn.Module, permuted: StateDict, x: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x) with the model's own weights and with `permuted`, in eval mode, no gradients."""
    device = next((t.device for t in model.state_dict().values()), x.device)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            x = x.to(device)
            return model(x), functional_call(model, dict(permuted), (x,))
    finally:
        for module, training in flags:
            module.training = training
