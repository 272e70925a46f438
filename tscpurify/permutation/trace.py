"""Derive a model's PermutationSpec by symbolic tracing (torch.fx), so no architecture needs a
hand-written spec.

Plan:
1. Trace the model with fx (leaf_modules stay opaque) and run the graph on the example input,
   so every node has a real value and shape (needed for flatten's H·W blocks).
2. Each node records which dims of its output carry hidden units: dim -> parts (usually one;
   one per concatenated input; heads and units within heads after a merge). Atoms are
   state-dict axes, segments or factors of them (atoms.py); one rule per op kind links atoms in
   a union-find, and a reshape that splits a unit axis refines its set.
3. Atoms that reach the model's output, or meet an untracked axis of the same size (the input,
   a constant, an opaque module), are fixed: their whole set never moves.
4. Every set that holds the output axis of a Linear/Conv (a producer) and is not fixed becomes a
   group named after its first producer; its producers are its probes. A MultiheadAttention
   produces its heads and within-head units ('attn/heads', 'attn/qk', 'attn/v'); a producer
   whose units a reshape split names each factor ('qkv/1', or 'qkv/1[0]' for q's share).
Ops without a rule raise SpecError unless none of their inputs carries hidden units.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import SpecError
from .atoms import HINT, Atom, AtomSets, Part
from .rules import FUNCTION_RULES, METHOD_RULES, MODULE_RULES, Axes, Rule, opaque
from .spec import Axis, PermutationGroup, PermutationSpec

_SCOPE = "tscpurify_scope"
_SPEC_HINT = "a hand-written spec (PermutationSpec.from_axes)"


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return isinstance(value, torch.Tensor)


class _Tracer(fx.Tracer):
    """fx tracer that records the module path each node is created in, for error messages."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_paths: set[str]) -> None:
        super().__init__()
        self.leaf_types, self.leaf_paths = leaf_types, leaf_paths
        self.failed_in: str | None = None
        self.record_stack_traces = True  # so an error can name the user's source line

    def is_user_leaf(self, m: nn.Module, path: str) -> bool:
        return isinstance(m, self.leaf_types) or path in self.leaf_paths

    def is_leaf_module(self, m: nn.Module, path: str) -> bool:
        return self.is_user_leaf(m, path) or super().is_leaf_module(m, path)

    def call_module(self, m: nn.Module, forward: Callable, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The innermost module sees the failure first; that is the one to name.
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta[_SCOPE] = self.scope.module_path  # fx's own record of the enclosing module
        return node


_TORCH_DIR = str(Path(torch.__file__).parent)


def source_line(n: fx.Node) -> str:
    """' (file.py:42: the code)' for the user's line that made node `n`, '' when fx kept none:
    the innermost recorded frame outside torch and this tracer."""
    lines = (n.stack_trace or "").splitlines()
    found = ""
    for i, line in enumerate(lines):
        frame = re.match(r'\s*File "([^"]+)", line (\d+), in ', line)
        if frame is None or frame.group(1).startswith(_TORCH_DIR) or frame.group(1) == __file__:
            continue  # fx's frames and our tracer's, not the model's
        following = lines[i + 1].strip() if i + 1 < len(lines) else ""
        code = "" if following.startswith("File ") else following
        found = f" ({Path(frame.group(1)).name}:{frame.group(2)}{': ' + code if code else ''})"
    return found


class Propagator(fx.Interpreter):
    """Runs the traced graph and, node by node, which output dims carry which atoms."""

    def __init__(self, gm: fx.GraphModule, state_shapes: dict[str, tuple[int, ...]],
                 opaque_paths: set[str]) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # our errors name the op and module; fx's dump adds noise
        self.state_shapes, self.opaque = state_shapes, opaque_paths
        self.uf = AtomSets()
        self.axes: dict[fx.Node, Axes] = {}
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        # (probe path, atom, group name): the layers whose outputs carry a set's units.
        self.producers: list[tuple[str, Atom, str]] = []
        # A node returning a tuple (MultiheadAttention, chunk): the axes of each element.
        self.items: dict[fx.Node, list[Axes]] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.shapes[n] = tuple(result.shape)
        self.axes[n] = self._propagate(n, result)
        return result

    def _propagate(self, n: fx.Node, result: Any) -> Axes:
        if n.op == "placeholder":
            return {}  # the network input is never permuted
        if n.op == "get_attr":
            if not isinstance(result, torch.Tensor) or n.target not in self.state_shapes:
                return {}  # a constant outside the state dict cannot move
            return {d: (Part(self.uf.add((n.target, d, 0, s, 1, 1), s), 0, s),)
                    for d, s in enumerate(result.shape)}
        if n.op == "output":
            self.fix(n.all_input_nodes)
            return {}
        rule = self._rule(n)
        if rule is not None:
            return rule(self, n, result)
        if not any(self.axes[i] or self.items.get(i) for i in n.all_input_nodes):
            return {}  # nothing permuted flows in, so nothing to reason about
        if not _holds_tensor(result):
            return {}  # metadata such as x.size(0)
        raise self.unsupported(n, "has no rule for hidden units (it may mix channels)")

    def _rule(self, n: fx.Node) -> Rule | None:
        if n.op == "call_module":
            if n.target in self.opaque:
                return opaque
            module = self.fetch_attr(n.target)
            return next((rule for types, rule in MODULE_RULES if isinstance(module, types)), None)
        if n.op == "call_function":
            return FUNCTION_RULES.get(n.target)
        return METHOD_RULES.get(n.target)

    # Helpers for the rules.
    def axes_of(self, arg: Any) -> Axes:
        return self.axes.get(arg, {}) if isinstance(arg, fx.Node) else {}

    def fix(self, nodes: Sequence[fx.Node]) -> None:
        for node in nodes:
            self.fix_axes(self.axes[node])
            for item in self.items.get(node, ()):  # a tuple (chunk, MultiheadAttention)
                self.fix_axes(item)

    def fix_axes(self, axes: Axes) -> None:
        self.uf.fixed.update(part.atom for parts in axes.values() for part in parts)

    def param(self, key: str, dim: int, size: int, block: int = 1) -> Atom:
        """The atom of a whole state-dict axis of `size` entries."""
        return self.segment(key, dim, 0, size, block)

    def segment(self, key: str, dim: int, start: int, length: int, block: int = 1,
                repeat: int = 1) -> Atom:
        """The atom of entries start..start+length-1 of a state-dict axis, holding `repeat`
        copies of its units (Axis.repeat)."""
        if key not in self.state_shapes:
            raise SpecError(f"cannot derive a permutation spec: {key!r} is not a state-dict "
                            f"entry (a parametrized weight?); {HINT}")
        whole = start == 0 and length == self.state_shapes[key][dim]
        return self.uf.add((key, dim, start, length, repeat, block), length // (repeat * block),
                           whole)

    def tie(self, n: fx.Node, parts: tuple[Part, ...], key: str, dim: int) -> None:
        """Move axis `dim` of `key` with the hidden units `parts` of a tensor dim it reads (or
        scales), entry for entry; entries of no part stay."""
        size = self.state_shapes[key][dim]
        for part in parts:
            if part.start + part.length > size:
                raise self.unsupported(n, f"reads hidden units up to entry "
                                          f"{part.start + part.length} with the {size} entries "
                                          f"of {key!r} dim {dim}")
            self.uf.union(part.atom, self.segment(key, dim, part.start, part.length, part.block,
                                                  part.repeat))

    def produce(self, n: fx.Node, module: nn.Module, size: int) -> Atom:
        atom = self.param(f"{n.target}.weight", 0, size)
        if getattr(module, "bias", None) is not None:
            atom = self.uf.union(atom, self.param(f"{n.target}.bias", 0, size))
        self.producers.append((str(n.target), atom, str(n.target)))
        return atom

    def unsupported(self, n: fx.Node, why: str) -> SpecError:
        if n.op == "call_module":
            kind = type(self.fetch_attr(n.target)).__name__
            what, where = f"module {kind}", str(n.target)
            hint = f"pass leaf_modules=({kind},) to keep it opaque, or {_SPEC_HINT}"
        else:
            name = getattr(n.target, "__name__", n.target)
            what = f"{'method' if n.op == 'call_method' else 'op'} {name!r}"
            where = n.meta.get(_SCOPE) or "<top level>"
            hint = (f"pass leaf_modules=({where!r},) to keep the enclosing module opaque, or "
                    f"{_SPEC_HINT}" if where != "<top level>" else f"pass {_SPEC_HINT}")
        return SpecError(f"cannot derive a permutation spec: {what} at {where!r}{source_line(n)} "
                         f"{why}; {hint}")

    def spec(self) -> PermutationSpec:
        uf = self.uf
        fixed = uf.resolve_fixed()
        probes: dict[Atom, list[str]] = {}
        names: dict[Atom, str] = {}
        for path, produced, name in self.producers:
            for label, atom in uf.leaves(produced):  # what a split reshape made of its units
                root = uf.find(atom)
                if root not in fixed and uf.group_units(root) > 1 \
                        and path not in probes.get(root, []):
                    probes.setdefault(root, []).append(path)
                    names.setdefault(root, name + label)
        params: dict[Atom, list[Axis]] = {root: [] for root in probes}
        for atom in uf.parent:
            if atom not in uf.children and (root := uf.find(atom)) in params:
                key, dim, start, length, repeat, _ = atom
                params[root].append(Axis(key, dim, uf.axis_block(atom), start,
                                         None if uf.whole[atom] else length, repeat))
        return PermutationSpec({names[r]: PermutationGroup(names[r], uf.group_units(r),
                                                           tuple(params[r]), tuple(p))
                                for r, p in probes.items()})


def derive_spec(model: nn.Module, example_input: torch.Tensor | tuple[torch.Tensor, ...], *,
                leaf_modules: Sequence[type[nn.Module] | str] = ()) -> PermutationSpec:
    """The permutation symmetry of `model`, found by tracing it.

    Args:
        model: any nn.Module fx can trace; it is not modified (run in eval mode, flags restored).
        example_input: one batch (or a tuple of positional inputs); gives the shapes.
        leaf_modules: module types or paths fx must not trace into (e.g. data-dependent control
            flow). They are opaque: no group passes through them and their parameters never move.

    Raises:
        SpecError: naming the op and module path that cannot be reasoned about, or the module
            fx failed to trace.

    Example:
        >>> spec = derive_spec(create_model("cnn", width=8), torch.rand(2, 1, 28, 28))
        >>> list(spec.groups)                       # ['1', '4', '8', '11', '16']
    """
    paths = {m for m in leaf_modules if isinstance(m, str)}
    unknown = sorted(paths - {name for name, _ in model.named_modules()})
    if unknown:
        raise SpecError(f"leaf_modules names {unknown}, which are not modules of the model")
    tracer = _Tracer(tuple(m for m in leaf_modules if isinstance(m, type)), paths)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    device = next((t.device for t in model.state_dict().values()), None)
    inputs = tuple(x.to(device) if device is not None else x for x in inputs)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()  # the graph must be eval's, and BatchNorm statistics must not change
    try:
        try:
            graph = tracer.trace(model)
        except Exception as err:
            where = tracer.failed_in
            hint = (f"pass leaf_modules=({where!r},) to keep it opaque, or {_SPEC_HINT}" if where
                    else f"pass {_SPEC_HINT}")
            raise SpecError(f"cannot derive a permutation spec: torch.fx cannot trace "
                            f"{where or '<top level>'!r} ({type(err).__name__}: {err}); "
                            f"data-dependent control flow is the usual cause; {hint}") from err
        gm = fx.GraphModule(model, graph)
        opaque_paths = {str(n.target) for n in graph.nodes if n.op == "call_module"
                        and tracer.is_user_leaf(gm.get_submodule(str(n.target)), str(n.target))}
        prop = Propagator(gm, {k: tuple(v.shape) for k, v in model.state_dict().items()},
                          opaque_paths)
        with torch.no_grad():
            try:
                prop.run(*inputs)
            except SpecError:
                raise
            except Exception as err:
                raise SpecError(f"running the traced model on example_input failed: "
                                f"{type(err).__name__}: {err}") from err
    finally:
        for module, training in flags:
            module.training = training
    spec = prop.spec()
    spec.validate(model.state_dict())
    return spec
