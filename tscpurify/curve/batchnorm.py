"""Re-estimate BatchNorm running statistics for a model taken from a curve.

A point θ(t) has no running statistics of its own (those trained along the curve mix every t),
so, as in the reference, they are reset and re-estimated on clean data with a cumulative average
(momentum None), in train mode, without gradients.

We do not use `torch.optim.swa_utils.update_bn`: it restores only the top-level training flag
(so a model with some submodules in eval mode comes back changed), has no try/finally, and needs
the device passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .. import distributed as dist
from ..errors import DataError
from .train import to_device


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _union_forward(m: nn.modules.batchnorm._BatchNorm) -> Callable[[torch.Tensor], torch.Tensor]:
    """`m`'s forward in a re-estimation pass over shards: it normalises with the statistics of
    the union of the processes' batches and adds them to the cumulative average, as one process
    would with the union batch (sums and counts all-reduced in float64, layer by layer, as
    SyncBatchNorm does; that one needs a GPU)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        wide = x.double()
        count = torch.full((1,), x.numel() / x.shape[1], dtype=torch.float64, device=x.device)
        sums = dist.all_reduce_sum(torch.cat([count, wide.sum(dims), (wide * wide).sum(dims)]))
        n, channels = sums[0], x.shape[1]
        mean = sums[1:1 + channels] / n
        var = (sums[1 + channels:] / n - mean * mean).clamp_min(0)
        m.num_batches_tracked.add_(1)
        factor = 1.0 / float(m.num_batches_tracked)  # momentum None: a cumulative average
        m.running_mean.mul_(1 - factor).add_(mean.to(m.running_mean.dtype), alpha=factor)
        unbiased = var * n / (n - 1).clamp_min(1)
        m.running_var.mul_(1 - factor).add_(unbiased.to(m.running_var.dtype), alpha=factor)
        return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), m.weight, m.bias, False, 0.0,
                            m.eps)
    return forward


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, loader: Iterable[Any], *, progress: bool = False,
                       distributed: bool = False) -> None:
    """Reset every BatchNorm's running statistics and re-estimate them in one pass over `loader`.

    Batches may be tensors or tuples/lists whose first element is the input. Only buffers change;
    parameters, momenta and every module's training flag are as before. Each batch counts equally
    in the average (PyTorch's momentum=None rule), so a short last batch is slightly overweighted,
    and running_var is the mean of per-batch unbiased variances. If the pass fails or the loader is
    empty, the previous statistics are restored and the error propagates.

    `distributed`: this process's `loader` is its shard (tscpurify.distributed); every batch is
    normalised and counted with the statistics of the union of the processes' k-th batches, so
    every process ends with the statistics one process would compute over the union batches.
    """
    norms = _batchnorms(model)
    if not norms:
        return
    device = next(iter(norms[0].buffers())).device
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    momenta = [m.momentum for m in norms]
    flags = {m: m.training for m in model.modules()}
    done = False
    try:
        model.train()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            if distributed and dist.active():
                m.forward = _union_forward(m)  # type: ignore[method-assign]
        batches = 0
        for batch in tqdm(loader, desc="bn stats", disable=not progress, leave=False):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(to_device(x, device))
            batches += 1
        if batches == 0:
            raise DataError("cannot re-estimate BatchNorm statistics: the loader gave no batches")
        done = True
    finally:
        for m, momentum, buffers in zip(norms, momenta, saved, strict=True):
            m.momentum = momentum
            m.__dict__.pop("forward", None)
            if not done:
                for key, value in buffers.items():
                    getattr(m, key).copy_(value)
        for m, flag in flags.items():
            m.training = flag
