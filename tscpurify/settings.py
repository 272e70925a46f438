"""Settings dataclasses ⇄ argparse flags and JSON, so flags never drift from the API."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import types
import typing
from typing import Any, TypeVar

from .errors import SettingsError

S = TypeVar("S")


def _base_type(annotation: Any) -> Any:
    """`int | None` → int; plain types pass through."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def finite_float(text: str) -> float:
    """A float flag's type: NaN and infinity are refused (argparse's float takes them)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


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
            group.add_argument(flag, dest=prefix + field.name,
                               type=finite_float if kind is float else kind, default=None,
                               metavar=kind.__name__.upper(),
                               help=f"{help_text} (default: {default})")


def _fits(value: Any, annotation: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if typing.get_origin(annotation) is tuple:
        item = typing.get_args(annotation)[0]
        return isinstance(value, (tuple, list)) and all(_fits(v, item) for v in value)
    if annotation is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation this check does not know: trusted


def validate_settings(settings: Any) -> None:
    """Refuse a settings dataclass whose values do not fit their annotations (a string where a
    count belongs, NaN where a rate belongs), naming the field."""
    replace_settings(settings, **{f.name: getattr(settings, f.name)
                                  for f in dataclasses.fields(settings)})


def replace_settings(settings: S, **changes: Any) -> S:
    """`dataclasses.replace` that names an unknown field (with the known ones) or a value of the
    wrong type, as a SettingsError, before the dataclass's own checks compare it with anything."""
    names = [f.name for f in dataclasses.fields(settings)]  # type: ignore[arg-type]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise SettingsError(f"{type(settings).__name__} has no setting "
                            f"{', '.join(map(repr, unknown))}; its settings: {', '.join(names)}")
    hints = typing.get_type_hints(type(settings))
    for name, value in changes.items():
        if not _fits(value, hints[name]):
            expected = getattr(hints[name], "__name__", str(hints[name]))
            raise SettingsError(f"{type(settings).__name__}.{name} must be "
                                f"{'a finite ' if expected == 'float' else ''}{expected}, got "
                                f"{value!r}")
    return dataclasses.replace(settings, **changes)  # type: ignore[type-var]


def settings_from_args(cls: type[S], args: argparse.Namespace, base: S | None = None,
                       prefix: str = "") -> S:
    """Build `cls` from parsed flags; flags left unset keep the value in `base` (or the default)."""
    base = base if base is not None else cls()
    return dataclasses.replace(base, **overrides_from_args(cls, args, prefix))  # type: ignore[type-var]


def overrides_from_args(cls: type, args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The fields of `cls` the user set by flag (generated flags default to None = unset)."""
    return {field.name: getattr(args, prefix + field.name)
            for field in dataclasses.fields(cls)
            if getattr(args, prefix + field.name, None) is not None}


def to_dict(settings: Any) -> dict[str, Any]:
    return dataclasses.asdict(settings)


def settings_hash(*parts: Any) -> str:
    """Short stable name for a combination of settings (bench cells, caches)."""
    text = json.dumps([to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.md5(text.encode()).hexdigest()[:10]
