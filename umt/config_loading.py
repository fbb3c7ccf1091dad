"""Typed configs from plain mappings: dataclasses checked field by field against their
annotations (bool, int, float, str, dict, Literal choices, optional values, lists, tuples,
nested dataclasses), unknown keys refused with the closest name, `a.b.c=value` overrides, and
every error one line naming the key and where it came from (the override, else the file).
`umt.config` holds UMT's own sections; this module knows none of them."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import re
import textwrap
import types
import typing
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; convert where it is lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(
            f"{key} must be {', '.join(map(str, choices[:-1]))} or {choices[-1]} "
            f"(got {value!r}){source}"
        )
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        literal = [a for a in args if typing.get_origin(a) is Literal]
        if literal and len(args) == 2 and type(None) in args:  # a choice or null
            choices = (*typing.get_args(literal[0]), "null")
            if value in choices[:-1]:
                return value
            raise ConfigError(
                f"{key} must be {', '.join(map(str, choices[:-1]))} or null (got {value!r}){source}"
            )
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key} must be {_type_name(tp)} (got {value!r}){source}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list (got {value!r}){source}")
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(
                f"{key} must be a list of {len(items)} values (got {value!r}){source}"
            )
        return tuple(
            _coerce(v, t, f"{key}[{i}]", source) for i, (v, t) in enumerate(zip(value, items))
        )
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping (got {value!r}){source}")
        return from_dict(tp, value, key, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"{key} must be {_type_name(tp)} (got {value!r}){source}")


def from_dict(cls: type, data: dict, prefix: str = "", source: str = "") -> Any:
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise `ConfigError`."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {full}{source}{hint}")
        kwargs[key] = _coerce(value, hints[key], full, source)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain, YAML-safe dict of a config (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML: 3, 1e-4, true, [1, 2], text)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_path(d: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        d = d.setdefault(part, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
    d[path[-1]] = value


def blame(message: str, given: dict[str, str], source: str) -> str:
    """ " (override 'k=v')" when `message` names a key an override set (or a section of it),
    else `source` (" in FILE", or "" without one)."""

    def names(key: str) -> bool:
        return re.search(rf"(?<![\w.]){re.escape(key)}(?![\w.])", message) is not None

    latest_first = list(given.items())[::-1]
    for key, text in latest_first:  # the key itself first, then a section it is in
        if names(key):
            return f" (override {text!r})"
    for key, text in latest_first:
        parts = key.split(".")
        if any(names(".".join(parts[:n])) for n in range(len(parts) - 1, 0, -1)):
            return f" (override {text!r})"
    return source


def reference_rows(cls: type, obj: Any, prefix: str = "") -> list[str]:
    """Markdown rows `| key | default | meaning |` of every field of `obj` (a `cls`), nested
    sections flattened, meanings from the fields' docstrings."""
    rows = []
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            rows += reference_rows(type(value), value, key + ".")
        else:
            rows.append(f"| `{key}` | `{value!r}` | {docs.get(f.name, '')} |")
    return rows


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal after a field) of a dataclass."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
