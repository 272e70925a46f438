"""Activation matching: choose the permutation of model B's units from their correlation with
model A's (TSC building block; "align" for stage 2, "un-align" for stage 1).

Plan:
1. Hook every probe (the Linear/Conv layers producing a group) in both models and run both over
   the loader once; each probe feeds a streaming float64 correlation between A's units and B's.
   For convolutions every spatial position of every image is one observation.
2. A group's statistic is the sum of its probes' correlation matrices: the residual stream is
   scored jointly over every tensor added into it.
3. One linear assignment per group: align maximises Σ C[i, π(i)], unalign minimises it.

Why one pass suffices: the reference matches layer by layer, re-running B with the earlier
permutations applied. Those permutations preserve the function, so a later layer's outputs are
the same numbers (reordered only by that layer's own group, which is not permuted yet): one pass
with hooks on all probes yields the same statistics, at 2 forwards per batch in total.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..errors import DataError, SettingsError, SpecError
from .apply import Permutation
from .spec import PermutationSpec

Mode = Literal["align", "unalign"]


class CorrelationStats:
    """Pearson correlation between the units of two feature streams, accumulated batch by batch.

    Holds float64 accumulators of the sums, sums of squares and cross moment of the features,
    never the features. Each batch's moments are taken in float32 (fast) after subtracting a
    fixed shift (the first batch's means), so no cancellation loses precision; the shift does not
    change covariances.

    Example:
        >>> stats = CorrelationStats(eps=1e-4)
        >>> for a, b in pairs:                      # a: (n, units_a), b: (n, units_b)
        ...     stats.update(a, b)
        >>> stats.correlation()                     # (units_a, units_b), float64
    """

    def __init__(self, eps: float = 1e-4) -> None:
        self.eps = eps  # added to each std: dead units get correlation ~0, not NaN
        self.count = 0
        self.shift_a: torch.Tensor | None = None
        self.shift_b: torch.Tensor | None = None
        self.sum_a = self.sum_b = self.sq_a = self.sq_b = self.cross = torch.zeros((), **_F64)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add observations: (n, units) each, or (k, units, m) blocks of k·m observations as
        returned by `unit_features`."""
        a, b = _blocks(a.detach()), _blocks(b.detach())
        if a.shape[0] * a.shape[2] != b.shape[0] * b.shape[2]:
            raise ValueError(f"a and b hold different numbers of observations: "
                             f"{tuple(a.shape)}, {tuple(b.shape)}")
        if self.shift_a is None or self.shift_b is None:
            self.shift_a = a.float().mean((0, 2), keepdim=True)
            self.shift_b = b.float().mean((0, 2), keepdim=True)
        a, b = a.float() - self.shift_a, b.float() - self.shift_b
        if a.shape != b.shape or a.shape[2] < 64:
            # Few positions per block: one large product is much faster than k small ones.
            a, b = _merge_blocks(a), _merge_blocks(b)
        self.count += a.shape[0] * a.shape[2]
        self.sum_a = self.sum_a + a.sum((0, 2)).double()
        self.sum_b = self.sum_b + b.sum((0, 2)).double()
        self.sq_a = self.sq_a + (a * a).sum((0, 2)).double()
        self.sq_b = self.sq_b + (b * b).sum((0, 2)).double()
        self.cross = self.cross + torch.bmm(a, b.transpose(1, 2)).sum(0).double()

    def correlation(self) -> torch.Tensor:
        """C[i, j] = cov(a_i, b_j) / ((std a_i + eps)(std b_j + eps)), population moments."""
        if self.count == 0:
            raise DataError("no observations were collected")
        n = self.count
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        std_a = (self.sq_a / n - mean_a**2).clamp_min(0).sqrt()
        std_b = (self.sq_b / n - mean_b**2).clamp_min(0).sqrt()
        cov = self.cross / n - torch.outer(mean_a, mean_b)
        return (cov / torch.outer(std_a + self.eps, std_b + self.eps)).cpu()


_F64 = {"dtype": torch.float64}


def _merge_blocks(x: torch.Tensor) -> torch.Tensor:
    """(k, units, m) -> (1, units, k·m)."""
    return x.transpose(0, 1).reshape(1, x.shape[1], -1)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """(n, units) -> (1, units, n), a view; (k, units, m) blocks pass through."""
    if x.dim() == 2:
        return x.T.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"expected (n, units) or (k, units, m) features, got {tuple(x.shape)}")
    return x


