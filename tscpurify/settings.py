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


def nested_fields(cls: type) -> dict[str, type]:
    """The fields of `cls` that hold settings dataclasses of their own (TSCSettings.curve)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if dataclasses.is_dataclass(hints[f.name])}


def add_settings_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "",
                       defaults: Any = None, alias_prefix: str | None = None) -> None:
    """One flag per field of `cls`, typed from its annotation, default and help from the field
    (a `tuple[T, ...]` field takes comma-separated values). A nested settings field gets its
    own flags under its name, TSCSettings.curve.epochs as --curve-epochs, and as --epochs too
    when its owner has no field of that name (the flag it had before the curve's knobs were
    declared once). `defaults` (an instance) supplies the defaults the help shows, for a nested
    field whose owner sets its own (TSC's curve is not CurveSettings' reference default)."""
    hints = typing.get_type_hints(cls)
    nested = nested_fields(cls)
    group = parser.add_argument_group(cls.__name__)
    for field in dataclasses.fields(cls):
        default = getattr(defaults, field.name) if defaults is not None else (
            field.default if field.default is not dataclasses.MISSING
            else field.default_factory())  # type: ignore[misc]
        if field.name in nested:
            owner_names = {f.name for f in dataclasses.fields(cls)}
            add_settings_flags(parser, nested[field.name], f"{prefix}{field.name}-", default,
                               alias_prefix=prefix if alias_prefix is None else None)
            for inner in dataclasses.fields(nested[field.name]):
                if inner.name in owner_names:  # no short alias could be told apart
                    raise SettingsError(f"{cls.__name__}.{inner.name} shadows "
                                        f"{field.name}.{inner.name}")
            continue
        flags = ["--" + prefix + field.name.replace("_", "-")]
        if alias_prefix is not None:
            flags.append("--" + alias_prefix + field.name.replace("_", "-"))
        kind = _base_type(hints[field.name])
        # argparse %-formats help strings, so a literal "7%" in a field's help would crash --help
        help_text = field.metadata.get("help", "").replace("%", "%%")
        if typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            group.add_argument(*flags, dest=prefix + field.name, type=_tuple_parser(item),
                               default=None, metavar=item.__name__.upper() + ",...",
                               help=f"{help_text} (default: "
                                    f"{','.join(map(str, default))})")
        elif kind is bool:
            group.add_argument(*flags, dest=prefix + field.name, default=None,
                               action=argparse.BooleanOptionalAction,
                               help=f"{help_text} (default: {default})")
        else:
            group.add_argument(*flags, dest=prefix + field.name,
                               type=finite_float if kind is float else kind, default=None,
                               metavar=kind.__name__.upper(),
                               help=f"{help_text} (default: {default})")


# Torch computes in float32: a setting past its range (lr 1e300) is a traceback mid-training
# ("value cannot be converted to type float without overflow"), so it is refused with NaN.
FLOAT32_MAX = 3.4028234663852886e38


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
                and math.isfinite(value) and abs(value) <= FLOAT32_MAX)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation this check does not know: trusted


def validate_settings(settings: Any) -> None:
    """Refuse a settings dataclass whose values do not fit their annotations (a string where a
    count belongs, NaN where a rate belongs), naming the field; nested settings included."""
    replace_settings(settings, **{f.name: getattr(settings, f.name)
                                  for f in dataclasses.fields(settings)})
    for name in nested_fields(type(settings)):
        validate_settings(getattr(settings, name))


def route_flat_names(cls: type, changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` with each name that is not a field of `cls` but of exactly one of its nested
    settings moved into that field's changes: {"epochs": 60} (or {"curve.epochs": 60}) for
    TSCSettings becomes {"curve": {"epochs": 60}}. So grids, presets and `overrides=` may name
    a curve knob flat, as they did before the curve's knobs were declared once, in
    CurveSettings."""
    names = {f.name for f in dataclasses.fields(cls)}
    nested = nested_fields(cls)
    routed: dict[str, Any] = {}
    flat: dict[str, dict[str, Any]] = {}
    for name, value in changes.items():
        outer, dot, rest = name.partition(".")
        if dot and outer in nested:  # "curve.epochs", as errors list the nested names
            flat.setdefault(outer, {})[rest] = value
            continue
        owners = [outer for outer, inner in nested.items()
                  if name not in names and name in {f.name for f in dataclasses.fields(inner)}]
        if len(owners) == 1:
            flat.setdefault(owners[0], {})[name] = value
        else:
            routed[name] = value
    for outer, inner in flat.items():
        given = routed.get(outer, {})
        if isinstance(given, dict):
            routed[outer] = {**given, **inner}
        elif dataclasses.is_dataclass(given):  # an instance, single fields changed on top
            routed[outer] = replace_settings(given, **inner)
        # else: a value of the wrong type, which replace_settings names
    return routed


def all_setting_names(cls: type) -> list[str]:
    """Field names, nested ones dotted (curve.epochs): what an error lists as the known ones."""
    nested = nested_fields(cls)
    return [name for f in dataclasses.fields(cls)
            for name in ([f"{f.name}.{n}" for n in all_setting_names(nested[f.name])]
                         if f.name in nested else [f.name])]


def replace_settings(settings: S, **changes: Any) -> S:
    """`dataclasses.replace` that names an unknown field (with the known ones) or a value of the
    wrong type, as a SettingsError, before the dataclass's own checks compare it with anything.
    A nested settings field takes an instance or a dict of its own changes; a nested field's
    name alone reaches it when no other field has that name (`route_flat_names`)."""
    cls = type(settings)
    changes = route_flat_names(cls, changes)
    names = [f.name for f in dataclasses.fields(settings)]  # type: ignore[arg-type]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise SettingsError(f"{cls.__name__} has no setting "
                            f"{', '.join(map(repr, unknown))}; its settings: "
                            f"{', '.join(all_setting_names(cls))}")
    hints = typing.get_type_hints(cls)
    nested = nested_fields(cls)
    for name, value in list(changes.items()):
        if name in nested and isinstance(value, dict):
            changes[name] = replace_settings(getattr(settings, name), **value)
        elif not _fits(value, hints[name]):
            expected = getattr(hints[name], "__name__", str(hints[name]))
            if expected == "float":
                expected = "a finite float within float32's range (|x| ≤ 3.4e38)"
            raise SettingsError(f"{cls.__name__}.{name} must be {expected}, got {value!r}")
    return dataclasses.replace(settings, **changes)  # type: ignore[type-var]


def settings_from_args(cls: type[S], args: argparse.Namespace, base: S | None = None,
                       prefix: str = "") -> S:
    """Build `cls` from parsed flags; flags left unset keep the value in `base` (or the default)."""
    base = base if base is not None else cls()
    return replace_settings(base, **overrides_from_args(cls, args, prefix))


def overrides_from_args(cls: type, args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The fields of `cls` the user set by flag (generated flags default to None = unset); a
    nested field's as a dict of its own ({"curve": {"epochs": 10}})."""
    nested = nested_fields(cls)
    found: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in nested:
            inner = overrides_from_args(nested[field.name], args, f"{prefix}{field.name}-")
            if inner:
                found[field.name] = inner
        elif getattr(args, prefix + field.name, None) is not None:
            found[field.name] = getattr(args, prefix + field.name)
    return found


def to_dict(settings: Any) -> dict[str, Any]:
    return dataclasses.asdict(settings)


def settings_hash(*parts: Any) -> str:
    """Short stable name for a combination of settings (bench cells, caches)."""
    text = json.dumps([to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.md5(text.encode()).hexdigest()[:10]
