"""The model registry, in a module of its own: every model module registers itself here,
and nothing depends on the order of statements in the package's `__init__`."""

from ..registry import Registry

MODELS: Registry = Registry("model")