def unit_features(output: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A probe's output as (k, units, m) blocks of observations, without copying.

    Conv: (batch, channels, H·W), every position of every image is an observation. Linear: its
    units are the last dim and every other index is an observation, (1, units, n).
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        return output.reshape(output.shape[0], output.shape[1], -1)
    return output.reshape(-1, output.shape[-1]).T.unsqueeze(0)


def _inputs(batch: Any) -> torch.Tensor:
    # Labels, when present, are ignored: matching uses features only.
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _device(model: nn.Module) -> torch.device:
    return next((t.device for t in model.state_dict().values()), torch.device("cpu"))


def correlations(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec,
                 loader: Iterable[Any], *, progress: bool = False) -> dict[str, torch.Tensor]:
    """For every group, C[i, j]: correlation of A's unit i with B's unit j, summed over probes.

    One pass over `loader` (tensors, or tuples/lists whose first element is the input), models
    in eval mode and no gradients; training flags are restored afterwards. If `model_b` is
    `model_a`, one forward per batch serves both.
    """
    for model in {id(model_a): model_a, id(model_b): model_b}.values():
        spec.validate(model.state_dict())
    probes: dict[str, None] = {}  # ordered set of module paths
    modules_a, modules_b = dict(model_a.named_modules()), dict(model_b.named_modules())
    for group in spec.groups.values():
        if not group.probes:
            raise SpecError(f"group {group.name!r} has no probes; activation matching needs the "
                            f"layers producing it (PermutationSpec.from_axes(..., probes=...))")
        for path in group.probes:
            if path not in modules_a or path not in modules_b:
                raise SpecError(f"group {group.name!r}: probe {path!r} is not a module of both "
                                f"models")
            probes[path] = None
    stats = {path: CorrelationStats() for path in probes}
    same = model_a is model_b
    pending: dict[str, deque[torch.Tensor]] = {path: deque() for path in probes}

    def hook_a(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            feats = unit_features(output, module)
            if same:
                stats[path].update(feats, feats)
            else:
                pending[path].append(feats)  # a shared module may fire several times
        return hook

    def hook_b(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if not pending[path]:
                raise SpecError(f"probe {path!r} ran more often in model B than in model A")
            feats_a = pending[path].popleft()
            stats[path].update(feats_a, unit_features(output, module).to(feats_a.device))
        return hook

    handles = [modules_a[p].register_forward_hook(hook_a(p)) for p in probes]
    if not same:
        handles += [modules_b[p].register_forward_hook(hook_b(p)) for p in probes]
    models = (model_a,) if same else (model_a, model_b)
    flags = [(m, m.training) for model in models for m in model.modules()]
    device_a, device_b = _device(model_a), _device(model_b)
    try:
        for model in models:
            model.eval()
        batches = loader
        if progress:
            from tqdm import tqdm
            batches = tqdm(loader, desc="activation matching", leave=False)
        with torch.inference_mode():
            for batch in batches:
                x = _inputs(batch)
                model_a(x.to(device_a))
                if not same:
                    model_b(x.to(device_b))
                    if any(pending.values()):
                        raise SpecError("a probe ran more often in model A than in model B; "
                                        "the two models must share one architecture")
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags:
            module.training = training
    if any(s.count == 0 for s in stats.values()):
        raise DataError("the loader yielded no batches (or a probe never ran)")
    out = {}
    for group in spec.groups.values():
        corr = sum(stats[path].correlation() for path in group.probes)
        units = corr.shape[0]
        if corr.dim() == 2 and units == corr.shape[1] and units > group.size \
                and units % group.size == 0:
            # The group moves runs of `run` probe units (GroupNorm's groups, kept in order):
            # pairing run g of A with run h of B pairs their units one to one, so its score
            # is the sum of those units' correlations.
            run = units // group.size
            corr = corr.reshape(group.size, run, group.size, run).diagonal(
                dim1=1, dim2=3).sum(-1)
        if corr.shape != (group.size, group.size):
            raise SpecError(f"group {group.name!r} has size {group.size} but its probes give "
                            f"{tuple(corr.shape)} correlations")
        out[group.name] = corr
    return out


def solve(corr: torch.Tensor, mode: Mode = "align") -> torch.Tensor:
    """The permutation of B's units from a correlation matrix C (rows: A, columns: B).

    Returns perm with perm[i] = the B unit placed at position i: align maximises Σ C[i, perm[i]],
    unalign minimises it.
    """
    if mode not in ("align", "unalign"):
        raise SettingsError(f"mode must be 'align' or 'unalign', got {mode!r}")
    if not bool(torch.isfinite(corr).all()):
        raise DataError("the activation correlations hold NaN or infinite values: the clean "
                        "data or the model's weights produce non-finite activations")
    rows, cols = linear_sum_assignment(corr.detach().cpu().numpy(), maximize=mode == "align")
    return torch.as_tensor(cols, dtype=torch.long)[torch.as_tensor(rows).argsort()]


def match(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, loader: Iterable[Any],
          *, mode: Mode = "align", progress: bool = False) -> Permutation:
    """The permutation to apply to model B's state dict (apply_permutation) for the given mode.

    Args:
        model_a: the reference model; its units keep their order.
        model_b: the model to permute; may be `model_a` itself (TSC stage 1, round 0).
        spec: both models' spec; every group needs probes.
        loader: clean batches; tensors or (input, label, ...) tuples.
        mode: "align" pairs each unit of A with the most correlated unit of B, "unalign" with
            the least correlated one.

    Example:
        >>> perm = match(model, model, spec, loader, mode="unalign")
        >>> far = apply_permutation(model.state_dict(), spec, perm)   # same function
    """
    if mode not in ("align", "unalign"):
        raise SettingsError(f"mode must be 'align' or 'unalign', got {mode!r}")
    corr = correlations(model_a, model_b, spec, loader, progress=progress)
    return {name: solve(c, mode) for name, c in corr.items()}
