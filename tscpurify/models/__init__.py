"""Models by name. Every model takes pixels in [0, 1]; normalisation is its first layer.

Any `nn.Module` works through the Python API; registering one only gives it a CLI name.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import SettingsError
from ..registry import Registry

MODELS: Registry = Registry("model")

# Importing the modules registers their entrypoints.
from . import clip, cnn, encoder, mlp, preact_resnet, resnet, vgg  # noqa: E402,F401


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model, e.g. create_model('cnn', num_classes=10, width=16)."""
    builder = MODELS.get(name)
    try:
        return builder(**kwargs)
    except TypeError as err:
        raise SettingsError(f"model {name!r} does not accept these arguments: {err}") from None


__all__ = ["MODELS", "create_model"]
