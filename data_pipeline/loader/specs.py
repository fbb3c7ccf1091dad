"""`data.shards`, the spec language: parsed here and only here (the loader, `umt data`, and the
run config's path absolutisation all read it through this module).

A spec is a string of comma-separated entries (commas inside braces belong to a pattern) or a
list of entries. An entry is a string `[NAME=]LOCATION[:MIX]` or a mapping
`{path: LOCATION, name: NAME, repeat: R}` / `{path: ..., proportion: P}` / `{path: ..., weight: W}`:

    LOCATION  a shard folder (read through its manifest.json or sizes.json), a subset folder
              (`umt data curate`), a brace pattern `/d/cc-{000000..000099}.tar`, or one .tar;
              local, s3:// or http(s)://
    NAME      the source's name, default its folder's name; with several sources every key a user
              sees is NAME/KEY
    :xR       repeat R > 0: each sample R times per epoch; a fraction takes a rotating part
              (x0.25: a quarter each epoch, every sample once in four epochs)
    :P%       proportion P percent of every epoch's samples (all sources give one, summing to 100)
    :W        weight W > 0, resampled mode only: the source's share of the draws

`repeat` and `proportion` are epoch mode's (exact counts per epoch), `weight` resampled mode's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from data_pipeline import storage
from data_pipeline.loader.config import LoaderConfigError

SOURCE_FIELDS = ("path", "name", "repeat", "proportion", "weight")
MIX_FIELDS = ("repeat", "proportion", "weight")
PROPORTION_TOLERANCE = 1e-6  # proportions must sum to 1 within this (then are normalised exactly)

_NAME = re.compile(r"^([A-Za-z_][\w.-]*)=(.+)$")
_VALID_NAME = re.compile(r"^[A-Za-z_][\w.-]*$")
_NUMBER = r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_MIX = re.compile(rf"^(.+):(x?)({_NUMBER})(%?)$")


@dataclass(frozen=True)
class SourceSpec:
    name: str | None
    location: str
    weight: float | None = None
    repeat: float | None = None
    proportion: float | None = None

    @property
    def label(self) -> str:
        """How messages name the source: `source 'coco' (/d/coco)` or `source /d/coco`."""
        return f"source {self.name!r} ({self.location})" if self.name else f"source {self.location}"

    @property
    def mixture(self) -> dict[str, float]:
        """The mixing fields given: {repeat: 2} / {proportion: 0.3} / {weight: 4} / {}."""
        return {k: getattr(self, k) for k in MIX_FIELDS if getattr(self, k) is not None}


def split_top_level_commas(text: str) -> list[str]:
    """Split on commas outside braces: `a-{0,1}.tar,b` -> [`a-{0,1}.tar`, `b`]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def entries_of(shards: str | list | None) -> list[Any]:
    """The entries of a spec: a string split at top-level commas, a list as it is."""
    if shards is None or shards == "":
        return []
    if isinstance(shards, str):
        return split_top_level_commas(shards)
    if isinstance(shards, list | tuple):
        return list(shards)
    raise LoaderConfigError(f"data.shards must be a string or a list (got {shards!r})")


def split_entry(entry: str) -> tuple[str | None, str, str]:
    """A string entry -> (name or None, location, mix suffix text such as `:x2` or ``)."""
    name, rest = None, entry.strip()
    if m := _NAME.match(rest):
        name, rest = m.group(1), m.group(2)
    if (m := _MIX.match(rest)) and _is_suffix(rest, m.group(1)):
        return name, m.group(1), rest[len(m.group(1)) :]
    return name, rest, ""


def _is_suffix(text: str, location: str) -> bool:
    """Whether `:...` ends `text` as a mix suffix (not a port, nor part of a local name)."""
    if storage.is_remote(text):
        return "/" in location.split("://", 1)[1]  # s3://b/x:2 yes; http://host:8080 no
    return not storage.is_file(text) and not storage.is_dir(text)


def parse_source_specs(shards: str | list | None) -> list[SourceSpec]:
    """Every entry of a spec, each checked alone (`check_mixture` checks them together)."""
    return [parse_entry(entry) for entry in entries_of(shards)]


def parse_entry(entry: Any) -> SourceSpec:
    if isinstance(entry, dict):
        return _parse_mapping(entry)
    if not isinstance(entry, str) or not entry.strip():
        raise LoaderConfigError(
            f"data.shards: an entry must be a path or a mapping with a path (got {entry!r})"
        )
    name, location, suffix = split_entry(entry)
    fields: dict[str, float] = {}
    if suffix:
        times, number, percent = _MIX.match(location + suffix).groups()[1:]
        if times and percent:
            raise LoaderConfigError(
                f"data.shards: {_where(name, location)}: {suffix!r} gives both a repeat (x) and a "
                "proportion (%): give one"
            )
        key = "repeat" if times else "proportion" if percent else "weight"
        value = float(Fraction(number) / 100) if percent else float(number)
        fields[key] = value
    spec = SourceSpec(name, location, **fields)
    _check_fields(spec)
    return spec


