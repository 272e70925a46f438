"""The per-op rules of `derive_spec`: how each op moves the hidden-unit axes of its inputs.

A rule gets the propagator, the fx node and the node's real output; it links the atoms
(state-dict axes, segments or factors of them: atoms.py) that must move together and returns,
for the output, dim -> parts. A dim usually has one part; a concatenation has one per input,
and a merge of heads with their units has two on the same entries. To support a new op, add a
rule here; an op without one raises SpecError when hidden units flow into it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .atoms import Atom, Part

if TYPE_CHECKING:
    from .trace import Propagator

Axes = dict[int, tuple[Part, ...]]  # output dim -> its parts
Rule = Callable[["Propagator", fx.Node, Any], Axes]


def _one(atom: Atom, length: int) -> tuple[Part, ...]:
    return (Part(atom, 0, length),)


def _shift(parts: Sequence[Part], offset: int) -> tuple[Part, ...]:
    return tuple(part._replace(start=part.start + offset) for part in parts)


def _arg(n: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def opaque(p: Propagator, n: fx.Node, result: Any) -> Axes:
    # A user leaf: its inside is unknown, so whatever flows in stays put, and nothing flows out.
    p.fix(n.all_input_nodes)
    return {}


def _same(p: Propagator, n: fx.Node, result: Any) -> Axes:
    src = _arg(n, 0, "input")
    if isinstance(result, torch.Tensor) and p.shapes.get(src) == tuple(result.shape):
        return dict(p.axes_of(src))
    raise p.unsupported(n, "changes the shape of its input")


def _join(p: Propagator, found: list[tuple[Part, ...]], pinned: bool) -> tuple[Part, ...] | None:
    """Parts that meet entry for entry (operands of a sum, inputs of a cat off its dim) move
    together; a part that meets an untracked operand (`pinned`), or entries cut another way,
    is fixed."""
    layouts = [{(q.start, q.length, q.block, q.repeat): q.atom for q in parts} for parts in found]
    shared = set.intersection(*(set(lay) for lay in layouts)) if layouts and not pinned else set()
    joined = []
    for lay in layouts:
        p.uf.fixed.update(atom for where, atom in lay.items() if where not in shared)
    for where in sorted(shared):
        atom = layouts[0][where]
        for lay in layouts[1:]:
            atom = p.uf.union(atom, lay[where])
        joined.append(Part(atom, *where))
    return tuple(joined) or None


def _elementwise(p: Propagator, n: fx.Node, result: Any) -> Axes:
    """Broadcasting op: operands aligned on an output dim move together; an operand with an
    untracked axis of full size there (input, constant) pins that dim."""
    if not isinstance(result, torch.Tensor):
        return {}  # arithmetic on sizes, e.g. x.size(0) * 2
    operands = [a for a in (*n.args, *n.kwargs.values())
                if isinstance(a, fx.Node) and a in p.shapes]
    out_shape, axes = tuple(result.shape), {}
    for d in range(len(out_shape)):
        found, pinned = [], False
        for a in operands:
            od = d - len(out_shape) + len(p.shapes[a])
            if od < 0 or (p.shapes[a][od] == 1 and out_shape[d] != 1):
                continue
            if od in p.axes[a]:
                found.append(p.axes[a][od])
            else:
                pinned = True
        if (parts := _join(p, found, pinned)) is not None:
            axes[d] = parts
    return axes


def _cat(p: Propagator, n: fx.Node, result: Any) -> Axes:
    """Concatenation: along `dim` the output holds each input's parts in turn (DenseNet's
    channels: each input keeps its own group, a consumer reads one segment per input); on the
    other dims the inputs meet entry for entry, as in a sum."""
    tensors, dim = _arg(n, 0, "tensors"), _arg(n, 1, "dim", 0)
    nd = result.dim()
    dim %= nd
    inputs = [t for t in tensors if not isinstance(t, torch.Tensor) or t.numel()]
    axes: Axes = {}
    along: list[Part] = []
    offset = 0
    for t in inputs:
        along.extend(_shift(p.axes_of(t).get(dim, ()), offset))
        offset += p.shapes[t][dim] if isinstance(t, fx.Node) else t.shape[dim]
    if along:
        axes[dim] = tuple(along)
    for d in range(nd):
        if d == dim:
            continue
        found = [p.axes_of(t)[d] for t in inputs if d in p.axes_of(t)]
        pinned = any(d not in p.axes_of(t) for t in inputs)
        if (parts := _join(p, found, pinned)) is not None:
            axes[d] = parts
    return axes


def _linear(p: Propagator, n: fx.Node, result: Any) -> Axes:
    module, src = p.fetch_attr(n.target), p.axes_of(n.args[0])
    last = result.dim() - 1
    axes = {d: ax for d, ax in src.items() if d != last}
    if last in src:
        p.tie(n, src[last], f"{n.target}.weight", 1)
    axes[last] = _one(p.produce(n, module, module.out_features), module.out_features)
    return axes


def _conv(p: Propagator, n: fx.Node, result: Any) -> Axes:
    module, src = p.fetch_attr(n.target), p.axes_of(n.args[0])
    if set(src) - {1}:
        raise p.unsupported(n, "convolves over a hidden-unit axis")
    if module.groups == 1:
        if 1 in src:
            p.tie(n, src[1], f"{n.target}.weight", 1)
        return {1: _one(p.produce(n, module, module.out_channels), module.out_channels)}
    if module.groups == module.in_channels == module.out_channels:
        # Depthwise: output channel c sees only input channel c, so both move together.
        if 1 not in src:
            return {}
        p.tie(n, src[1], f"{n.target}.weight", 0)
        if module.bias is not None:
            p.tie(n, src[1], f"{n.target}.bias", 0)
        return {1: src[1]}
    raise p.unsupported(n, f"has groups={module.groups} (only 1 or depthwise are supported)")


def _norm_params(p: Propagator, n: fx.Node, names: Sequence[str], dims: dict[int, int],
                 outer: int = 0) -> Axes:
    """Per-unit tensors `names` (dim k) follow input dim d for each d -> k in `dims`; dims below
    `outer` are independent rows and pass through."""
    module, src = p.fetch_attr(n.target), p.axes_of(n.args[0])
    for d, parts in src.items():
        if d < outer:
            continue
        if d not in dims:
            raise p.unsupported(n, f"normalises over hidden-unit dim {d}")
        for name in names:
            if getattr(module, name, None) is not None:
                p.tie(n, parts, f"{n.target}.{name}", dims[d])
    return dict(src)


def _channel_norm(p: Propagator, n: fx.Node, result: Any) -> Axes:
    # BatchNorm / InstanceNorm: statistics per channel (dim 1), so channels may move freely.
    return _norm_params(p, n, ("weight", "bias", "running_mean", "running_var"), {1: 0})


def _group_norm(p: Propagator, n: fx.Node, result: Any) -> Axes:
    # Statistics per group of consecutive channels: permuting whole groups (each kept in its
    # order) keeps the function, so with 1 < groups < channels the channels move in groups.
    module, src = p.fetch_attr(n.target), p.axes_of(n.args[0])
    if 1 < module.num_groups < module.num_channels and 1 in src:
        if len(src[1]) > 1:
            raise p.unsupported(n, "normalises groups of a concatenation")
        p.uf.coarsen(src[1][0].atom, module.num_channels // module.num_groups)
    return _norm_params(p, n, ("weight", "bias"), {1: 0})


def _layer_norm(p: Propagator, n: fx.Node, result: Any) -> Axes:
    # Statistics over the last k dims are symmetric in them; the affine follows each unit.
    k, nd = len(p.fetch_attr(n.target).normalized_shape), result.dim()
    return _norm_params(p, n, ("weight", "bias"), {d: d - nd + k for d in range(nd - k, nd)},
                        outer=nd - k)


def _flatten_dims(p: Propagator, n: fx.Node, src: fx.Node, start: int, end: int) -> Axes:
    """Merge dims start..end (row-major): a unit axis there moves blocks of the entries of the
    dims after it, once per index of the dims before it (Axis.repeat): C×H×W gives blocks of
    H·W per channel; heads × head_dim gives head blocks and units repeated per head."""
    shape, axes = p.shapes[src], p.axes_of(src)
    if not shape:
        return {}
    start, end = start % len(shape), end % len(shape)
    out: Axes = {d if d < start else d - (end - start): parts for d, parts in axes.items()
                 if not start <= d <= end}
    merged: list[Part] = []
    for d in range(start, end + 1):
        outer, inner = math.prod(shape[start:d]), math.prod(shape[d + 1:end + 1])
        for part in axes.get(d, ()):
            if outer > 1 and (part.start, part.length) != (0, shape[d]):
                raise p.unsupported(n, "flattens a segment of a hidden-unit axis inside an "
                                       "outer one")
            merged.append(Part(part.atom, part.start * inner,
                               part.length * inner * outer, part.block * inner,
                               part.repeat * outer))
    if merged:
        out[start] = tuple(merged)
    return out


def _flatten_module(p: Propagator, n: fx.Node, result: Any) -> Axes:
    module = p.fetch_attr(n.target)
    return _flatten_dims(p, n, n.args[0], module.start_dim, module.end_dim)


def _flatten(p: Propagator, n: fx.Node, result: Any) -> Axes:
    start, end = _arg(n, 1, "start_dim", 0), _arg(n, 2, "end_dim", -1)
    return _flatten_dims(p, n, _arg(n, 0, "input"), start, end)


def _reshape(p: Propagator, n: fx.Node, result: Any) -> Axes:
    """Any row-major reshape (view, squeeze, ...), judged from the shapes alone: a merge of one
    run of dims is a flatten; a split of one dim into several factors its units (heads ×
    head_dim); otherwise every unit axis must lie in the unchanged prefix or suffix."""
    src = _arg(n, 0, "input")
    s, o, axes = p.shapes[src], tuple(result.shape), p.axes_of(src)
    pre = 0
    while pre < min(len(s), len(o)) and s[pre] == o[pre]:
        pre += 1
    suf = 0
    while suf < min(len(s), len(o)) - pre and s[-1 - suf] == o[-1 - suf]:
        suf += 1
    mid, out_mid = range(pre, len(s) - suf), o[pre:len(o) - suf]
    if len(mid) > 0 and len(out_mid) == 1 and math.prod(s[pre:len(s) - suf]) == o[pre]:
        return _flatten_dims(p, n, src, pre, len(s) - suf - 1)
    shifted = {d if d < pre else d + len(o) - len(s): parts for d, parts in axes.items()
               if d not in mid}
    if len(mid) == 1 and len(out_mid) > 1 and pre in axes:
        shifted.update({pre + j: parts for j, parts in
                        enumerate(_split_units(p, n, axes[pre], out_mid)) if parts})
        return shifted
    if any(d in mid for d in axes):
        raise p.unsupported(n, f"reshapes {s} to {o} across a hidden-unit axis")
    return shifted


def _split_units(p: Propagator, n: fx.Node, parts: tuple[Part, ...],
                 sizes: tuple[int, ...]) -> list[tuple[Part, ...]]:
    """The parts of each dim a reshape splits a unit dim into. A dim holding one plain part
    (a layer's outputs) has its set refined into one atom per factor; one merged earlier
    (heads × head_dim) splits back into the factors it was merged from."""
    total = math.prod(sizes)
    if len(parts) == 1 and parts[0][1:] == (0, total, 1, 1):
        return [_one(atom, size) for atom, size in zip(p.uf.split(parts[0].atom, sizes), sizes,
                                                         strict=True)]
    out: list[list[Part]] = [[] for _ in sizes]
    for part in parts:
        for j, size in enumerate(sizes):
            inner, outer = math.prod(sizes[j + 1:]), math.prod(sizes[:j])
            if (part.start, part.length, part.block, part.repeat) == (0, total, inner, outer):
                out[j].append(Part(part.atom, 0, size))
                break
        else:
            raise p.unsupported(n, f"splits a hidden-unit axis into {sizes} across its groups")
    return [tuple(parts) for parts in out]


def _pick(p: Propagator, axes: Axes, dim: int, index: int) -> Axes:
    """Entry `index` of `dim` is taken (an int index, unbind, chunk): that dim's units are
    pinned, and when they are the outer factor of a split (q, k, v of a packed projection), the
    other dims' units become index's own (see AtomSets.pick)."""
    outer = axes.get(dim, ())
    p.fix_axes({dim: outer})
    out: Axes = {}
    for d, parts in axes.items():
        if d == dim:
            continue
        if len(outer) == 1 and outer[0][1:] == (0, p.uf.units[outer[0].atom], 1, 1):
            parts = tuple(part._replace(atom=p.uf.pick(part.atom, outer[0].atom, index))
                          for part in parts)
        out[d] = parts
    return out


def _reduce(p: Propagator, n: fx.Node, result: Any) -> Axes:
    # A sum/mean/max over units is symmetric in them; other unit axes survive.
    src, dim, keep = _arg(n, 0, "input"), _arg(n, 1, "dim"), _arg(n, 2, "keepdim", False)
    if dim is None or src not in p.shapes:
        return {}
    nd = len(p.shapes[src])
    dims = {d % nd for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
    return {d if keep else d - sum(r < d for r in dims): ax
            for d, ax in p.axes_of(src).items() if d not in dims}


def _pool(k: int) -> Rule:
    """Pooling acts on the last k (spatial) dims, unit by unit."""
    def rule(p: Propagator, n: fx.Node, result: Any) -> Axes:
        src = _arg(n, 0, "input")
        nd, axes = len(p.shapes[src]), p.axes_of(src)
        if any(d >= nd - k for d in axes) or result.dim() != nd:
            raise p.unsupported(n, "pools over a hidden-unit axis")
        return dict(axes)
    return rule


def _transpose(p: Propagator, n: fx.Node, result: Any) -> Axes:
    """transpose/swapaxes: two dims trade places; their units go with them."""
    src = _arg(n, 0, "input")
    nd = len(p.shapes[src])
    a, b = _arg(n, 1, "dim0") % nd, _arg(n, 2, "dim1") % nd
    return {{a: b, b: a}.get(d, d): parts for d, parts in p.axes_of(src).items()}


def _permute(p: Propagator, n: fx.Node, result: Any) -> Axes:
    src = _arg(n, 0, "input")
    dims = n.args[1:] if n.op == "call_method" and len(n.args) > 2 else _arg(n, 1, "dims")
    dims = (dims,) if isinstance(dims, int) else dims
    nd = len(p.shapes[src])
    order = [d % nd for d in dims]  # output dim i is input dim order[i]
    axes = p.axes_of(src)
    return {i: axes[d] for i, d in enumerate(order) if d in axes}


def _expand(p: Propagator, n: fx.Node, result: Any) -> Axes:
    """expand/expand_as: new leading dims and size-1 dims broadcast; a size-1 axis has one
    unit, which no permutation moves, so only dims that keep their size carry units."""
    src = _arg(n, 0, "input")
    shape, lead = p.shapes[src], result.dim() - len(p.shapes[src])
    return {d + lead: parts for d, parts in p.axes_of(src).items()
            if shape[d] == result.shape[d + lead]}


def _index(p: Propagator, n: fx.Node, src: fx.Node, index: Any) -> Axes:
    """x[...] with ints, slices, None and Ellipsis: a dim picked by an int is gone (see _pick),
    one cut by a slice cannot move its units (pinned); kept dims carry theirs along."""
    axes, shape = dict(p.axes_of(src)), p.shapes[src]
    index = index if isinstance(index, tuple) else (index,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in index):
        if axes:
            raise p.unsupported(n, "indexes a tensor holding hidden units with a tensor")
        return {}
    consumed = sum(i is not None and i is not Ellipsis for i in index)
    if Ellipsis not in index:
        index = (*index, Ellipsis)
    kept: dict[int, int] = {}  # input dim -> output dim
    d_in = d_out = 0
    for i in index:
        if i is Ellipsis:
            for _ in range(len(shape) - consumed):
                kept[d_in] = d_out
                d_in, d_out = d_in + 1, d_out + 1
            consumed = len(shape)  # a second Ellipsis is an error torch has already raised
        elif i is None:
            d_out += 1
        elif isinstance(i, int):
            axes = _pick(p, axes, d_in, i % shape[d_in])
            d_in += 1
        else:
            plain = all(isinstance(v, (int, type(None))) for v in (i.start, i.stop, i.step))
            if not (plain and range(*i.indices(shape[d_in])) == range(shape[d_in])):
                p.fix_axes({d_in: axes.pop(d_in, ())})
            kept[d_in] = d_out
            d_in, d_out = d_in + 1, d_out + 1
    return {kept[d]: parts for d, parts in axes.items() if d in kept}


def _getitem(p: Propagator, n: fx.Node, result: Any) -> Axes:
    src, index = n.args[0], n.args[1]
    if src in p.items:  # one output of MultiheadAttention, chunk, unbind, ...
        items = p.items[src]
        if isinstance(index, int):
            return dict(items[index])
        if any(items):
            raise p.unsupported(n, "takes a slice of a tuple holding hidden units")
        return {}
    if not isinstance(result, torch.Tensor) or src not in p.shapes:
        return {}  # x.shape[0], an element of a list, ...
    return _index(p, n, src, index)


def _split(kind: str) -> Rule:
    """chunk/split/tensor_split/unbind: a tuple of pieces along one dim, each keeping the other
    dims' units. Along a unit dim, pieces may fall between the parts of a concatenation, or be
    equal chunks of one layer's units (q, k, v = qkv(x).chunk(3, -1)): those are factored as
    (pieces, units per piece) and each piece picked; unbind picks single entries."""
    def rule(p: Propagator, n: fx.Node, result: Any) -> Axes:
        src = _arg(n, 0, "input")
        nd, axes = len(p.shapes[src]), p.axes_of(src)
        dim = _arg(n, 1 if kind == "unbind" else 2, "dim", 0) % nd
        if kind == "unbind":
            p.items[n] = [{d - (d > dim): parts for d, parts in _pick(p, axes, dim, s).items()}
                          for s in range(len(result))]
            return {}
        sizes = [piece.shape[dim] for piece in result]
        parts = axes.get(dim, ())
        if len(parts) == 1 and len(set(sizes)) == 1 and len(sizes) > 1 \
                and parts[0][1:] == (0, p.shapes[src][dim], 1, 1):
            outer, inner = p.uf.split(parts[0].atom, (len(sizes), sizes[0]))
            factored = {**axes, dim: _one(inner, sizes[0]), -1: _one(outer, len(sizes))}
            p.items[n] = [_pick(p, factored, -1, s) for s in range(len(sizes))]
            return {}
        items: list[Axes] = []
        start = 0
        for size in sizes:
            here = {d: v for d, v in axes.items() if d != dim}
            inside = [q for q in parts if start <= q.start and q.start + q.length <= start + size]
            if any(q.start < start + size and start < q.start + q.length and q not in inside
                   for q in parts):
                raise p.unsupported(n, "splits a hidden-unit axis inside a group")
            if inside:
                here[dim] = _shift(inside, -start)
            items.append(here)
            start += size
        p.items[n] = items
        return {}
    return rule


def _batch_dims(p: Propagator, operands: Sequence[tuple[Axes, tuple[int, ...]]],
                out_shape: tuple[int, ...]) -> Axes:
    """Leading dims that broadcast alike in every operand (matmul's batch dims, heads in
    attention): aligned from the right, they meet entry for entry, as in a sum."""
    axes: Axes = {}
    for d in range(len(out_shape)):
        found, pinned = [], False
        for op_axes, shape in operands:
            od = d - len(out_shape) + len(shape)
            if od < 0 or (shape[od] == 1 and out_shape[d] != 1):
                continue
            if od in op_axes:
                found.append(op_axes[od])
            else:
                pinned = True
        if (parts := _join(p, found, pinned)) is not None:
            axes[d] = parts
    return axes


def _operand(p: Propagator, a: Any) -> tuple[Axes, tuple[int, ...]]:
    shape = p.shapes[a] if isinstance(a, fx.Node) else tuple(getattr(a, "shape", ()))
    return p.axes_of(a), shape


def _matmul(p: Propagator, n: fx.Node, result: Any) -> Axes:
    """a @ b, (..., n, k) @ (..., k, m): the contracted k of a and b move together (attention's
    q·k over head_dim), rows follow a, columns follow b, batch dims meet as in a sum."""
    (ax, sa), (bx, sb) = _operand(p, _arg(n, 0, "input")), _operand(p, _arg(n, 1, "other"))
    if len(sa) < 2 or len(sb) < 2:
        if ax or bx:
            raise p.unsupported(n, "multiplies a vector holding hidden units")
        return {}
    k = [axes[d] for axes, d in ((ax, len(sa) - 1), (bx, len(sb) - 2)) if d in axes]
    _join(p, k, pinned=len(k) < 2)
    return _product_output(p, [(ax, sa), (bx, sb)], (ax, sa), (bx, sb), result)


def _product_output(p: Propagator, operands: list[tuple[Axes, tuple[int, ...]]],
                    rows: tuple[Axes, tuple[int, ...]], columns: tuple[Axes, tuple[int, ...]],
                    result: Any) -> Axes:
    """The axes of a batched matrix product's (..., n, m) output: the operands' batch dims
    meet as in a sum, the rows are `rows`' second-to-last dim, the columns `columns`' last."""
    out = _batch_dims(p, [({d: v for d, v in axes.items() if d < len(shape) - 2}, shape[:-2])
                          for axes, shape in operands], tuple(result.shape[:-2]))
    (rx, sr), (cx, sc), nd = rows, columns, result.dim()
    if len(sr) - 2 in rx:
        out[nd - 2] = rx[len(sr) - 2]
    if len(sc) - 1 in cx:
        out[nd - 1] = cx[len(sc) - 1]
    return out


def _attention(p: Propagator, n: fx.Node, result: Any) -> Axes:
    """F.scaled_dot_product_attention(q, k, v): softmax(q·kᵀ)·v over tokens, per batch dim
    (heads): q and k share head_dim, k and v share tokens, the output follows q's tokens and
    v's units; masks hold no units."""
    q, k, v = (_operand(p, _arg(n, i, name)) for i, name in enumerate(("query", "key", "value")))
    if any(len(shape) < 2 for _, shape in (q, k, v)):
        raise p.unsupported(n, "attends over tensors of fewer than 2 dims")
    found = [axes[len(shape) - 1] for axes, shape in (q, k) if len(shape) - 1 in axes]
    _join(p, found, pinned=len(found) < 2)
    found = [axes[len(shape) - 2] for axes, shape in (k, v) if len(shape) - 2 in axes]
    _join(p, found, pinned=len(found) < 2)
    return _product_output(p, [q, k, v], q, v, result)


def _multihead_attention(p: Propagator, n: fx.Node, result: Any) -> Axes:
    """nn.MultiheadAttention (an fx leaf): the embedding axis of query, key and value is read by
    the packed in-projection (dim 1), its output comes from out_proj; inside, three
    permutations keep the function: heads (whole blocks of Q, K, V rows and of out_proj's
    inputs), Q·K units within a head (shared by Q and K, and by every head: dot products are
    sums over them), and V units within a head (shared with out_proj's inputs)."""
    m, path = p.fetch_attr(n.target), str(n.target)
    inputs = [_arg(n, i, name) for i, name in enumerate(("query", "key", "value"))]
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        if any(p.axes_of(a) for a in inputs):
            raise p.unsupported(n, "has separate Q/K/V projections, bias_k/bias_v or "
                                   "add_zero_attn, which no rule covers")
        p.items[n] = [{}, {}]
        return {}
    e, h = m.embed_dim, m.num_heads
    w_in, w_out = f"{path}.in_proj_weight", f"{path}.out_proj.weight"
    rows = [w_in] + ([f"{path}.in_proj_bias"] if m.in_proj_bias is not None else [])
    # Attention mixes tokens and batch entries, so units on those dims cannot move; every
    # input's embedding axis meets the same packed columns.
    embedding = p.param(w_in, 1, e)
    for a in inputs:
        axes = p.axes_of(a) if isinstance(a, fx.Node) else {}
        last = len(p.shapes[a]) - 1 if isinstance(a, fx.Node) else -1
        p.fix_axes({d: parts for d, parts in axes.items() if d != last})
        if last in axes:
            p.tie(n, axes[last], w_in, 1)
        else:
            p.uf.fixed.add(embedding)
    out = p.param(w_out, 0, e)
    if m.out_proj.bias is not None:
        out = p.uf.union(out, p.param(f"{path}.out_proj.bias", 0, e))
    heads = p.param(w_out, 1, e, e // h)  # blocks of head_dim inputs
    v = p.segment(w_out, 1, 0, e, 1, h)  # head_dim units, once per head
    qk: Atom | None = None
    for key in rows:
        for start in (0, e, 2 * e):
            heads = p.uf.union(heads, p.segment(key, 0, start, e, e // h))
        pair = p.uf.union(p.segment(key, 0, 0, e, 1, h), p.segment(key, 0, e, e, 1, h))
        qk = pair if qk is None else p.uf.union(qk, pair)
        v = p.uf.union(v, p.segment(key, 0, 2 * e, e, 1, h))
    p.producers += [(path, heads, f"{path}/heads"), (path, qk, f"{path}/qk"),
                    (path, v, f"{path}/v")]
    query = inputs[0]
    p.items[n] = [{len(p.shapes[query]) - 1: _one(out, e)}, {}]
    return {}


_UNARY = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
          nn.SELU, nn.CELU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
          nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Softmax, nn.LogSoftmax, nn.Identity,
          nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
MODULE_RULES: list[tuple[type | tuple[type, ...], Rule]] = [
    (nn.Linear, _linear),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), _conv),
    ((_BatchNorm, _InstanceNorm), _channel_norm),
    (nn.LayerNorm, _layer_norm),
    (nn.MultiheadAttention, _multihead_attention),
    (nn.GroupNorm, _group_norm),
    (nn.Flatten, _flatten_module),
    (nn.Unflatten, _reshape),
    ((nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d), _pool(1)),
    ((nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d), _pool(2)),
    ((nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d), _pool(3)),
    (_UNARY, _same),
]
_ELEMENTWISE_FUNCTIONS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd,
    operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.relu, torch.sigmoid, torch.tanh, torch.clamp, F.relu, F.relu6, F.gelu, F.silu, F.elu,
    F.selu, F.leaky_relu, F.hardtanh, F.hardswish, F.hardsigmoid, F.mish, F.softplus, F.sigmoid,
    F.tanh, F.logsigmoid)
FUNCTION_RULES: dict[Any, Rule] = {
    **dict.fromkeys(_ELEMENTWISE_FUNCTIONS, _elementwise),
    **dict.fromkeys((F.dropout, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax),
                    _same),
    **dict.fromkeys((F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d),
                    _pool(1)),
    **dict.fromkeys((F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d),
                    _pool(2)),
    torch.flatten: _flatten,
    torch.cat: _cat, torch.concat: _cat, torch.concatenate: _cat,
    **dict.fromkeys((torch.transpose, torch.swapaxes), _transpose),
    torch.permute: _permute,
    operator.getitem: _getitem,
    **dict.fromkeys((torch.chunk, torch.split, torch.tensor_split), _split("split")),
    torch.unbind: _split("unbind"),
    **dict.fromkeys((operator.matmul, torch.matmul, torch.bmm), _matmul),
    F.scaled_dot_product_attention: _attention,
    **dict.fromkeys((torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten), _reshape),
    **dict.fromkeys((torch.mean, torch.sum, torch.amax, torch.amin), _reduce),
}
METHOD_RULES: dict[str, Rule] = {
    **dict.fromkeys(("add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "neg", "relu",
                     "relu_", "sigmoid", "tanh", "clamp", "clamp_"), _elementwise),
    **dict.fromkeys(("contiguous", "clone", "detach", "softmax", "log_softmax", "float", "to",
                     "type_as"), _same),
    "flatten": _flatten,
    **dict.fromkeys(("transpose", "swapaxes"), _transpose),
    "permute": _permute,
    **dict.fromkeys(("expand", "expand_as"), _expand),
    **dict.fromkeys(("chunk", "split", "tensor_split"), _split("split")),
    "unbind": _split("unbind"),
    **dict.fromkeys(("matmul", "bmm"), _matmul),
    **dict.fromkeys(("view", "reshape", "squeeze", "unsqueeze", "unflatten"), _reshape),
    **dict.fromkeys(("mean", "sum", "amax", "amin"), _reduce),
}
