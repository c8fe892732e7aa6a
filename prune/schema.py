"""Typed mappings: YAML / JSON mappings checked against dataclasses, and the other way round.

Recipes (``prune/recipe.py``, ``prune/analysis/recipe.py``) and reports (``eval/report.py``) are
dataclasses; :func:`from_mapping` builds one from a parsed mapping, checking every key and type
against the dataclass's annotations, and raises :class:`SchemaError` naming the key at fault
(``pruning.target: expected float, got 'lots'``). A field's constraint sits on the field
(``target: float = ruled(within(0, 1, high_open=True), 0.3)``, a :class:`Rule`); :func:`field_checks` checks them
all and :func:`json_schema` writes the dataclass, its constraints and its attribute docstrings as JSON Schema
(what ``python -m prune.run --schema`` prints for editors).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import math
import re
import textwrap
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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
    if isinstance(hint, type) and hasattr(hint, "from_mapping"):  # a mapping type that builds itself
        return hint.from_mapping(value, key)
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


def check_known_keys(data: dict, names: list[str], prefix: str) -> None:
    """SchemaError for the first key of ``data`` not in ``names``, suggesting the closest known one."""
    dotted = f"{prefix}." if prefix else ""
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{dotted}{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise SchemaError(f"{dotted}{key}: unknown key{hint}")


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
    check_known_keys(data, names, prefix)
    for f in fields:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            raise SchemaError(f"{dotted}{f.name}: missing")
    values = {name: convert(data[name], hints[name], f"{dotted}{name}") for name in names if name in data}
    return cls(**values)


@dataclass(frozen=True)
class Rule:
    """A constraint on one field, declared on it (``field(metadata={RULE: rule})``, or :func:`ruled`): the test of
    a value of the field's type, the words of the error line (``must be > 0``) and the same constraint as JSON
    Schema keywords. Words and keywords are read when used, so a name registered later is a name allowed. A field
    that admits null is tested only when set, and its words end in "or null" (unless they name null)."""

    test: Callable[[Any], bool]
    words: Callable[[], str]
    keywords: Callable[[], dict] = dict


RULE = "rule"
"""The metadata key of a field's :class:`Rule`."""


