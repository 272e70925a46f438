"""Tiny models and data shared by the permutation tests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tscpurify.models import create_model

from ..conftest import randomize_norms

# Every registered architecture the engine must handle, at width 4-8.
ARCHS: dict[str, tuple[str, dict]] = {
    "mlp": ("mlp", {"hidden": (16, 8)}),
    "mlp-ln-gelu": ("mlp", {"hidden": (16, 8), "norm": "layernorm", "activation": "gelu"}),
    "cnn": ("cnn", {"width": 4}),
    "vgg11": ("vgg", {"depth": 11, "width": 8}),
    "preactresnet18": ("preactresnet18", {"width": 4}),
    "resnet18": ("resnet18", {"width": 4}),
}
SHAPES = [(1, 28), (3, 32)]  # (in_channels, image size)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`case` runs a test on every (architecture, in_channels, size); `arch` on every model."""
    if "case" in metafunc.fixturenames:
        cases = [(arch, c, s) for arch in ARCHS for c, s in SHAPES]
        metafunc.parametrize("case", cases, ids=[f"{a}-{c}x{s}" for a, c, s in cases])
    elif "arch" in metafunc.fixturenames:
        metafunc.parametrize("arch", list(ARCHS))


def build(arch: str, channels: int = 1, size: int = 28, seed: int = 0) -> nn.Module:
    name, kwargs = ARCHS[arch]
    kwargs = dict(kwargs, in_channels=channels)
    if name in ("mlp", "cnn"):  # the others pool globally and take any size
        kwargs["image_size"] = size
    torch.manual_seed(seed)
    model = create_model(name, **kwargs)
    randomize_norms(model, seed)
    return model.eval()


def images(channels: int = 1, size: int = 28, n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def batches(x: torch.Tensor, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A loader: (images, labels) pairs; the labels must be ignored by matching."""
    return [(x[i:i + size], torch.zeros(len(x[i:i + size]), dtype=torch.long))
            for i in range(0, len(x), size)]


def output_scale(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model.eval()(x).abs().max())


@pytest.fixture
def kit() -> SimpleNamespace:
    """The helpers above, as a fixture."""
    return SimpleNamespace(build=build, images=images, batches=batches,
                           output_scale=output_scale, randomize_norms=randomize_norms)


@pytest.fixture(autouse=True)
def _one_thread():
    """Width-4 models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    spin-waiting makes them ten times slower; restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