def _parse_mapping(entry: dict) -> SourceSpec:
    path, name = entry.get("path"), entry.get("name")
    where = _where(name if isinstance(name, str) else None, path if isinstance(path, str) else "?")
    unknown = [k for k in entry if k not in SOURCE_FIELDS]
    if unknown:
        raise LoaderConfigError(
            f"data.shards: {where}: unknown field {unknown[0]!r} (a source takes "
            f"{', '.join(SOURCE_FIELDS)})"
        )
    if not isinstance(path, str) or not path.strip():
        raise LoaderConfigError(f"data.shards: {where}: path must be a location (got {path!r})")
    if name is not None and not isinstance(name, str):
        raise LoaderConfigError(f"data.shards: {where}: name must be text (got {name!r})")
    fields = {}
    for key in MIX_FIELDS:
        value = entry.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise LoaderConfigError(f"data.shards: {where}: {key} must be a number (got {value!r})")
        fields[key] = float(value)
    spec = SourceSpec(name, path.strip(), **fields)
    _check_fields(spec)
    return spec


def _where(name: str | None, location: str) -> str:
    return SourceSpec(name, location).label


def _check_fields(spec: SourceSpec) -> None:
    if spec.name is not None and not _VALID_NAME.match(spec.name):
        raise LoaderConfigError(
            f"data.shards: {spec.label}: a name starts with a letter or _ and holds letters, "
            f"digits, _, . and - (got {spec.name!r})"
        )
    for key, value in spec.mixture.items():
        if not value > 0 or value == float("inf"):
            raise LoaderConfigError(f"data.shards: {spec.label}: {key} must be > 0 (got {value:g})")
    if len(spec.mixture) > 1:
        given = " and ".join(spec.mixture)
        raise LoaderConfigError(f"data.shards: {spec.label}: give one of {given}, not both")


def check_mixture(specs: list[SourceSpec], resampled: bool | None) -> None:
    """The specs together: weights only in resampled mode, repeat and proportion only in epoch
    mode (`resampled` None: either), and proportions given by every source or none, summing to 1."""
    if resampled is False and (weighted := [s for s in specs if s.weight is not None]):
        s = weighted[0]
        raise LoaderConfigError(
            f"data.shards: {s.label}: a weight (:{s.weight:g}) only applies with resampled=True "
            "(--resampled); epoch mode reads every shard once, or as its repeat or proportion says"
        )
    if resampled is True and (mixed := [s for s in specs if s.repeat or s.proportion]):
        s = mixed[0]
        key = "repeat" if s.repeat else "proportion"
        raise LoaderConfigError(
            f"data.shards: {s.label}: {key} is for epoch mode (exact counts per epoch); resampled "
            "mode draws shards by weight: give weight instead"
        )
    with_proportion = [s for s in specs if s.proportion is not None]
    if not with_proportion:
        return
    if len(with_proportion) < len(specs):
        other = next(s for s in specs if s.proportion is None)
        raise LoaderConfigError(
            f"data.shards: {other.label} has no proportion while {with_proportion[0].label} has "
            "one: give every source a proportion, or none"
        )
    total = sum(exact(s.proportion) for s in specs)
    if abs(total - 1) > PROPORTION_TOLERANCE:
        listed = ", ".join(f"{s.name or s.location} {s.proportion:g}" for s in specs)
        raise LoaderConfigError(
            f"data.shards: the proportions sum to {float(total):g}, not 1 ({listed})"
        )


def exact(value: float) -> Fraction:
    """A config number as the exact decimal a person wrote (0.1 -> 1/10, not the float's binary)."""
    return Fraction(repr(value))


def map_locations(shards: Any, change: Callable[[str], str]) -> Any:
    """The same spec, in the form it was given, with every location replaced by `change(it)`
    (names, mix suffixes, mappings' other fields and brace patterns untouched)."""

    def entry(item: Any) -> Any:
        if isinstance(item, dict) and isinstance(item.get("path"), str):
            return {**item, "path": change(item["path"])}
        if isinstance(item, str) and item.strip():
            name, location, suffix = split_entry(item)
            return f"{name + '=' if name else ''}{change(location)}{suffix}"
        return item

    if isinstance(shards, str):
        return ",".join(entry(e) for e in split_top_level_commas(shards)) if shards else shards
    if isinstance(shards, list):
        return [entry(e) for e in shards]
    return shards
