"""Activation matching: choose the permutation of model B's units from their correlation with
model A's (TSC building block; "align" for stage 2, "un-align" for stage 1).

Plan:
1. Hook every probe (the Linear/Conv layers producing a group) in both models and run both over
   the loader once; each probe feeds a streaming float64 correlation between A's units and B's.
   For convolutions every spatial position of every image is one observation.
2. A group's statistic is the sum of its probes' correlation matrices: the residual stream is
   scored jointly over every tensor added into it.
3. One linear assignment per group: align maximises Σ C[i, π(i)], unalign minimises it.
   Attention heads come first: a pair of heads scores the best one-to-one pairing of their
   units (a small assignment per pair); the units within heads are then scored across the
   heads the head permutation paired.

Why one pass suffices: the reference matches layer by layer, re-running B with the earlier
permutations applied. Those permutations preserve the function, so a later layer's outputs are
the same numbers (reordered only by that layer's own group, which is not permuted yet): one pass
with hooks on all probes yields the same statistics, at 2 forwards per batch in total.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

from .. import distributed as dist
from ..errors import DataError, SettingsError, SpecError
from .apply import Permutation
from .spec import Axis, PermutationGroup, PermutationSpec

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

    def all_reduce(self) -> None:
        """Sum the accumulators over the processes of a distributed job (each saw its shard of
        the data), so `correlation` is the union's. Each process's moments are first re-centred
        on rank 0's shift, exactly (in float64): x − c = (x − s) + (s − c)."""
        if not dist.active():
            return
        if self.shift_a is None or self.shift_b is None:
            raise DataError("no observations were collected on this process")
        common_a = dist.broadcast_state({"a": self.shift_a.clone()})["a"]
        common_b = dist.broadcast_state({"b": self.shift_b.clone()})["b"]
        d_a = (self.shift_a - common_a).flatten().double()
        d_b = (self.shift_b - common_b).flatten().double()
        n = float(self.count)
        sum_a, sum_b = self.sum_a, self.sum_b
        self.cross = (self.cross + torch.outer(d_a, sum_b) + torch.outer(sum_a, d_b)
                      + n * torch.outer(d_a, d_b))
        self.sq_a = self.sq_a + 2 * d_a * sum_a + n * d_a * d_a
        self.sq_b = self.sq_b + 2 * d_b * sum_b + n * d_b * d_b
        self.sum_a, self.sum_b = sum_a + n * d_a, sum_b + n * d_b
        self.shift_a, self.shift_b = common_a, common_b
        count = torch.tensor([n], dtype=torch.float64, device=self.cross.device)
        for tensor in (count, self.sum_a, self.sum_b, self.sq_a, self.sq_b, self.cross):
            dist.all_reduce_sum(tensor)
        self.count = int(count.item())

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
    return _last_dim_features(output)


def _last_dim_features(output: torch.Tensor) -> torch.Tensor:
    return output.reshape(-1, output.shape[-1]).T.unsqueeze(0)


