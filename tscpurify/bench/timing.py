"""One plain SGD step of a model, timed: the t_step of docs/scaling.md's cost model
(time ≈ 1.25 × steps × t_step), measured by scripts/gpu_timing.py and scripts/step_time.py."""

from __future__ import annotations

import statistics
import time

import torch
from torch.nn import functional as F


def synchronize(device: str | torch.device) -> None:
    """Wait for the GPU's queued work, so that a clock reads what it computed."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def step_seconds(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                 device: str | torch.device, repeats: int = 20, warmup: int = 5) -> float:
    """Median seconds of one SGD step (forward, cross-entropy, backward, update) of `model` in
    training mode on `batch`, after `warmup` untimed steps (allocations, kernel choice)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = (t.to(device) for t in batch)
    model.train()
    times = []
    for i in range(warmup + repeats):
        synchronize(device)
        began = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - began)
    return statistics.median(times)
