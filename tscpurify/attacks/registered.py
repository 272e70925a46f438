"""The attack registry, in a module of its own: every attack module registers itself here,
and nothing depends on the order of statements in the package's `__init__`."""

from ..registry import Registry

ATTACKS: Registry = Registry("attack")
