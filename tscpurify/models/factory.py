"""A user's own architecture, named as an importable factory: 'package.module:function'.

The factory is any callable that returns an `nn.Module` (a class works too), imported the way
`python -m` would see it: the current folder comes first on the import path, as uvicorn and
gunicorn do, so `tscpurify purify --arch mymodels:make_net` finds ./mymodels.py.

Importing runs code, so only a name the user gives (a command-line flag, an API argument) is
ever imported; a name read from a model.json is not, unless the user passes the same name again
(`checkpoint.load_model(..., trusted_arch=...)`): an untrusted run folder must not be able to
run code, just as its weights are never unpickled.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import SettingsError


def is_factory_path(arch: str) -> bool:
    """Whether `arch` names an importable factory rather than a registered model."""
    return ":" in arch


def import_factory(path: str) -> Callable[..., nn.Module]:
    """The callable that 'package.module:attribute[.attribute]' names; one-line errors."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute or ":" in attribute:
        raise SettingsError(f"--arch {path!r} must look like package.module:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise SettingsError(f"cannot import {module_name!r} for --arch {path!r}: {err} (run "
                            f"from the folder that holds it, or add it to PYTHONPATH)") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise SettingsError(f"{module_name!r} has no {attribute!r} (--arch {path!r})")
        target = getattr(target, part)
    if not callable(target):
        raise SettingsError(f"--arch {path!r} is not callable")
    return target


def build_from_factory(path: str, **kwargs: Any) -> nn.Module:
    """Call the factory `path` names with `kwargs`; it must return an `nn.Module`."""
    factory = import_factory(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = factory(**kwargs)
    except TypeError as err:
        raise SettingsError(f"{path} does not accept these arguments {kwargs}: {err}") from None
    if not isinstance(model, nn.Module):
        raise SettingsError(f"{path} returned {type(model).__name__}, not a torch nn.Module")
    return model
