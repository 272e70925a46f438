"""A model's permutation symmetry as plain data (TSC building block: permutation symmetry).

Permuting a layer's hidden units, together with every parameter and buffer axis that carries them
(bias, BatchNorm statistics, the next layer's input axis), leaves the network's function
unchanged. A `PermutationSpec` lists those symmetries as groups in topological order; each group
is one permutation, the state-dict axes it moves (`params`) and the layers whose outputs carry its
units (`probes`, the features used by activation matching). `derive_spec` builds one by tracing;
`PermutationSpec.from_axes` is the escape hatch for models that cannot be traced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from ..errors import SpecError

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Axis:
    """One axis of one state-dict entry, or one segment of it.

    The moved entries form a segment of `repeat` × size × `block` entries (size: the group's),
    read row-major as (repeat, unit, block): the group permutes the units, each carrying its
    `block` contiguous entries, alike in each of the `repeat` copies. The defaults are the whole
    axis, one unit per entry.

    Attributes:
        key: the state-dict key, e.g. "layer1.0.conv1.weight".
        dim: the axis of that tensor which moves.
        block: entries per unit, e.g. a Linear after flattening C×H×W has one block of H·W
            inputs per channel; an attention head is a block of head_dim entries.
        start: the segment's first entry: a layer reading a channel concatenation has one
            segment per concatenated input, each moved by that input's own group.
        length: the segment's entries; None: the whole axis (then start is 0).
        repeat: copies of the units inside the segment, e.g. a within-head permutation shared
            by every head has one copy per head. Two groups may share a segment when they move
            different factors of it (heads, and units within heads).
    """

    key: str
    dim: int
    block: int = 1
    start: int = 0
    length: int | None = None
    repeat: int = 1

    def entries(self, size: int) -> int:
        """Entries of the segment, for a group of `size` units."""
        return self.repeat * size * self.block


@dataclass(frozen=True)
class PermutationGroup:
    """One hidden-unit permutation.

    Attributes:
        name: readable name, by convention the first layer producing the units.
        size: number of units permuted.
        params: every state-dict axis that moves with the units.
        probes: module paths (state-dict style) of the Linear/Conv layers whose output carries
            the units, before any normalisation or activation; empty if unknown.
    """

    name: str
    size: int
    params: tuple[Axis, ...]
    probes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PermutationSpec:
    """The groups of a model, in topological order; read-only once built.

    Example:
        >>> spec = derive_spec(create_model("mlp"), torch.rand(2, 1, 28, 28))
        >>> spec.axes_of("4.weight")                # ('4', '2'): its units, the inputs' group
    """

    groups: Mapping[str, PermutationGroup]
    # Derived view: key -> ((group name, axis), ...); the groups stay the one source of truth.
    _by_key: Mapping[str, tuple[tuple[str, Axis], ...]] = field(
        init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        groups = dict(self.groups)
        by_key: dict[str, list[tuple[str, Axis]]] = {}
        for name, group in groups.items():
            if name != group.name:
                raise SpecError(f"group stored under {name!r} is named {group.name!r}")
            if group.size < 1:
                raise SpecError(f"group {name!r} has size {group.size}; it must be at least 1")
            for axis in group.params:
                if axis.block < 1 or axis.dim < 0 or axis.repeat < 1 or axis.start < 0:
                    raise SpecError(f"group {name!r}: axis {axis} needs dim >= 0, start >= 0, "
                                    f"block >= 1 and repeat >= 1")
                if axis.length is None and axis.start:
                    raise SpecError(f"group {name!r}: axis {axis} starts past 0, so it needs "
                                    f"its length")
                if axis.length is not None and axis.length != axis.entries(group.size):
                    raise SpecError(f"group {name!r} (size {group.size}): axis {axis} has "
                                    f"length {axis.length}, not repeat × size × block = "
                                    f"{axis.entries(group.size)}")
                for other_name, other in by_key.get(axis.key, ()):
                    if other.dim == axis.dim and _overlap((axis, group.size),
                                                          (other, groups[other_name].size)):
                        raise SpecError(f"axis {axis.dim} of {axis.key!r} is listed twice "
                                        f"(groups {other_name!r} and {name!r}) on overlapping "
                                        f"entries")
                by_key.setdefault(axis.key, []).append((name, axis))
        object.__setattr__(self, "groups", MappingProxyType(groups))
        object.__setattr__(self, "_by_key",
                           MappingProxyType({k: tuple(v) for k, v in by_key.items()}))

    @property
    def keys(self) -> tuple[str, ...]:
        """The state-dict keys that at least one group moves."""
        return tuple(self._by_key)

    def entries(self, key: str) -> tuple[tuple[str, Axis], ...]:
        """The (group name, axis) pairs acting on `key`; empty if the entry never moves."""
        return self._by_key.get(key, ())

    def axes_of(self, key: str, ndim: int | None = None
                ) -> tuple[str | tuple[str, ...] | None, ...]:
        """The group acting on each axis of `key` (None: fixed), git-re-basin's axes_to_perm.

        An axis moved by several groups (segments of a concatenation, heads and units within
        heads) gets the tuple of their names, by first entry then outermost factor. Without
        `ndim` the tuple stops at the last permuted axis.
        """
        entries = self.entries(key)
        last = max((axis.dim for _, axis in entries), default=-1)
        if ndim is not None and ndim <= last:
            raise SpecError(f"{key!r}: the spec permutes dim {last} but ndim is {ndim}")
        names: list[list[str]] = [[] for _ in range(ndim if ndim is not None else last + 1)]
        for name, axis in sorted(entries, key=lambda e: (e[1].start, e[1].repeat)):
            names[axis.dim].append(name)
        return tuple(None if not n else n[0] if len(n) == 1 else tuple(n) for n in names)

    def validate(self, state_dict: StateDict) -> None:
        """Raise SpecError unless every axis exists in `state_dict` with its entries: the whole
        axis holds repeat·size·block of them, a segment fits inside it."""
        for group in self.groups.values():
            for axis in group.params:
                if axis.key not in state_dict:
                    raise SpecError(f"group {group.name!r}: key {axis.key!r} is not in the "
                                    f"state dict")
                shape = tuple(state_dict[axis.key].shape)
                if axis.dim >= len(shape):
                    raise SpecError(f"group {group.name!r}: {axis.key!r} has shape {shape}, "
                                    f"no dim {axis.dim}")
                need = axis.entries(group.size)
                if axis.length is not None:
                    if axis.start + need > shape[axis.dim]:
                        raise SpecError(
                            f"group {group.name!r}: {axis.key!r} dim {axis.dim} has size "
                            f"{shape[axis.dim]}, too small for entries {axis.start}.."
                            f"{axis.start + need - 1}")
                elif shape[axis.dim] != need:
                    scheme = f"× block {axis.block}" + (f" × repeat {axis.repeat}"
                                                        if axis.repeat > 1 else "")
                    raise SpecError(
                        f"group {group.name!r} (size {group.size}): {axis.key!r} dim {axis.dim} "
                        f"has size {shape[axis.dim]}, expected {group.size} {scheme} = {need}")

    def coverage(self, state_dict: StateDict) -> float:
        """Share of floating-point state-dict elements in entries that some group moves."""
        floats = {k: v.numel() for k, v in state_dict.items() if v.is_floating_point()}
        total = sum(floats.values())
        return sum(n for k, n in floats.items() if k in self._by_key) / total if total else 0.0

    @classmethod
    def from_axes(cls, axes: Mapping[str, Sequence[str | tuple[str, int] | None]],
                  state_dict: StateDict, *,
                  probes: Mapping[str, Sequence[str]] | None = None) -> PermutationSpec:
        """A hand-written spec, for models `derive_spec` cannot trace.

        Args:
            axes: for each state-dict key that moves, the group acting on each of its axes:
                a name, (name, block) for a block axis, or None for a fixed axis. Trailing fixed
                axes may be left out. Groups come out in order of first mention, so list the
                keys in forward order.
            state_dict: gives the group sizes (axis size // block) and checks consistency.
            probes: group name -> module paths of the layers producing the group; needed by
                `match`, not by `apply_permutation`.

        Example:
            >>> PermutationSpec.from_axes({"1.weight": ("h", None), "1.bias": ("h",),
            ...                            "3.weight": (None, "h")}, sd, probes={"h": ["1"]})
        """
        sizes: dict[str, int] = {}
        params: dict[str, list[Axis]] = {}
        for key, per_dim in axes.items():
            if key not in state_dict:
                raise SpecError(f"from_axes: key {key!r} is not in the state dict")
            shape = tuple(state_dict[key].shape)
            if len(per_dim) > len(shape):
                raise SpecError(f"from_axes: {key!r} has shape {shape} but {len(per_dim)} axes "
                                f"were given")
            for dim, entry in enumerate(per_dim):
                if entry is None:
                    continue
                name, block = (entry, 1) if isinstance(entry, str) else entry
                size, rest = divmod(shape[dim], block)
                if rest or size == 0:
                    raise SpecError(f"from_axes: {key!r} dim {dim} has size {shape[dim]}, not a "
                                    f"multiple of block {block}")
                if sizes.setdefault(name, size) != size:
                    raise SpecError(f"from_axes: group {name!r} has size {sizes[name]} but "
                                    f"{key!r} dim {dim} gives {size}")
                params.setdefault(name, []).append(Axis(key, dim, block))
        probes = dict(probes or {})
        unknown = sorted(set(probes) - set(params))
        if unknown:
            raise SpecError(f"from_axes: probes given for unknown groups {unknown}")
        return cls({name: PermutationGroup(name, sizes[name], tuple(group_params),
                                           tuple(probes.get(name, ())))
                    for name, group_params in params.items()})


def _overlap(a: tuple[Axis, int], b: tuple[Axis, int]) -> bool:
    """Whether two axes of one tensor dim (each with its group's size) would move an entry
    twice, or cut across each other's units. Segments that do not meet never do. Axes on one
    segment are fine when they permute different factors of it (heads, and units within
    heads), which commute; a segment lying on whole copies of a repeated axis sees that axis
    as the same permutation, repeated fewer times."""
    (x, nx), (y, ny) = a, b
    (xs, xl), (ys, yl) = ((ax.start, ax.length if ax.length is not None else ax.entries(n))
                          for ax, n in ((x, nx), (y, ny)))
    if xs + xl <= ys or ys + yl <= xs:
        return False
    if (xs, xl) != (ys, yl):
        (big, nb), (small, _) = sorted(((x, nx), (y, ny)),
                                       key=lambda ax: -(ax[0].length or ax[0].entries(ax[1])))
        bs, bl = (xs, xl) if big is x else (ys, yl)
        ss, sl = (ys, yl) if big is x else (xs, xl)
        span = nb * big.block
        if ss < bs or ss + sl > bs + bl or (ss - bs) % span or sl % span:
            return True
        restricted = Axis(big.key, big.dim, big.block, ss, sl, sl // span)
        (x, nx), (y, ny) = (restricted, nb), (small, ny if big is x else nx)
    # Read as one mixed radix, the inner factor's span (block·size) divides the outer's block.
    inner, outer = sorted(((x, nx), (y, ny)), key=lambda axis: axis[0].block)
    return outer[0].block % (inner[0].block * inner[1]) != 0
