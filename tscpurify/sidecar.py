"""A run folder's model.json, typed: what tscpurify reads from it, checked once, here.

The sidecar travels with the weights and may come from an untrusted source, so it is parsed
strictly: known keys only (a typo such as "kwarg" would otherwise fall back to defaults),
JSON types checked, the architecture a registered model or an importable factory that is
imported only when the user names it (`checkpoint.build_model`). Records that tscpurify writes
for people (how the model was trained, its SSL and evaluation settings, who purified it) are
kept as written.

Schema version: "format" is "tscpurify-model/1". A later schema gets a new number, and this
module the reader of every version it accepts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .models import MODELS
from .models.factory import is_factory_path

SIDECAR = "model.json"
SIDECAR_FORMAT = "tscpurify-model/1"
KINDS = ("classifier", "encoder", "clip")


@dataclass(frozen=True)
class DataRef:
    """The data set a model was trained on: a registered loader's name and its files' folder
    (None: the loader's default place)."""

    name: str
    root: str | None = None


@dataclass(frozen=True)
class Sidecar:
    arch: str  # a registered model, or the user's own factory "module:function"
    kwargs: dict[str, Any] = field(default_factory=dict)
    kind: str = "classifier"  # what it is and so how it is judged: tscpurify.run_kinds
    dataset: DataRef | None = None
    attack: dict[str, Any] | None = None  # the attack's record (evaluation only); None: clean
    classes: tuple[str, ...] | None = None
    seed: int | None = None
    # Records for people, kept as written.
    train: dict[str, Any] | None = None
    poisoned: int | None = None
    tool_version: str | None = None
    ssl: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None  # an encoder's probe protocol
    purified_by: dict[str, Any] | None = None
    format: str = SIDECAR_FORMAT

    def to_json(self) -> dict[str, Any]:
        """The model.json object: "format" first; "attack" and "dataset" always (null says
        something), other fields when set."""
        data: dict[str, Any] = {"format": self.format}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "format" or value is None and f.name not in ("attack", "dataset"):
                continue
            if isinstance(value, DataRef):
                value = dataclasses.asdict(value)
            elif isinstance(value, tuple):
                value = list(value)
            data[f.name] = value
        return data


# model.json keys and the JSON types of each.
TYPES: dict[str, type | tuple[type, ...]] = {
    "format": str, "arch": str, "kwargs": dict, "kind": str, "dataset": (dict, type(None)),
    "attack": (dict, type(None)), "classes": list, "seed": int, "train": dict, "poisoned": int,
    "tool_version": str, "ssl": dict, "evaluation": dict, "purified_by": dict}


JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number",
              bool: "boolean", (dict, type(None)): "object or null"}


def parse_sidecar(data: Any, path: Path | str = SIDECAR) -> Sidecar:
    """A Sidecar from model.json's object, or a one-line CheckpointError naming `path`."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    if data.get("format") != SIDECAR_FORMAT:
        raise CheckpointError(f"{path} is not a {SIDECAR_FORMAT} sidecar")
    unknown = sorted(set(data) - set(TYPES))
    if unknown:  # a typo (e.g. "kwarg") would otherwise be ignored and the defaults used
        raise CheckpointError(f"{path} has unknown key(s) {', '.join(map(repr, unknown))}; "
                              f"known: {', '.join(sorted(TYPES))}")
    for key, value in data.items():
        kind = TYPES[key]
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise CheckpointError(f"{path}: {key!r} must be a JSON {JSON_NAMES[kind]}, got "
                                  f"{JSON_NAMES.get(type(value), type(value).__name__)}")
    arch = data.get("arch")
    if not isinstance(arch, str) or arch not in MODELS and not is_factory_path(arch):
        raise CheckpointError(f"{path} names unknown architecture {arch!r}")
    kind = data.get("kind", "classifier")
    if kind not in KINDS:
        raise CheckpointError(f"{path}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    dataset = data.get("dataset") or None  # {} from an older writer: not said
    if dataset is not None:
        if set(dataset) - {"name", "root"} or not isinstance(dataset.get("name"), str) \
                or not isinstance(dataset.get("root") or "", str):
            raise CheckpointError(f"{path}: dataset must be {{\"name\": str, \"root\": str or "
                                  f"null}}")
        dataset = DataRef(dataset["name"], dataset.get("root"))
    classes = data.get("classes")
    return Sidecar(**{**data, "kind": kind, "dataset": dataset, "kwargs": data.get("kwargs") or {},
                      "classes": tuple(map(str, classes)) if classes is not None else None})
