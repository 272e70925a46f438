"""One purification on several processes: the process-group plumbing of distributed TSC.

`torchrun --nproc_per_node N -m tscpurify purify RUN --out X` (or `purify(..., distributed=True)`
inside a job the user launched) runs one purification on N processes, data-parallel:
  - the clean data is sharded (`sharded`: a DistributedSampler whose shuffle is re-seeded per
    pass from the stage's seed), each process taking global_batch / N images a step;
  - gradients (the curve's control point, the fine-tunes' weights) are averaged over the
    processes after each backward (`all_reduce_gradients`): each process's loss is a mean
    over its equal shard, so the average is the gradient over the union batch;
  - activation-matching moments and BatchNorm re-estimation statistics are summed over the
    processes, so both see the union of the shards;
  - only rank 0 writes (stages, run folder, report); the others follow its decisions.
The backend is nccl on CUDA (each process on cuda:LOCAL_RANK) and gloo on CPU.

Every helper is a no-op when no process group is initialised (or it holds one process), so the
single-process code paths compute exactly what they computed before.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from .errors import DataError, SettingsError, TscpurifyError
from .seeding import derive_seed

T = TypeVar("T")
# torchrun's variables; a process that has RANK and WORLD_SIZE was launched as part of a job.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Rank 0 alone evaluates, re-tunes and writes the run folder while the others wait at a
# barrier, which fails after the process group's timeout: a generous one for the groups
# tscpurify creates itself.
TIMEOUT = datetime.timedelta(hours=2)


class DistributedError(TscpurifyError):
    """A distributed job could not start, or another process of it failed."""


def launched() -> bool:
    """True in a process that torchrun (or an equivalent launcher) started as part of a job."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0, and in a process that is not part of a distributed job."""
    return rank() == 0


def active() -> bool:
    """More than one process to agree with: the only case in which a helper communicates."""
    return initialized() and world_size() > 1


def backend_for(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def device_for(device: str) -> str:
    """The device of this process: a CUDA request becomes cuda:LOCAL_RANK, one GPU a process."""
    return f"cuda:{local_rank()}" if torch.device(device).type == "cuda" else device


def init(device: str = "cpu") -> str:
    """Join the job this process was launched into (a no-op when its process group exists);
    returns this process's device (`device_for`). nccl for CUDA, gloo otherwise."""
    device = device_for(device)
    if initialized():
        return device
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed")
    if not launched():
        raise DistributedError(
            "a distributed purification needs a launched job: run it under torchrun (e.g. "
            "torchrun --nproc_per_node 2 -m tscpurify purify RUN --out X), or initialise "
            "torch.distributed yourself before calling purify(..., distributed=True)")
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend_for(device), timeout=TIMEOUT)
    return device


def require(device: str | torch.device = "cpu") -> None:
    """`purify(..., distributed=True)` in a process without a process group: join the launched
    job (on `device`'s backend), or say how to launch one."""
    if not initialized():
        init(str(device))


# --- collectives (no-ops without a group of several processes) ------------------------------
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the processes, in place; returns it."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average `tensor` over the processes, in place; returns it."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world_size())
    return tensor


def all_reduce_gradients(params: list[torch.Tensor] | Iterator[torch.Tensor]) -> None:
    """Average the gradients of `params` over the processes, in one flat buffer per dtype (what
    DistributedDataParallel computes, without its bucketing and overlap). Each process's loss
    is a mean over its shard; over equal shards the average is the union batch's gradient, and
    a term every process adds alike (the curve's L2 regulariser) is counted once."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    for dtype in {g.dtype for g in grads}:
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        all_reduce_mean(flat)
        offset = 0
        for g in same:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def average_buffers(model: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the processes.

    After a fine-tune each process's running statistics follow its own shards' batches; their
    mean is the running mean of the union batches (the mean is linear) and, for the variance,
    the mean of the shards' variances (it leaves out the spread between shard means).
    DistributedDataParallel would keep rank 0's instead."""
    if not active():
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            all_reduce_mean(buffer.data)


def broadcast_object(value: T, src: int = 0) -> T:
    """Rank `src`'s `value` on every process (pickled)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's tensors, in place, on every process: after each stage the processes hold the
    very same weights, whatever rounding their collectives did."""
    if active():
        for value in state.values():
            dist.broadcast(value, src=0)
    return state


def barrier() -> None:
    if active():
        dist.barrier()


def on_main(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`function` run on rank 0 alone, its result given to every process; when it raises, it
    raises on rank 0 and every other process raises a DistributedError with its message, so a
    refusal (an existing --out, a corrupt stage) stops the job instead of hanging it."""
    if not active():
        return function(*args, **kwargs)
    outcome: tuple[str, Any]
    error: BaseException | None = None
    if is_main():
        try:
            outcome = ("ok", function(*args, **kwargs))
        except Exception as err:  # noqa: BLE001 - passed on, then raised again below
            error = err
            outcome = ("error", f"{type(err).__name__}: {err}")
    else:
        outcome = ("", None)
    outcome = broadcast_object(outcome)
    if error is not None:
        raise error
    if outcome[0] == "error":
        raise DistributedError(f"rank 0 stopped: {outcome[1]}")
    return outcome[1]


# --- the sharded clean loader ----------------------------------------------------------------
class ShardSampler(DistributedSampler):
    """A DistributedSampler that reshuffles at every pass over the data, from a seed the
    stage sets (`reseed`): every process draws the same permutation and takes its own share
    (indices rank, rank + N, ...), so the k-th batches of the N processes together are the
    k-th global batch of that permutation. Seeded per stage and per pass, never from a
    counter that runs across stages, so a resumed run shuffles like an uninterrupted one."""

    def __init__(self, dataset: Any, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=0,
                         drop_last=False)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        self.base, self.passes = seed, 0

    def __iter__(self) -> Iterator[int]:
        self.set_epoch(derive_seed(self.base, "pass", self.passes))
        self.passes += 1
        return super().__iter__()


def sharded(loader: DataLoader, global_batch: int | None, seed: int) -> DataLoader:
    """This process's share of `loader`'s data, in batches of global_batch / processes
    (global_batch None: the loader's own batch size is the global one)."""
    if isinstance(loader.dataset, IterableDataset):
        raise DataError("the clean loader streams an iterable data set; a distributed "
                        "purification shards its clean data, so it needs a map-style one")
    global_batch = global_batch or loader.batch_size
    processes = world_size()
    if global_batch is None or global_batch % processes:
        raise SettingsError(f"the global batch size ({global_batch}) must be a multiple of the "
                            f"number of processes ({processes})")
    sampler = ShardSampler(loader.dataset, processes, rank(), seed)
    return DataLoader(loader.dataset, batch_size=global_batch // processes, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last)


def reseed_shards(loader: Any, seed: int) -> None:
    """Re-seed a `sharded` loader's shuffle (a no-op for any other loader)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, ShardSampler):
        sampler.reseed(seed)
