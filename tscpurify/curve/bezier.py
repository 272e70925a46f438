"""A quadratic Bezier curve in weight space between two models of one architecture.

TSC (Peng et al., ICML 2025, arXiv 2506.07467) trains such curves in both of its stages; the
curve itself is Garipov et al.'s (NeurIPS 2018, "Loss Surfaces, Mode Connectivity, and Fast
Ensembling of DNNs"). θ(t) = (1−t)²·start + 2t(1−t)·mid + t²·end, over every floating-point
parameter of the model, keyed by state-dict name. One implementation serves every
architecture: the template is evaluated with `torch.func.functional_call`, so no curve twin of
each layer exists.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import SpecError

StateDict = Mapping[str, Tensor]

# ParameterDict and register_buffer refuse '.', and '-' cannot occur in an attribute name, so the
# mapping is readable and (checked below) collision-free for ordinary models.
_SEP = "-"


def _safe(key: str) -> str:
    return key.replace(".", _SEP)


class _TensorStore(nn.Module):
    """Fixed tensors (the endpoints) as buffers, so `.to()` moves them and state_dict saves them."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        super().__init__()
        for key, value in tensors.items():
            self.register_buffer(_safe(key), value)


class CurveFunction:
    """The model at one point t of a curve as a callable x -> output, with θ(t) built once.

    Loss functions receive this; `device` tells them where to move the batch, and several calls
    (e.g. two SimCLR views) share one θ(t) and one autograd graph back to `mid`.
    """

    def __init__(self, template: nn.Module, weights: dict[str, Tensor], t: float | Tensor,
                 device: torch.device) -> None:
        self.template, self.weights, self.t, self.device = template, weights, t, device

    def __call__(self, x: Tensor) -> Tensor:
        # Keys not in `weights` (the template's buffers and any non-float parameter) are taken
        # from the template itself, so BN running statistics are shared along the curve.
        return functional_call(self.template, self.weights, (x,))


