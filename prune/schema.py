"""Typed mappings: YAML / JSON mappings checked against dataclasses, and the other way round.

Recipes (``prune/recipe.py``, ``prune/analysis/recipe.py``) and reports (``eval/report.py``) are
dataclasses; :func:`from_mapping` builds one from a parsed mapping, checking every key and type
against the dataclass's annotations, and raises :class:`SchemaError` naming the key at fault
(``pruning.target: expected float, got 'lots'``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class SchemaError(ValueError):
    """A mapping that does not fit its dataclass; the message names the key at fault."""


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if isinstance(hint, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if typing.get_origin(hint) is dict:
        return f"a mapping to {_type_name(typing.get_args(hint)[1])}"
    if dataclasses.is_dataclass(hint):
        return "a mapping of keys"
    if hint is float:
        return "a finite number"
    return {type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))


def convert(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``hint``; return it (ints accepted as floats, dataclasses built)."""
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, key)  # type: ignore[arg-type]
    if hint is Any:
        return value
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        for option in typing.get_args(hint):
            try:
                return convert(value, option, key)
            except SchemaError:
                continue
    elif typing.get_origin(hint) is Literal:
        if value in typing.get_args(hint):
            return value
    elif typing.get_origin(hint) is list:
        if isinstance(value, list):
            return [convert(item, typing.get_args(hint)[0], f"{key}[{i}]") for i, item in enumerate(value)]
    elif typing.get_origin(hint) is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {k: convert(v, typing.get_args(hint)[1], f"{key}.{k}") for k, v in value.items()}
    elif hint is type(None):
        if value is None:
            return None
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, hint):
        return value
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise SchemaError(f"{key}: expected {_type_name(hint)}, got {shown}")


def from_mapping(cls: type[T], data: Any, prefix: str = "") -> T:
    """An instance of the dataclass ``cls`` from ``data``; unknown keys, wrong types and missing required keys
    raise :class:`SchemaError` naming the key (``prefix`` is the dotted path of ``data``)."""
    where = prefix or "recipe"
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: expected a mapping of keys, got {data!r}"[:200])
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    names = [f.name for f in fields]
    dotted = f"{prefix}." if prefix else ""
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{dotted}{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise SchemaError(f"{dotted}{key}: unknown key{hint}")
    for f in fields:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            raise SchemaError(f"{dotted}{f.name}: missing")
    values = {name: convert(data[name], hints[name], f"{dotted}{name}") for name in names if name in data}
    return cls(**values)


def to_mapping(instance: Any) -> dict:
    """A dataclass instance as nested plain mappings and lists (JSON / YAML ready)."""
    return dataclasses.asdict(instance)


def lookup(instance: Any, key: str) -> Any:
    """The value of a dotted ``key`` (``pruning.target``) in nested dataclasses."""
    value = instance
    for part in key.split("."):
        value = getattr(value, part)
    return value


def raise_first_failure(instance: Any, checks: list[tuple[str, bool, str]]) -> None:
    """Raise SchemaError for the first (key, ok, message) check that failed, quoting the key's value."""
    for key, ok, message in checks:
        if not ok:
            raise SchemaError(f"{key}: {message}, got {lookup(instance, key)!r}")


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``--set a.b.c=value`` to the raw mapping ``data`` (value parsed as YAML)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise SchemaError(f"--set {assignment!r}: expected KEY=VALUE, for example pruning.target=0.2")
    *parents, leaf = key.strip().split(".")
    node = data
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SchemaError(f"--set {key}: {'.'.join(parents[: i + 1])} is not a section")
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise SchemaError(f"--set {key}: the value {raw!r} is not valid YAML") from None


def read_yaml_mapping(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The YAML mapping of a recipe file (an empty mapping without a file) with ``--set`` overrides applied.

    A file that is empty, not valid YAML, or whose document is not a mapping raises SchemaError.
    """
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SchemaError(f"{path}: recipe file not found" + (" (it is a directory)" if path.is_dir() else ""))
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SchemaError(f"{path}: not valid YAML ({first_line})") from None
        if data is None:
            raise SchemaError(f"{path}: the recipe is empty; write at least one key (see README, 'Recipe reference')")
        if not isinstance(data, dict):
            raise SchemaError(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment)
    return data
