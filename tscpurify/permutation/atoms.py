"""Atoms and the sets they form while `derive_spec` traces a model.

An atom is one factor of one segment of one state-dict axis: (key, dim, start, length, repeat,
block), read as in `spec.Axis` (the segment of `length` entries holds `repeat` copies of the
atom's units, `block` entries each). Rules link atoms that must move together into sets (a
union-find); each set that a producer's output belongs to, and that nothing pins, becomes a
group.

A set can also be refined: when a reshape splits a hidden-unit axis (3·D → 3 × heads ×
head_dim), every atom of the set is retired and replaced by one atom per factor; when the
outer factor is then picked apart (q, k, v = qkv.unbind(0)), it is pinned and the inner
factors' sets split into one segment per picked index. A retired atom never moves itself; a
later use of it as a whole is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from ..errors import SpecError
from .spec import Axis, _overlap

Atom = tuple[str, int, int, int, int, int]  # (key, dim, start, length, repeat, block)
HINT = ("pass leaf_modules=(...) to keep the enclosing module opaque, or a hand-written spec "
        "(PermutationSpec.from_axes)")


class Part(NamedTuple):
    """Entries start..start+length-1 of a tensor dim, holding `repeat` copies of the units of
    `atom`, `block` entries per unit. A dim holds one part, one per concatenated input, or
    several on the same entries (heads and the units within heads, after a merge)."""

    atom: Atom
    start: int
    length: int
    block: int = 1
    repeat: int = 1


def _geometry(atom: Atom, units: int) -> tuple[Axis, int]:
    key, dim, start, length, repeat, block = atom
    return Axis(key, dim, block, start, length, repeat), units


class AtomSets:
    """A union-find over atoms, with pinning, GroupNorm's coarsening and refinement."""

    def __init__(self) -> None:
        self.parent: dict[Atom, Atom] = {}
        self.units: dict[Atom, int] = {}
        self.whole: dict[Atom, bool] = {}  # the atom's segment is its whole tensor dim
        self.fixed: set[Atom] = set()
        # Per set root: how many of its units move as one (GroupNorm's channels per group).
        self.factor: dict[Atom, int] = {}
        self.live: dict[tuple[str, int], list[Atom]] = {}  # per axis, for overlap checks
        # A retired atom -> (label, atom) for what replaced it.
        self.children: dict[Atom, list[tuple[str, Atom]]] = {}

    def add(self, atom: Atom, units: int, whole: bool = True) -> Atom:
        """Register `atom` with `units` units, or find it again."""
        if atom in self.parent:
            if atom in self.children:
                raise SpecError(f"cannot derive a permutation spec: {atom[0]!r} dim {atom[1]} is "
                                f"used both split by a reshape and whole; {HINT}")
            if self.units[atom] != units:
                raise SpecError(f"cannot derive a permutation spec: {atom[0]!r} dim {atom[1]} "
                                f"is used with {self.units[atom]} and {units} units; {HINT}")
            return self.find(atom)
        new = _geometry(atom, units)
        for other in self.live.get(atom[:2], ()):
            if _overlap(new, _geometry(other, self.units[other])):
                raise SpecError(f"cannot derive a permutation spec: {atom[0]!r} dim {atom[1]} "
                                f"is used with two layouts that cut across each other (blocks "
                                f"{other[5]} and {atom[5]}, entries from {other[2]} and "
                                f"{atom[2]}); {HINT}")
        self.parent[atom], self.units[atom], self.whole[atom] = atom, units, whole
        self.live.setdefault(atom[:2], []).append(atom)
        return atom

    def find(self, atom: Atom) -> Atom:
        while self.parent[atom] != atom:
            self.parent[atom] = atom = self.parent[self.parent[atom]]
        return atom

    def union(self, a: Atom, b: Atom) -> Atom:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra in self.children or rb in self.children:
                raise SpecError(f"cannot derive a permutation spec: {a[0]!r} dim {a[1]} and "
                                f"{b[0]!r} dim {b[1]} must move together, but one of them was "
                                f"split by a reshape and is used whole again; {HINT}")
            if self.units[ra] != self.units[rb]:
                raise SpecError(f"cannot derive a permutation spec: {a} and {b} must move "
                                f"together but hold {self.units[ra]} and {self.units[rb]} units")
            self.parent[rb] = ra
            self.factor[ra] = math.lcm(self.factor.pop(ra, 1), self.factor.pop(rb, 1))
            self._check_factor(ra)
        return ra

    def members(self, atom: Atom) -> list[Atom]:
        root = self.find(atom)
        return [a for a in self.parent if self.find(a) == root]

    def coarsen(self, atom: Atom, factor: int) -> None:
        """Make the set of `atom` move in runs of `factor` consecutive units (its units become
        blocks): GroupNorm keeps its function only when whole groups move, unchanged inside.
        Two such demands on one set (groups of 4 and of 8 channels) keep both: the lcm."""
        root = self.find(atom)
        self.factor[root] = math.lcm(self.factor.get(root, 1), factor)
        self._check_factor(root)

    def _check_factor(self, root: Atom) -> None:
        if self.units[root] % self.factor.get(root, 1):
            raise SpecError(f"cannot derive a permutation spec: {root[0]!r} dim {root[1]} has "
                            f"{self.units[root]} units, which groups of "
                            f"{self.factor[root]} do not divide; {HINT}")

    def group_units(self, root: Atom) -> int:
        """The units the set's permutation moves (whole groups, when coarsened)."""
        return self.units[root] // self.factor.get(root, 1)

    def axis_block(self, atom: Atom) -> int:
        """Entries per moved unit along `atom`'s axis."""
        return atom[5] * self.factor.get(self.find(atom), 1)

    # Refinement.
    def _refine(self, atom: Atom, replace: Callable[[Atom], list[tuple[str, Atom, int]]],
                segments: bool) -> dict[str, Atom]:
        """Retire every atom of `atom`'s set; `replace(member)` names its (label, new atom,
        units), segments of it or factors of its whole segment. New atoms with one label form
        one set. Returns `atom`'s own, by label."""
        if self.factor.get(self.find(atom), 1) > 1:
            raise SpecError(f"cannot derive a permutation spec: {atom[0]!r} dim {atom[1]} is "
                            f"split by a reshape after a GroupNorm grouped it; {HINT}")
        members = self.members(atom)
        plan = {m: replace(m) for m in members}
        for m in members:
            self.live[m[:2]].remove(m)
            self.children[m] = [(label, new) for label, new, _ in plan[m]]
        by_label: dict[str, Atom] = {}
        for m in members:
            for label, new, units in plan[m]:
                self.add(new, units, self.whole[m] and not segments)
                by_label[label] = (self.union(by_label[label], new) if label in by_label
                                   else new)
        return {label: new for label, new, _ in plan[atom]}

    def split(self, atom: Atom, sizes: tuple[int, ...]) -> list[Atom]:
        """A reshape turns the units of `atom` into dims of `sizes` (row-major): one atom per
        factor, factor j moving blocks of the factors after it, once per index of those before.
        """
        def replace(m: Atom) -> list[tuple[str, Atom, int]]:
            key, dim, start, length, repeat, block = m
            return [(str(j), (key, dim, start, length, repeat * math.prod(sizes[:j]),
                              block * math.prod(sizes[j + 1:])), size)
                    for j, size in enumerate(sizes)]
        if math.prod(sizes) != self.units[atom]:
            raise SpecError(f"internal: split of {self.units[atom]} units into {sizes}")
        new = self._refine(atom, replace, segments=False)
        return [new[str(j)] for j in range(len(sizes))]

    def pick(self, atom: Atom, outer: Atom, index: int) -> Atom:
        """The atom that carries `atom`'s units at `index` of the (pinned) outer factor `outer`,
        when `atom`'s copies run over it: its set is split into one segment per index the
        first time. Otherwise `atom` itself (its units then move alike at every index)."""
        if atom in self.children:
            return dict(self.children[atom]).get(f"[{index}]", atom)
        outer_size = self.units[outer]
        outer_members = {m[:4]: m for m in self.members(outer)}

        def copies_run_over_outer(m: Atom) -> bool:
            key, dim, start, length, repeat, block = m
            o = outer_members.get((key, dim, start, length))
            return (o is not None and o[4] == 1 and repeat % outer_size == 0
                    and o[5] == repeat // outer_size * self.units[m] * block)

        members = self.members(atom)
        if outer_size < 2 or not all(copies_run_over_outer(m) for m in members):
            return atom
        # The outer factor never moves, so segments inside it cannot collide with it.
        self.fixed.add(outer)
        for o in outer_members.values():
            if o in self.live[o[:2]]:
                self.live[o[:2]].remove(o)

        def replace(m: Atom) -> list[tuple[str, Atom, int]]:
            key, dim, start, length, repeat, block = m
            inner, step = repeat // outer_size, length // outer_size
            return [(f"[{s}]", (key, dim, start + s * step, step, inner, block), self.units[m])
                    for s in range(outer_size)]
        return self._refine(atom, replace, segments=True)[f"[{index}]"]

    def resolve_fixed(self) -> set[Atom]:
        """The roots of pinned sets; a pinned set pins whatever it was refined into."""
        fixed = {self.find(a) for a in self.fixed}
        changed = True
        while changed:
            changed = False
            for m, kids in self.children.items():
                if self.find(m) in fixed:
                    for _, kid in kids:
                        if (root := self.find(kid)) not in fixed:
                            fixed.add(root)
                            changed = True
        return fixed

    def leaves(self, atom: Atom, label: str = "") -> list[tuple[str, Atom]]:
        """`atom`, or what it was refined into (recursively), with labels such as '/1[0]'."""
        if atom not in self.children:
            return [(label, atom)]
        out = []
        for part, kid in self.children[atom]:
            out += self.leaves(kid, label + (part if part.startswith("[") else f"/{part}"))
        return out
