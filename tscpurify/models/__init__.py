"""Models by name. Every model takes pixels in [0, 1]; normalisation is its first layer.

Any `nn.Module` works through the Python API; registering one only gives it a CLI name.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from ..errors import SettingsError

# Importing the modules registers their entrypoints (in .registered).
from . import (  # noqa: F401
    clip,
    cnn,
    convnext,
    densenet,
    encoder,
    mlp,
    preact_resnet,
    resnet,
    vgg,
    vit,
)
from .registered import MODELS


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model, e.g. create_model('cnn', num_classes=10, width=16)."""
    builder = MODELS.get(name)
    try:
        with warnings.catch_warnings():  # torch warns before the check below can say why
            warnings.simplefilter("ignore", UserWarning)
            model = builder(**kwargs)
    except TypeError as err:
        raise SettingsError(f"model {name!r} does not accept these arguments: {err}") from None
    except (ValueError, RuntimeError) as err:  # e.g. width 0: a layer refuses its size
        raise SettingsError(f"model {name!r} cannot be built with {kwargs}: {err}") from None
    empty = [n for n, p in model.named_parameters() if p.numel() == 0]
    if empty:
        raise SettingsError(f"model {name!r} with {kwargs} has empty layers ({empty[0]}, ...): "
                            f"sizes such as the width must be positive")
    return model


__all__ = ["MODELS", "create_model"]
