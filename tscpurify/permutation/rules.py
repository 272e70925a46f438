"""The per-op rules of `derive_spec`: how each op moves the hidden-unit axes of its inputs.

A rule gets the propagator, the fx node and the node's real output; it links the atoms
(state-dict axes) that must move together and returns, for the output, dim -> (atom, block).
To support a new op, add a rule here; an op without one raises SpecError when hidden units flow
into it.
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

if TYPE_CHECKING:
    from .trace import Propagator

Atom = tuple[str, int]  # (state-dict key, dim)
Axes = dict[int, tuple[Atom, int]]  # output dim -> (atom, block)
Rule = Callable[["Propagator", fx.Node, Any], Axes]


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
        if pinned or len({block for _, block in found}) > 1:
            p.uf.fixed.update(atom for atom, _ in found)
        elif found:
            atom = found[0][0]
            for other, _ in found[1:]:
                atom = p.uf.union(atom, other)
            axes[d] = (atom, found[0][1])
    return axes


def _linear(p: Propagator, n: fx.Node, result: Any) -> Axes:
    module, src = p.fetch_attr(n.target), p.axes_of(n.args[0])
    last = result.dim() - 1
    axes = {d: ax for d, ax in src.items() if d != last}
    if last in src:
        atom, block = src[last]
        p.uf.union(atom, p.param(f"{n.target}.weight", 1, module.in_features, block))
    axes[last] = (p.produce(n, module, module.out_features), 1)
    return axes


def _conv(p: Propagator, n: fx.Node, result: Any) -> Axes:
    module, src = p.fetch_attr(n.target), p.axes_of(n.args[0])
    if set(src) - {1}:
        raise p.unsupported(n, "convolves over a hidden-unit axis")
    if module.groups == 1:
        if 1 in src:
            atom, block = src[1]
            p.uf.union(atom, p.param(f"{n.target}.weight", 1, module.in_channels, block))
        return {1: (p.produce(n, module, module.out_channels), 1)}
    if module.groups == module.in_channels == module.out_channels:
        # Depthwise: output channel c sees only input channel c, so both move together.
        if 1 not in src:
            return {}
        atom = p.uf.union(src[1][0], p.param(f"{n.target}.weight", 0, module.out_channels))
        if module.bias is not None:
            p.uf.union(atom, p.param(f"{n.target}.bias", 0, module.out_channels))
        return {1: src[1]}
    raise p.unsupported(n, f"has groups={module.groups} (only 1 or depthwise are supported)")


def _norm_params(p: Propagator, n: fx.Node, names: Sequence[str], dims: dict[int, int],
                 outer: int = 0) -> Axes:
    """Per-unit tensors `names` (dim k) follow input dim d for each d -> k in `dims`; dims below
    `outer` are independent rows and pass through."""
    module, src = p.fetch_attr(n.target), p.axes_of(n.args[0])
    for d, (atom, block) in src.items():
        if d < outer:
            continue
        if d not in dims:
            raise p.unsupported(n, f"normalises over hidden-unit dim {d}")
        for name in names:
            if (tensor := getattr(module, name, None)) is not None:
                key, k = f"{n.target}.{name}", dims[d]
                p.uf.union(atom, p.param(key, k, tensor.shape[k], block))
    return dict(src)


def _channel_norm(p: Propagator, n: fx.Node, result: Any) -> Axes:
    # BatchNorm / InstanceNorm: statistics per channel (dim 1), so channels may move freely.
    return _norm_params(p, n, ("weight", "bias", "running_mean", "running_var"), {1: 0})


def _group_norm(p: Propagator, n: fx.Node, result: Any) -> Axes:
    # Statistics per group of consecutive channels: permuting whole groups (each kept in its
    # order) keeps the function, so with 1 < groups < channels the channels move in groups.
    module, src = p.fetch_attr(n.target), p.axes_of(n.args[0])
    if 1 < module.num_groups < module.num_channels and 1 in src:
        p.uf.coarsen(src[1][0], module.num_channels // module.num_groups)
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
        d, (atom, block) = inside[0], axes[inside[0]]
        if math.prod(shape[start:d]) != 1:
            raise p.unsupported(n, "flattens a hidden-unit axis inside an outer one")
        out[start] = (atom, block * math.prod(shape[d + 1:end + 1]))
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


_UNARY = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
          nn.SELU, nn.CELU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
          nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Softmax, nn.LogSoftmax, nn.Identity,
          nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
MODULE_RULES: list[tuple[type | tuple[type, ...], Rule]] = [
    (nn.Linear, _linear),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), _conv),
    ((_BatchNorm, _InstanceNorm), _channel_norm),
    (nn.LayerNorm, _layer_norm),
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
    **dict.fromkeys((torch.reshape, torch.squeeze, torch.unsqueeze), _reshape),
    **dict.fromkeys((torch.mean, torch.sum, torch.amax, torch.amin), _reduce),
}
METHOD_RULES: dict[str, Rule] = {
    **dict.fromkeys(("add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "neg", "relu",
                     "relu_", "sigmoid", "tanh", "clamp", "clamp_"), _elementwise),
    **dict.fromkeys(("contiguous", "clone", "detach", "softmax", "log_softmax", "float", "to",
                     "type_as"), _same),
    "flatten": _flatten,
    **dict.fromkeys(("view", "reshape", "squeeze", "unsqueeze"), _reshape),
    **dict.fromkeys(("mean", "sum", "amax", "amin"), _reduce),
}