def _attention_features(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> torch.Tensor:
    """MultiheadAttention's probe: its packed Q, K, V projections, (tokens, 3·embed_dim), which
    is the output axis of in_proj_weight (the one its head and within-head groups move)."""
    names = ("query", "key", "value")
    inputs = [args[i] if len(args) > i else kwargs[name] for i, name in enumerate(names)]
    if len({tuple(x.shape) for x in inputs}) > 1:
        raise SpecError("matching a MultiheadAttention needs query, key and value of one shape "
                        "(self-attention); pass a spec whose probes are other layers")
    weights = module.in_proj_weight.chunk(3)
    biases = (module.in_proj_bias.chunk(3) if module.in_proj_bias is not None
              else (None, None, None))
    return torch.cat([F.linear(x, w, b) for x, w, b in zip(inputs, weights, biases, strict=True)],
                     dim=-1)


def _probe_features(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
    if isinstance(module, nn.MultiheadAttention):
        return _last_dim_features(_attention_features(module, args, kwargs))
    return unit_features(output, module)


def _probe_key(module: nn.Module, path: str) -> str:
    """The state-dict key whose dim 0 indexes a probe's units."""
    name = "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "weight"
    return f"{path}.{name}"


def _inputs(batch: Any) -> torch.Tensor:
    # Labels, when present, are ignored: matching uses features only.
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _device(model: nn.Module) -> torch.device:
    return next((t.device for t in model.state_dict().values()), torch.device("cpu"))


def correlations(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec,
                 loader: Iterable[Any], *, progress: bool = False,
                 distributed: bool = False) -> dict[str, torch.Tensor]:
    """For every group, C[i, j]: correlation of A's unit i with B's unit j, summed over probes.

    One pass over `loader` (tensors, or tuples/lists whose first element is the input), models
    in eval mode and no gradients; training flags are restored afterwards. If `model_b` is
    `model_a`, one forward per batch serves both. Units within attention heads are scored
    across the heads that aligning would pair (see `match`). `distributed`: `loader` is this
    process's shard (tscpurify.distributed) and the statistics are summed over the processes.
    """
    stats, keys = _probe_correlations(model_a, model_b, spec, loader, progress, distributed)
    scorer = _Scorer(spec, stats, keys, "align")
    return {name: scorer.score(name) for name in spec.groups}


def _probe_correlations(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec,
                        loader: Iterable[Any], progress: bool, distributed: bool = False
                        ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every probe's correlation matrix (A's units × B's), and the key indexing its units."""
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
        def hook(module: nn.Module, args: Any, kwargs: Any, output: torch.Tensor) -> None:
            feats = _probe_features(module, args, kwargs, output)
            if same:
                stats[path].update(feats, feats)
            else:
                pending[path].append(feats)  # a shared module may fire several times
        return hook

    def hook_b(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: torch.Tensor) -> None:
            if not pending[path]:
                raise SpecError(f"probe {path!r} ran more often in model B than in model A")
            feats_a = pending[path].popleft()
            feats_b = _probe_features(module, args, kwargs, output)
            stats[path].update(feats_a, feats_b.to(feats_a.device))
        return hook

    handles = [modules_a[p].register_forward_hook(hook_a(p), with_kwargs=True) for p in probes]
    if not same:
        handles += [modules_b[p].register_forward_hook(hook_b(p), with_kwargs=True)
                    for p in probes]
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
    if distributed:
        for path in probes:  # the same order on every process
            stats[path].all_reduce()
    return ({path: s.correlation() for path, s in stats.items()},
            {path: _probe_key(modules_a[path], path) for path in probes})


class _Scorer:
    """Each group's score matrix from the probes' correlations, and its solution for `mode`.

    A group whose axes on its probes are whole and shared with no other group is scored as it
    always was (summed correlations; GroupNorm runs pair unit by unit). Groups sharing a segment
    of a probe's axis (attention heads and the units within them) are scored by `_segment`.
    """

    def __init__(self, spec: PermutationSpec, corr: Mapping[str, torch.Tensor],
                 keys: Mapping[str, str], mode: Mode) -> None:
        self.spec, self.corr, self.keys, self.mode = spec, corr, keys, mode
        self.scores: dict[str, torch.Tensor] = {}
        self.perms: dict[str, torch.Tensor] = {}

    def perm(self, name: str) -> torch.Tensor:
        if name not in self.perms:
            self.perms[name] = solve(self.score(name), self.mode)
        return self.perms[name]

    def score(self, name: str) -> torch.Tensor:
        if name not in self.scores:
            self.scores[name] = self._score(self.spec.groups[name])
        return self.scores[name]

    def _probe_axes(self, group: PermutationGroup, path: str) -> list[Axis]:
        return [a for a in group.params if a.key == self.keys[path] and a.dim == 0]

    def _neighbours(self, axis: Axis, name: str) -> list[tuple[PermutationGroup, Axis]]:
        """The other groups' axes on the same segment (other factors of it)."""
        return [(self.spec.groups[other], a) for other, a in self.spec.entries(axis.key)
                if other != name and a.dim == axis.dim
                and (a.start, a.length) == (axis.start, axis.length)]

    def _score(self, group: PermutationGroup) -> torch.Tensor:
        plain = all(a.length is None and a.repeat == 1 and not self._neighbours(a, group.name)
                    for path in group.probes for a in self._probe_axes(group, path))
        if plain:
            return _plain_score(group, sum(self.corr[path] for path in group.probes))
        total = torch.zeros(group.size, group.size, dtype=torch.float64)
        for path in group.probes:
            axes = self._probe_axes(group, path)
            if not axes:
                raise SpecError(f"group {group.name!r}: probe {path!r} is not among its axes, "
                                f"so its units cannot be read from the probe")
            inner: dict[str, list[torch.Tensor]] = {}  # inner group -> its blocks, per segment
            for axis in axes:
                total += self._segment(group, self.corr[path], axis, inner)
            for blocks in inner.values():
                total += _best_pairing(sum(blocks))
        return total

    def _segment(self, group: PermutationGroup, corr: torch.Tensor, axis: Axis,
                 inner: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        """This segment's share of the group's score. Units hold blocks (heads): when another
        group permutes inside the blocks, the blocks are kept for `_best_pairing`; otherwise
        block entries pair in order. Copies (one per head) pair as the outer group paired."""
        n, r, b = group.size, axis.repeat, axis.block
        span = r * n * b
        sub = corr[axis.start:axis.start + span, axis.start:axis.start + span]
        sub = sub.reshape(r, n, b, r, n, b)
        outer = torch.arange(r)
        for other, a in self._neighbours(axis, group.name):
            if a.block >= b * n:  # permutes our copies
                if (a.block, other.size) != (b * n, r):
                    raise SpecError(f"matching cannot score group {group.name!r} nested in "
                                    f"{other.name!r} this way")
                outer = self.perm(other.name)
            else:  # permutes inside our blocks
                if (a.block * other.size, r) != (b, 1):
                    raise SpecError(f"matching cannot score group {group.name!r} around "
                                    f"{other.name!r} this way")
                inner.setdefault(other.name, []).append(sub[0, :, :, 0])
                return torch.zeros(n, n, dtype=torch.float64)
        paired = sub[torch.arange(r), :, :, outer]  # (r, n, b, n, b): copy o with copy outer[o]
        return paired.diagonal(dim1=2, dim2=4).sum((0, -1))


def _best_pairing(blocks: torch.Tensor) -> torch.Tensor:
    """(n, b, n, b) correlations of n blocks of b units -> (n, n): for each pair of blocks, the
    summed correlation of their units' best one-to-one pairing (the within-block permutation
    is another group's, chosen later)."""
    n = blocks.shape[0]
    out = torch.zeros(n, n, dtype=torch.float64)
    values = blocks.detach().cpu().numpy()
    for u in range(n):
        for v in range(n):
            rows, cols = linear_sum_assignment(values[u, :, v, :], maximize=True)
            out[u, v] = float(values[u, :, v, :][rows, cols].sum())
    return out


def _plain_score(group: PermutationGroup, corr: torch.Tensor) -> torch.Tensor:
    """Summed correlations of a group's probes, each unit holding `run` probe units when the
    probes are wider than the group."""
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
    return corr


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
          *, mode: Mode = "align", progress: bool = False,
          distributed: bool = False) -> Permutation:
    """The permutation to apply to model B's state dict (apply_permutation) for the given mode.

    Args:
        model_a: the reference model; its units keep their order.
        model_b: the model to permute; may be `model_a` itself (TSC stage 1, round 0).
        spec: both models' spec; every group needs probes.
        loader: clean batches; tensors or (input, label, ...) tuples.
        mode: "align" pairs each unit of A with the most correlated unit of B, "unalign" with
            the least correlated one.
        distributed: `loader` is this process's shard of the data (tscpurify.distributed); the
            correlation moments are summed over the processes, which all get one permutation.

    Example:
        >>> perm = match(model, model, spec, loader, mode="unalign")
        >>> far = apply_permutation(model.state_dict(), spec, perm)   # same function
    """
    if mode not in ("align", "unalign"):
        raise SettingsError(f"mode must be 'align' or 'unalign', got {mode!r}")
    stats, keys = _probe_correlations(model_a, model_b, spec, loader, progress, distributed)
    scorer = _Scorer(spec, stats, keys, mode)
    perm = {name: scorer.perm(name) for name in spec.groups}
    # Equal statistics give equal solutions; rank 0's is taken all the same, so no tie broken
    # differently can leave two processes permuting differently.
    return dist.broadcast_object(perm) if distributed else perm