class BezierCurve(nn.Module):
    """Quadratic Bezier curve between `start` (t=0) and `end` (t=1) for the architecture `template`.

    Args:
        template: any module of the architecture; it is deep-copied, and the copy supplies the
            structure and the buffers (BN running statistics, Normalize mean/std) at every t.
        start, end: state dicts of the endpoints (full state dicts are fine: buffer entries are
            ignored). They are cloned into buffers and never train.
        mid: the control point; (start + end) / 2 when None (the reference's "init_linear").

    `list(curve.parameters())` is exactly the control point, and `curve.state_dict()` holds
    start, end and mid, which is all a resume needs (with a template of the same architecture).

    Example:
        >>> curve = BezierCurve(model_a, model_a.state_dict(), model_b.state_dict())
        >>> logits = curve(x, 0.4); model = curve.point(0.4)  # then recompute_bn_stats(model, ...)
    """

    def __init__(self, template: nn.Module, start: StateDict, end: StateDict,
                 mid: StateDict | None = None) -> None:
        super().__init__()
        params = {k: p for k, p in template.named_parameters() if p.is_floating_point()}
        if not params:
            raise SpecError("curve template has no floating-point parameters")
        safe_names = {_safe(k) for k in params}
        if len(safe_names) != len(params):
            raise SpecError(f"parameter names collide once '.' is mapped to {_SEP!r}: "
                            f"{sorted(params)}")
        buffer_names = {k for k, _ in template.named_buffers()}
        device = next(iter(start.values())).device if start else next(iter(params.values())).device
        start_t = _checked("start", start, params, buffer_names, device)
        end_t = _checked("end", end, params, buffer_names, device)
        mid_t = (_checked("mid", mid, params, buffer_names, device) if mid is not None
                 else {k: (start_t[k] + end_t[k]) / 2 for k in params})

        self.keys: tuple[str, ...] = tuple(params)
        self.start = _TensorStore(start_t)
        self.end = _TensorStore(end_t)
        # An OrderedDict keeps the model's order (ParameterDict sorts a plain dict's keys).
        self.mid = nn.ParameterDict(OrderedDict((_safe(k), nn.Parameter(mid_t[k])) for k in params))
        # Stored outside nn.Module's registry so the template's own parameters never reach
        # curve.parameters() or curve.state_dict(); _apply and train() forward to it by hand.
        object.__setattr__(self, "template", copy.deepcopy(template).to(device))

    # --- the curve -----------------------------------------------------------------------------

    def _triples(self) -> Iterator[tuple[str, Tensor, Tensor, Tensor]]:
        start, end, mid = self.start._buffers, self.end._buffers, self.mid
        for key in self.keys:
            safe = _safe(key)
            yield key, start[safe], mid[safe], end[safe]

    def weights(self, t: float | Tensor) -> dict[str, Tensor]:
        """θ(t) by state-dict key; differentiable with respect to `mid` (and to t if a tensor).

        t outside [0, 1] extrapolates along the parabola; the curve's training only sees [0, 1].
        """
        if isinstance(t, Tensor):
            t = t.to(self.device)
        a, b, c = (1 - t) ** 2, 2 * t * (1 - t), t * t
        if isinstance(t, Tensor):
            return {k: s * a + m * b + e * c for k, s, m, e in self._triples()}
        # Float coefficients: start and end carry no graph, so the sum is built in place in one
        # new tensor, and backward reaches mid through a single scaled add. At t=0 or 1 the
        # result is the endpoint bit for bit (x·1 + y·0 + z·0 is exact).
        return {k: (s * a).add_(e, alpha=c).add_(m, alpha=b) for k, s, m, e in self._triples()}

    def as_function(self, t: float | Tensor,
                    weights: dict[str, Tensor] | None = None) -> CurveFunction:
        """The model at t as a callable x -> output; pass `weights` if θ(t) is already built."""
        return CurveFunction(self.template, self.weights(t) if weights is None else weights,
                             t, self.device)

    def forward(self, x: Tensor, t: float | Tensor) -> Tensor:
        return self.as_function(t)(x)

    @torch.no_grad()
    def point(self, t: float) -> nn.Module:
        """A standalone copy of the template holding θ(t), in eval mode.

        BN running statistics are the template's, which no single t owns: re-estimate them
        (`recompute_bn_stats`) before trusting the model's outputs.
        """
        model = copy.deepcopy(self.template)
        for key, value in self.weights(float(t)).items():
            model.get_parameter(key).copy_(value)
        return model.eval()

    # --- module plumbing -----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(iter(self.start._buffers.values())).device

    def _apply(self, fn: Callable[[Tensor], Tensor], *args, **kwargs) -> BezierCurve:
        # .to(), .cuda(), .double() and friends all go through _apply; keep the template alongside.
        super()._apply(fn, *args, **kwargs)
        self.template._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> BezierCurve:
        super().train(mode)
        self.template.train(mode)
        return self

    def extra_repr(self) -> str:
        count = sum(m.numel() for m in self.mid.values())
        kind = type(self.template).__name__
        return f"tensors={len(self.keys)}, trainable={count}, template={kind}"


def _checked(role: str, state: StateDict, params: Mapping[str, Tensor], buffer_names: set[str],
             device: torch.device) -> dict[str, Tensor]:
    """The curve's tensors of one state dict, cloned onto `device`; SpecError names any misfit."""
    missing = [k for k in params if k not in state]
    unknown = [k for k in state if k not in params and k not in buffer_names]
    if missing or unknown:
        raise SpecError(f"curve {role}: state dict does not fit the template: "
                        f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                        f"unexpected {unknown[:5]}{'…' if len(unknown) > 5 else ''} "
                        "(are both models the same architecture and width?)")
    out = {}
    for key, param in params.items():
        value = state[key]
        if value.shape != param.shape:
            raise SpecError(f"curve {role}: {key!r} has shape {tuple(value.shape)}, "
                            f"the template's is {tuple(param.shape)}")
        if not value.is_floating_point():
            raise SpecError(f"curve {role}: {key!r} has dtype {value.dtype}, expected floating")
        out[key] = value.detach().to(device=device, dtype=param.dtype, copy=True)
    return out


def fresh_control_point(template: nn.Module, seed: int) -> dict[str, Tensor]:
    """A control point at a fresh random initialisation of `template`'s architecture (each
    module's own `reset_parameters`, seeded), instead of the endpoints' mean: TSC's default,
    because the mean inherits the backdoor (docs/tuning.md). Seeds the global RNG, as the
    modules' initialisers draw from it."""
    fresh = copy.deepcopy(template)
    torch.manual_seed(seed)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return dict(fresh.named_parameters())