def ruled(rule: Rule, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a default and a rule."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={RULE: rule})


def above(bound: float) -> Rule:
    return Rule(lambda v: v > bound, lambda: f"must be > {bound}", lambda: {"exclusiveMinimum": bound})


def at_least(bound: float) -> Rule:
    return Rule(lambda v: v >= bound, lambda: f"must be >= {bound}", lambda: {"minimum": bound})


def within(low: float, high: float, high_open: bool = False) -> Rule:
    """low <= value <= high (< high when ``high_open``)."""
    upper = {"exclusiveMaximum": high} if high_open else {"maximum": high}
    return Rule(
        lambda v: low <= v < high if high_open else low <= v <= high,
        lambda: f"must be in [{low}, {high}{')' if high_open else ']'}",
        lambda: {"minimum": low, **upper},
    )


def one_of(names: Callable[[], Iterable[str]]) -> Rule:
    """A name among ``names()`` (a registry's keys, read when checked)."""
    return Rule(
        lambda v: v in list(names()), lambda: "must be one of " + ", ".join(names()), lambda: {"enum": list(names())}
    )


def names_among(names: Callable[[], Iterable[str]], least: int, words: Callable[[], str]) -> Rule:
    """A list of at least ``least`` distinct names among ``names()``."""
    return Rule(
        lambda v: len(v) >= least and len(set(v)) == len(v) and set(v) <= set(names()),
        words,
        lambda: {"minItems": least, "uniqueItems": True, "items": {"enum": list(names())}},
    )


def matching(pattern: str, words: str) -> Rule:
    """A string the regular expression ``pattern`` matches whole."""
    return Rule(lambda v: re.fullmatch(pattern, v) is not None, lambda: words, lambda: {"pattern": f"^(?:{pattern})$"})


NOT_EMPTY = Rule(lambda v: bool(v.strip()), lambda: "must not be empty", lambda: {"pattern": r"\S"})
LAYER_SPAN = Rule(
    lambda v: len(v) == 2 and 0 <= v[0] < v[1],
    lambda: "must be null or [first, end] with 0 <= first < end",
    lambda: {"minItems": 2, "maxItems": 2, "items": {"minimum": 0}},
)
"""[first, end]: layers first .. end - 1."""


def _admits_none(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)


def field_checks(instance: Any, prefix: str = "") -> list[tuple[str, bool, str]]:
    """(dotted key, ok, words) of every field rule of the dataclass ``instance`` and of the dataclasses in it, in
    field order, for :func:`raise_first_failure`."""
    checks = []
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        value, key, rule = getattr(instance, f.name), prefix + f.name, f.metadata.get(RULE)
        if rule is not None and value is not None:
            words = rule.words()
            if _admits_none(hints[f.name]) and "null" not in words:
                words += " or null"
            checks.append((key, rule.test(value), words))
        if dataclasses.is_dataclass(value):
            checks += field_checks(value, key + ".")
        elif isinstance(value, dict):  # a mapping of sections (a recipe's evaluation settings)
            for name, item in value.items():
                if dataclasses.is_dataclass(item):
                    checks += field_checks(item, f"{key}.{name}.")
    return checks


def attribute_docs(cls: type) -> dict[str, str]:
    """The docstrings written under a class's attributes, by attribute (none when its source cannot be read)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in itertools.pairwise(body):
        text = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else None
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(text, str):
            docs[node.target.id] = inspect.cleandoc(text)
    return docs


def _hint_schema(hint: Any) -> dict:
    """The JSON Schema of values :func:`convert` accepts for ``hint``."""
    if dataclasses.is_dataclass(hint):
        return json_schema(hint, top=False)  # type: ignore[arg-type]
    if isinstance(hint, type) and hasattr(hint, "json_schema"):  # a mapping type that describes itself
        return hint.json_schema()
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return {"anyOf": [_hint_schema(option) for option in typing.get_args(hint)]}
    if typing.get_origin(hint) is Literal:
        return {"enum": list(typing.get_args(hint))}
    if typing.get_origin(hint) is list:
        return {"type": "array", "items": _hint_schema(typing.get_args(hint)[0])}
    if typing.get_origin(hint) is dict:
        return {"type": "object", "additionalProperties": _hint_schema(typing.get_args(hint)[1])}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}
    return {"type": simple[hint]} if hint in simple else {}


def _with_keywords(schema: dict, keywords: dict) -> dict:
    """``schema`` with a rule's keywords added (to each branch but null of a union)."""
    if "anyOf" in schema:
        branches = [b if b.get("type") == "null" else _with_keywords(b, keywords) for b in schema["anyOf"]]
        return {**schema, "anyOf": branches}
    return {**schema, **keywords}


def json_schema(cls: type, top: bool = True) -> dict:
    """The JSON Schema (draft 2020-12) of the mappings :func:`from_mapping` accepts for the dataclass ``cls``:
    types, defaults, the fields' rules, attribute docstrings as descriptions, unknown keys refused. The rules'
    checks of several fields together (``prune/recipe.py``'s cross-field rules) are not in it."""
    hints, docs = typing.get_type_hints(cls), attribute_docs(cls)
    properties, required = {}, []
    for f in dataclasses.fields(cls):
        schema = _hint_schema(hints[f.name])
        if RULE in f.metadata:
            schema = _with_keywords(schema, f.metadata[RULE].keywords())
        if f.default is not dataclasses.MISSING:
            schema["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING and "properties" not in schema:  # not a section
            schema["default"] = f.default_factory()
        elif f.default_factory is dataclasses.MISSING:
            required.append(f.name)
        if f.name in docs:
            schema["description"] = docs[f.name]
        properties[f.name] = schema
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    doc = inspect.getdoc(cls)
    if doc and not doc.startswith(f"{cls.__name__}("):  # not the signature dataclasses write
        schema["description"] = doc
    if top:
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": cls.__name__, **schema}
    return schema


def to_mapping(instance: Any) -> dict:
    """A dataclass instance as nested plain mappings and lists (JSON / YAML ready)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, list):
            return [plain(item) for item in value]
        return value

    return plain(dataclasses.asdict(instance))


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
            raise SchemaError(f"{path}: the recipe is empty; write at least one key (see docs/recipes.md)")
        if not isinstance(data, dict):
            raise SchemaError(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment)
    return data
