"""Helpers shared by the baseline defenses: find layers by what they do (never by architecture
names), measure clean accuracy and split off held-out clean data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from ..curve import fresh_control_point
from ..errors import DataError, SpecError
from ..training import device_of

BatchNorm = nn.modules.batchnorm._BatchNorm


def reinitialise(model: nn.Module, seed: int) -> None:
    """Give `model` a fresh, seeded initialisation of its architecture, BatchNorm statistics
    included: what a defense that throws the suspect weights away starts from."""
    model.load_state_dict({**model.state_dict(), **fresh_control_point(model, seed)})
    for module in model.modules():
        if isinstance(module, BatchNorm):
            module.reset_running_stats()


def inputs_of(batch: Any) -> Tensor:
    """The images of a batch: (images, labels, ...) or bare images."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy on labelled batches, in eval mode (the caller's mode is restored)."""
    device, was_training = device_of(model), model.training
    model.eval()
    correct = total = 0
    try:
        for x, y, *_ in loader:
            correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
            total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        raise DataError("cannot measure accuracy: the loader gave no batches")
    return correct / total


def split_loader(loader: DataLoader, fraction: float, seed: int) -> tuple[DataLoader, DataLoader]:
    """Split the loader's data set at random into (rest, held-out `fraction`), both unshuffled."""
    n = len(loader.dataset)  # type: ignore[arg-type]
    held = round(n * fraction)
    if not 0 < held < n:
        raise DataError(f"cannot hold out {fraction:.0%} of {n} clean images: both parts must "
                        f"be non-empty")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    options = dict(batch_size=loader.batch_size or 1, num_workers=loader.num_workers,
                   collate_fn=loader.collate_fn)
    return (DataLoader(Subset(loader.dataset, order[held:]), **options),
            DataLoader(Subset(loader.dataset, order[:held]), **options))


@dataclass(frozen=True)
class Output:
    """One submodule call seen during a forward pass."""

    name: str
    module: nn.Module
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Call:
    """One submodule call seen during a forward pass, with its first input and its output
    (held, so the tensors' ids stay unique while the calls are compared)."""

    name: str
    module: nn.Module
    input: Any
    output: Any


@torch.no_grad()
def module_calls(model: nn.Module, x: Tensor,
                 keep: Callable[[str, nn.Module], bool] = lambda name, module: bool(name)
                 ) -> list[Call]:
    """Every call of the kept submodules (default: all but the model itself) in one eval-mode
    forward, in order of completion (a container comes after its children). Buffers and
    training flags are left as they were."""
    calls: list[Call] = []

    def recorder(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            calls.append(Call(name, module, args[0] if args else None, output))
        return hook

    handles = [m.register_forward_hook(recorder(name))
               for name, m in model.named_modules() if keep(name, m)]
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        model(x.to(device_of(model)))
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in flags.items():
            m.training = flag
    return calls


def module_outputs(model: nn.Module, x: Tensor) -> list[Output]:
    """Every submodule call of one eval-mode forward that returns a tensor, with its shape."""
    return [Output(c.name, c.module, tuple(c.output.shape)) for c in module_calls(model, x)
            if isinstance(c.output, Tensor)]


def stage_outputs(model: nn.Module, x: Tensor) -> list[Output]:
    """The output of each resolution stage: for every spatial size of a 4-D feature map, in order,
    the last call among the outermost modules producing that size (e.g. a ResNet's `layer2`,
    a VGG's last ReLU before pooling)."""
    maps = [c for c in module_outputs(model, x) if len(c.shape) == 4]
    stages: dict[tuple[int, int], Output] = {}
    for size in dict.fromkeys(c.shape[2:] for c in maps):
        calls = [c for c in maps if c.shape[2:] == size]
        depth = min(c.name.count(".") for c in calls)
        stages[size] = [c for c in calls if c.name.count(".") == depth][-1]
    return list(stages.values())


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, nn.Conv2d, str | None, BatchNorm | None]]:
    """Every Conv2d with the BatchNorm that is the sole consumer of its output (None if its output
    goes anywhere else too, e.g. into a residual sum). Found by symbolic tracing, so no data."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as err:  # fx raises many types for untraceable Python
        raise SpecError(f"cannot trace {type(model).__name__} with torch.fx to pair convolutions "
                        f"with their BatchNorm layers: {err}") from err
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.Conv2d):
            continue
        users = list(node.users)
        bn_name = None
        if (len(users) == 1 and users[0].op == "call_module"
                and isinstance(modules[users[0].target], BatchNorm)):
            bn_name = str(users[0].target)
        pairs.append((str(node.target), modules[node.target], bn_name,
                      modules[bn_name] if bn_name else None))
    return pairs
