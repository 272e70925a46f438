"""The per-op rules of `derive_spec`: how each op moves the hidden-unit axes of its inputs.

A rule gets the propagator, the fx node and the node's real output; it links the atoms
(state-dict axes) that must move together and returns, for the output, dim -> parts. A dim has
one part, or one per input of a concatenation along it. To support a new op, add a rule here;
an op without one raises SpecError when hidden units flow into it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

if TYPE_CHECKING:
    from .trace import Propagator

Atom = tuple[str, int, int, int]  # (state-dict key, dim, first entry, repeat): see spec.Axis


class Part(NamedTuple):
    """`length` consecutive entries of a tensor dim that move as the units of `atom`, `block`
    entries per unit; atom None: entries no group can move (the input's channels, a constant)."""

    atom: Atom | None
    block: int
    length: int


Axes = dict[int, tuple[Part, ...]]  # output dim -> its parts, in order
Rule = Callable[["Propagator", fx.Node, Any], Axes]


def _one(atom: Atom, length: int) -> tuple[Part, ...]:
    return (Part(atom, 1, length),)


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
    together; an untracked operand there (`pinned`), or one cut differently, fixes them all."""
    if not found:
        return None
    layout = {tuple((part.block, part.length) for part in parts) for parts in found}
    if pinned or len(layout) > 1:
        p.uf.fixed.update(part.atom for parts in found for part in parts if part.atom)
        return None
    joined = []
    for column in zip(*found, strict=True):
        atoms = [part.atom for part in column if part.atom is not None]
        if len(atoms) < len(column):  # a segment that cannot move meets one that could
            p.uf.fixed.update(atoms)
            atoms = []
        atom = atoms[0] if atoms else None
        for other in atoms[1:]:
            atom = p.uf.union(atom, other)
        joined.append(column[0]._replace(atom=atom))
    return tuple(joined) if any(part.atom for part in joined) else None


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
    for t in inputs:
        length = p.shapes[t][dim] if isinstance(t, fx.Node) else t.shape[dim]
        along.extend(p.axes_of(t).get(dim, (Part(None, 1, length),)))
    if any(part.atom for part in along):
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
    """A unit axis flattened with the dims after it moves in blocks of their product."""
    shape, axes = p.shapes[src], p.axes_of(src)
    if not shape:
        return {}
    start, end = start % len(shape), end % len(shape)
    inside = [d for d in axes if start <= d <= end]
    out = {d if d < start else d - (end - start): ax for d, ax in axes.items() if d not in inside}
    if len(inside) > 1:
        raise p.unsupported(n, "flattens two hidden-unit axes into one")
    if inside:
        d = inside[0]
        if math.prod(shape[start:d]) != 1:
            raise p.unsupported(n, "flattens a hidden-unit axis inside an outer one")
        inner = math.prod(shape[d + 1:end + 1])
        out[start] = tuple(Part(part.atom, part.block * inner, part.length * inner)
                           for part in axes[d])
    return out


def _flatten_module(p: Propagator, n: fx.Node, result: Any) -> Axes:
    module = p.fetch_attr(n.target)
    return _flatten_dims(p, n, n.args[0], module.start_dim, module.end_dim)


def _flatten(p: Propagator, n: fx.Node, result: Any) -> Axes:
    start, end = _arg(n, 1, "start_dim", 0), _arg(n, 2, "end_dim", -1)
    return _flatten_dims(p, n, _arg(n, 0, "input"), start, end)


def _reshape(p: Propagator, n: fx.Node, result: Any) -> Axes:
    """Any row-major reshape (view, squeeze, ...), judged from the shapes alone: exact as a
    flatten when it merges one run of dims; otherwise every unit axis must lie in the unchanged
    prefix or suffix."""
    src = _arg(n, 0, "input")
    s, o, axes = p.shapes[src], tuple(result.shape), p.axes_of(src)
    pre = 0
    while pre < min(len(s), len(o)) and s[pre] == o[pre]:
        pre += 1
    suf = 0
    while suf < min(len(s), len(o)) - pre and s[-1 - suf] == o[-1 - suf]:
        suf += 1
    mid = range(pre, len(s) - suf)
    if len(mid) > 0 and len(o) - suf - pre == 1 and math.prod(s[pre:len(s) - suf]) == o[pre]:
        return _flatten_dims(p, n, src, pre, len(s) - suf - 1)
    if any(d in mid for d in axes):
        raise p.unsupported(n, f"reshapes {s} to {o} across a hidden-unit axis")
    return {d if d < pre else d + len(o) - len(s): ax for d, ax in axes.items()}


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
    """x[...] with ints, slices, None and Ellipsis: a dim picked by an int or cut by a slice
    cannot move its units (pinned); kept dims carry theirs to their new place."""
    axes, nd = p.axes_of(src), len(p.shapes[src])
    index = index if isinstance(index, tuple) else (index,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in index):
        if axes:
            raise p.unsupported(n, "indexes a tensor holding hidden units with a tensor")
        return {}
    consumed = sum(i is not None and i is not Ellipsis for i in index)
    if Ellipsis not in index:
        index = (*index, Ellipsis)
    out: Axes = {}
    d_in = d_out = 0
    for i in index:
        if i is Ellipsis:
            for _ in range(nd - consumed):
                if d_in in axes:
                    out[d_out] = axes[d_in]
                d_in, d_out = d_in + 1, d_out + 1
            consumed = nd  # a second Ellipsis is an error torch has already raised
        elif i is None:
            d_out += 1
        else:
            whole = isinstance(i, slice) and all(
                isinstance(v, (int, type(None))) for v in (i.start, i.stop, i.step)) and \
                range(*i.indices(p.shapes[src][d_in])) == range(p.shapes[src][d_in])
            if d_in in axes:
                if whole:
                    out[d_out] = axes[d_in]
                else:
                    p.fix_axes({d_in: axes[d_in]})
            d_in, d_out = d_in + 1, d_out + int(isinstance(i, slice))
    return out


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
    """chunk/split/tensor_split/unbind: a tuple of pieces along one dim. Each piece keeps the
    other dims' units; a hidden-unit dim may be cut only between the parts of a concatenation
    (one piece per input); unbind picks single entries, which pins the dim."""
    def rule(p: Propagator, n: fx.Node, result: Any) -> Axes:
        src = _arg(n, 0, "input")
        nd, axes = len(p.shapes[src]), p.axes_of(src)
        dim = _arg(n, 1 if kind == "unbind" else 2, "dim", 0) % nd
        rest = {d: parts for d, parts in axes.items() if d != dim}
        if kind == "unbind":
            p.fix_axes({d: parts for d, parts in axes.items() if d == dim})
            p.items[n] = [{d - (d > dim): parts for d, parts in rest.items()} for _ in result]
            return {}
        items: list[Axes] = []
        parts = list(axes.get(dim, ()))
        for piece in result:
            here = dict(rest)
            if parts:
                taken = []
                while parts and sum(q.length for q in taken) < piece.shape[dim]:
                    taken.append(parts.pop(0))
                if sum(q.length for q in taken) != piece.shape[dim]:
                    raise p.unsupported(n, "splits a hidden-unit axis inside a group")
                if any(q.atom for q in taken):
                    here[dim] = tuple(taken)
            items.append(here)
        p.items[n] = items
        return {}
    return rule


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
    **dict.fromkeys((torch.reshape, torch.squeeze, torch.unsqueeze), _reshape),
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
    **dict.fromkeys(("view", "reshape", "squeeze", "unsqueeze"), _reshape),
    **dict.fromkeys(("mean", "sum", "amax", "amin"), _reduce),
}
