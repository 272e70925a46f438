"""Backdoor attacks by name. Each is a frozen dataclass that triggers [0, 1] pixels and
rebuilds itself from its JSON record, so evaluation can re-create the exact trigger."""

from __future__ import annotations

from typing import Any

from ..errors import SettingsError
from ..settings import replace_settings

# Importing the modules registers them (in .registered).
from . import (  # noqa: F401
    badnets,
    blended,
    ctrl,
    input_aware,
    label_consistent,
    sig,
    trojannn,
    wanet,
)
from .base import Attack, poison_dataset
from .registered import ATTACKS


def create_attack(name: str, **kwargs: Any) -> Attack:
    cls = ATTACKS.get(name)
    try:
        # Through replace_settings, so every value is checked against its field's type first:
        # a record or --attack-arg with size 2.5 or all_to_all "yes" would otherwise pass the
        # range checks and fail mid-training (or silently mean something else).
        return replace_settings(cls(), **kwargs)
    except TypeError as err:
        raise SettingsError(f"attack {name!r} does not accept these arguments: {err}") from None


def attack_from_record(record: dict[str, Any]) -> Attack:
    """Rebuild an attack from `Attack.record()` output."""
    if not isinstance(record, dict) or "name" not in record:
        raise SettingsError("an attack record must be a JSON object with a 'name'")
    fields = {k: v for k, v in record.items() if k != "name"}
    return create_attack(record["name"], **fields)


__all__ = ["ATTACKS", "Attack", "attack_from_record", "create_attack", "poison_dataset"]
