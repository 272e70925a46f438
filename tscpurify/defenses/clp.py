"""CLP: Channel Lipschitzness-based Pruning. Data-free: prune the channels whose upper bound
on the Lipschitz constant is an outlier within their layer.

Zheng, Tang, Li & Liu, "Data-free Backdoor Removal based on Channel Lipschitzness", ECCV 2022,
https://arxiv.org/abs/2208.03111.

Plan, for every Conv2d:
  1. Its channel k maps the input to one output map; with the BatchNorm that alone reads the
     conv's output, the map is x ↦ γ_k/σ_k · W_k * x + const, so its Lipschitz constant is at
     most UCLC_k = ‖W_k · |γ_k|/σ_k‖₂, the spectral norm of W_k reshaped to (C_in, kh·kw)
     (σ_k = √(running_var_k + bn.eps)). Without such a BN, UCLC_k = ‖W_k‖₂.
  2. Prune the channels with UCLC_k > mean + u·std of the layer's UCLCs (std unbiased, as the
     reference): the BN's γ_k and β_k are zeroed, or, without a BN, the conv's W_k (and bias).

Reference: rkteddy/channel-Lipschitzness-based-pruning and SCLBD/BackdoorBench `defense/clp.py`.
Differs from the reference: nothing in the rule; conv/BN pairs are found by tracing, not by
module order, so residual models pair correctly (details below).

Adapted: convs are paired with a BN by symbolic tracing (the BN must be the conv output's only
reader), not by module order, so a conv feeding a residual sum (PreAct-ResNet's stem and second
convs, shortcuts) is judged, and pruned, on its own weights: zeroing its BN-side only would leave
the channel alive in the residual stream. The clean loader is ignored: CLP needs no data.
Note: with the unbiased std, a layer of n channels can have no z-score above (n−1)/√n, so u = 3
can prune only in layers of at least 11 channels.

Settings (defaults): u 3.0 (paper and BackdoorBench default).

Example:
    >>> result = defend("clp", model, clean_loader, u=3.0)
    >>> result.details["pruned"]          # {conv layer: [channel indices]}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..errors import SettingsError
from ._common import BatchNorm, conv_bn_pairs
from .base import DefenseResult
from .registered import DEFENSES


@dataclass(frozen=True)
class CLPSettings:
    u: float = field(default=3.0, metadata={
        "help": "prune channels with UCLC above mean + u·std of their layer"})

    def __post_init__(self) -> None:
        if self.u < 0:
            raise SettingsError(f"CLP's u must be ≥ 0, got {self.u}")


@torch.no_grad()
def channel_lipschitz(conv: nn.Conv2d, bn: BatchNorm | None) -> Tensor:
    """UCLC of each output channel of `conv` (followed by `bn`, if given)."""
    weight = conv.weight
    if bn is not None:
        scale = bn.weight.abs() if bn.weight is not None else torch.ones_like(bn.running_var)
        weight = weight * (scale / (bn.running_var + bn.eps).sqrt()).view(-1, 1, 1, 1)
    return torch.linalg.matrix_norm(weight.flatten(2), ord=2)


@DEFENSES.register("clp", settings=CLPSettings, needs_labels=False)
def clp(model: nn.Module, clean: DataLoader, settings: CLPSettings, *, seed: int,
        progress: bool, callbacks: dict) -> DefenseResult:
    pruned: dict[str, list[int]] = {}
    uclc: dict[str, list[float]] = {}
    with torch.no_grad():
        for conv_name, conv, _, bn in conv_bn_pairs(model):
            values = channel_lipschitz(conv, bn)
            uclc[conv_name] = values.tolist()
            if len(values) < 2:
                continue  # no spread to measure an outlier against
            threshold = values.mean() + settings.u * values.std()
            index = (values > threshold).nonzero().flatten()
            if len(index) == 0:
                continue
            pruned[conv_name] = index.tolist()
            if bn is not None and bn.weight is not None and bn.bias is not None:
                bn.weight[index] = 0
                bn.bias[index] = 0
            else:
                conv.weight[index] = 0
                if conv.bias is not None:
                    conv.bias[index] = 0
    details = {"pruned": pruned, "uclc": uclc, "count": sum(len(v) for v in pruned.values())}
    return DefenseResult(model, details)
