"""Multi-layer perceptrons: plain ReLU, or LayerNorm + GELU blocks (transformer-style MLP)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .normalize import default_normalize
from .registered import MODELS


@MODELS.register("mlp")
def mlp(num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
        hidden: Sequence[int] = (256, 128), norm: str = "none",
        activation: str = "relu", mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None) -> nn.Sequential:
    """Flatten → [Linear → (LayerNorm) → act] × len(hidden) → Linear.

    norm: 'none' or 'layernorm'; activation: 'relu' or 'gelu'.
    """
    acts = {"relu": nn.ReLU, "gelu": nn.GELU}
    if activation not in acts or norm not in ("none", "layernorm"):
        raise ValueError(f"activation must be relu|gelu and norm none|layernorm, "
                         f"got {activation!r}, {norm!r}")
    layers: list[nn.Module] = [default_normalize(in_channels, mean, std), nn.Flatten()]
    width = in_channels * image_size * image_size
    for size in hidden:
        layers.append(nn.Linear(width, size))
        if norm == "layernorm":
            layers.append(nn.LayerNorm(size))
        layers.append(acts[activation]())
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
