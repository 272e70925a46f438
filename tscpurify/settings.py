"""Settings dataclasses ⇄ argparse flags and JSON, so flags never drift from the API."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, TypeVar

S = TypeVar("S")


def _base_type(annotation: Any) -> Any:
    """`int | None` → int; plain types pass through."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def _tuple_parser(item: type):
    """A flag type for `tuple[item, ...]` fields, written as comma-separated values."""
    def parse(text: str) -> tuple:
        try:
            return tuple(item(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {item.__name__} values, got {text!r}") from None
    parse.__name__ = f"{item.__name__},..."
    return parse


def add_settings_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One flag per field of `cls`, typed from its annotation, default and help from the field
    (a `tuple[T, ...]` field takes comma-separated values)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for field in dataclasses.fields(cls):
        flag = "--" + prefix + field.name.replace("_", "-")
        kind = _base_type(hints[field.name])
        # argparse %-formats help strings, so a literal "7%" in a field's help would crash --help
        help_text = field.metadata.get("help", "").replace("%", "%%")
        default = field.default
        if typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            group.add_argument(flag, dest=prefix + field.name, type=_tuple_parser(item),
                               default=None, metavar=item.__name__.upper() + ",...",
                               help=f"{help_text} (default: "
                                    f"{','.join(map(str, default))})")
        elif kind is bool:
            group.add_argument(flag, dest=prefix + field.name, default=None,
                               action=argparse.BooleanOptionalAction,
                               help=f"{help_text} (default: {default})")
        else:
            group.add_argument(flag, dest=prefix + field.name, type=kind, default=None,
                               metavar=kind.__name__.upper(),
                               help=f"{help_text} (default: {default})")


def settings_from_args(cls: type[S], args: argparse.Namespace, base: S | None = None,
                       prefix: str = "") -> S:
    """Build `cls` from parsed flags; flags left unset keep the value in `base` (or the default)."""
    base = base if base is not None else cls()
    changes = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(args, prefix + field.name, None)
        if value is not None:
            changes[field.name] = value
    return dataclasses.replace(base, **changes)  # type: ignore[type-var]


def to_dict(settings: Any) -> dict[str, Any]:
    return dataclasses.asdict(settings)


def settings_hash(*parts: Any) -> str:
    """Short stable name for a combination of settings (bench cells, caches)."""
    text = json.dumps([to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.md5(text.encode()).hexdigest()[:10]
