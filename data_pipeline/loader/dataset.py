"""Shard specs -> the dataset: sources (with their repeat, proportion or weight), their shards
and sample counts.

Counts come from `manifest.json` (what `umt shard` writes) or open_clip's `sizes.json`; for
shards named by a pattern with neither beside them, from their index files, else by reading
their tar headers. Only counts are needed to plan the order: no shard is opened to start.

A subset folder (`subset.json`, written by `umt data curate`) is a source too: its shards are the
source shards that keep samples, each counting only those; `Dataset.locate` maps a sample to its
position in the tar, so the order, dealing and resume work over the kept samples alone.

Sources are named (`specs`: by the spec, else after their folder); two sources may not share a
name, since with several sources every key a user sees is `name/key` (`Dataset.qualify`): keys
of datasets sharded apart collide (each starts at 000000000).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from data_pipeline import storage
from data_pipeline.loader.config import LoaderConfigError
from data_pipeline.loader.specs import (
    SourceSpec,
    check_mixture,
    parse_source_specs,
    split_top_level_commas,
)
from data_pipeline.subset import SubsetError, check_sources, read_subset_if_any
from data_pipeline.tar_index import TarIndexError, load_index

MANIFEST_FORMAT_VERSION = 1
__all__ = ["Dataset", "Shard", "Source", "SourceSpec", "parse_source_specs", "resolve_dataset",
           "split_top_level_commas"]  # fmt: skip


@dataclass(frozen=True)
class Shard:
    path: str
    count: int  # samples, from the manifest (or the index); of a subset shard, those kept
    bytes: int | None = None  # the tar's size, where the manifest says (checked on download)
    # A subset's shard: the tar positions of its kept samples, ascending (None: every sample).
    kept: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Source:
    name: str
    shards: tuple[Shard, ...]
    weight: float  # resampled mode's share of the draws (1 unless given)
    subset: dict | None = field(default=None, compare=False)  # a subset's summary (its rules)
    repeat: float | None = None  # epoch mode: samples per epoch = repeat x total_samples
    proportion: float | None = None  # epoch mode: this share of every epoch's samples

    @property
    def total_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def mixture(self) -> dict[str, float]:
        """What the spec gave of repeat / proportion (empty: once per epoch)."""
        given = {"repeat": self.repeat, "proportion": self.proportion}
        return {k: v for k, v in given.items() if v is not None}

    def digest(self) -> str:
        """Short hash of its name, shard names, counts (kept positions) and mixing fields."""
        listing = [self.name, self.weight, [_shard_listing(sh) for sh in self.shards]]
        if self.mixture:  # (absent from the digests of sources before mixtures: those resume)
            listing.append(self.mixture)
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Dataset:
    """Every shard of every source, flat, in spec order; sample `g` is sample `g - starts[s]` of
    shard `s` where starts are the cumulative counts."""

    sources: tuple[Source, ...]

    @cached_property
    def shards(self) -> tuple[Shard, ...]:
        return tuple(sh for s in self.sources for sh in s.shards)

    @cached_property
    def counts(self) -> np.ndarray:
        return np.array([sh.count for sh in self.shards], dtype=np.int64)

    @cached_property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    @cached_property
    def source_of_shard(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.sources)), [len(s.shards) for s in self.sources])

    @cached_property
    def first_shard(self) -> np.ndarray:
        """(sources + 1,) index of each source's first shard, then the number of shards."""
        return np.concatenate([[0], np.cumsum([len(s.shards) for s in self.sources])])

    @property
    def total_samples(self) -> int:
        return int(self.counts.sum())

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def qualify(self, shard: int, key: str | None) -> str | None:
        """The key a user sees: `source/key` with several sources, else the key as it is."""
        if key is None or len(self.sources) == 1:
            return key
        return f"{self.sources[int(self.source_of_shard[shard])].name}/{key}"

    def locate(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample ids -> (shard indices, sample indices in the tar)."""
        shard = np.searchsorted(self.starts, sample_ids, side="right") - 1
        index = np.asarray(sample_ids - self.starts[shard])
        for s in np.unique(shard) if self.has_subsets else ():
            kept = self.shards[int(s)].kept
            if kept is not None:
                mine = shard == s
                index[mine] = kept[index[mine]]
        return shard, index

    @cached_property
    def has_subsets(self) -> bool:
        return any(sh.kept is not None for sh in self.shards)

    def digest(self) -> str:
        """Short hash of shard names, counts and weights (a subset's kept positions, a source's
        repeat or proportion): a resumed state must see the same data."""
        listing = [
            (s.name, s.weight, [_shard_listing(sh) for sh in s.shards])
            + ((s.mixture,) if s.mixture else ())
            for s in self.sources
        ]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]

    def summary(self) -> dict:
        """What a checkpoint records of its training data (the model card of an export says it):
        the digest, samples, shards, and each source (its mixing fields, a subset's rules)."""
        return {
            "digest": self.digest(),
            "samples": self.total_samples,
            "shards": len(self.shards),
            "sources": [
                {
                    "name": s.name,
                    "samples": s.total_samples,
                    "shards": len(s.shards),
                    "weight": s.weight,
                    **s.mixture,
                    **({"subset": s.subset} if s.subset else {}),  # `umt data curate`'s rules
                }
                for s in self.sources
            ],
        }


def _shard_listing(shard: Shard) -> tuple:
    entry = (storage.basename(shard.path), shard.count)
    if shard.kept is None:
        return entry
    return (*entry, hashlib.sha256(shard.kept.astype("<i8").tobytes()).hexdigest()[:16])


_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """`x-{000..002}.tar` -> x-000.tar, x-001.tar, x-002.tar; `{a,b}` lists too; nested left to right."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    if r := _RANGE.match(body):
        lo, hi = r.groups()
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [out for item in items for out in expand_braces(head + item + tail)]


def read_shard_counts(folder: str) -> dict[str, tuple[int, int | None]] | None:
    """{shard file name: (samples, bytes or None)} from `folder/manifest.json`, else
    `folder/sizes.json` (no sizes), else None."""
    manifest = storage.join(folder, "manifest.json")
    if (text := storage.read_text_if_exists(manifest)) is not None:
        try:
            data = json.loads(text)
            version = data.get("format_version")
            if version != MANIFEST_FORMAT_VERSION:
                raise LoaderConfigError(
                    f"{manifest}: format_version {version!r} is not supported "
                    f"(this loader reads {MANIFEST_FORMAT_VERSION})"
                )
            return {
                s["name"]: (int(s["count"]), int(s["bytes"]) if "bytes" in s else None)
                for s in data["shards"]
            }
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise LoaderConfigError(f"{manifest} is not a shard manifest: {exc!r}") from exc
    sizes = storage.join(folder, "sizes.json")
    if (text := storage.read_text_if_exists(sizes)) is not None:
        try:
            return {name: (int(n), None) for name, n in json.loads(text).items()}
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            raise LoaderConfigError(f"{sizes} is not a {{name: count}} map: {exc!r}") from exc
    return None


def count_samples(path: str) -> int:
    """Samples of a shard without a manifest entry: from its index (built from the tar's headers
    when it has no index file)."""
    try:
        return len(load_index(path))
    except TarIndexError as exc:
        raise LoaderConfigError(f"data.shards: {exc}") from None


def default_name(location: str) -> str:
    """A source's name when its spec gives none: its folder's name (of a pattern or a .tar, the
    folder it is in)."""
    location = storage.normalize(location)
    if storage.is_dir(location):
        return storage.basename(location)
    return storage.basename(storage.parent(expand_braces(location)[0]))


def describe_change(old: str | list, new: str | list) -> str:
    """What a new shards spec changes of an old one, by source: `source c added; source b: x0.5
    -> x1` (sources named as `resolve_dataset` names them; nothing is read but folder listings)."""

    def named(shards) -> dict[str, SourceSpec]:
        return {s.name or default_name(s.location): s for s in parse_source_specs(shards)}

    def mix(spec: SourceSpec) -> str:
        m = spec.mixture
        if "proportion" in m:
            return f"proportion {m['proportion']:g}"
        return f"weight {m['weight']:g}" if "weight" in m else f"x{m.get('repeat', 1):g}"

    before, after = named(old), named(new)
    parts = [f"source {n} added" for n in after if n not in before]
    parts += [f"source {n} removed" for n in before if n not in after]
    for name in (n for n in after if n in before):
        a, b = before[name], after[name]
        what = [f"{x} -> {y}" for x, y in ((a.location, b.location), (mix(a), mix(b))) if x != y]
        if what:
            parts.append(f"source {name}: {', '.join(what)}")
    return "; ".join(parts) or "the same sources, written differently"


def resolve_source(spec: SourceSpec) -> Source:
    """One spec -> its shards with sample counts. A folder needs a manifest; a pattern uses one
    if beside it, else each shard's index (or its tar headers: a read per shard, fine for
    hundreds of local shards; write indexes with `umt data index` for more)."""
    location = storage.normalize(spec.location)
    name = spec.name or default_name(location)
    if storage.is_dir(location):
        counts = read_shard_counts(location)
        if counts is None and (subset := read_subset_source(location, spec, name)) is not None:
            return subset
        if counts is None:
            raise LoaderConfigError(
                f"data.shards: {location} has no manifest.json or sizes.json; for tars made by "
                f"another tool, `umt data index {location}` writes sizes.json (and the indexes), "
                f"or name the shards with a pattern like "
                f"{storage.join(location, 'data-{000000..000009}.tar')}"
            )
        paths = [storage.join(location, name) for name in counts]
    else:
        paths = expand_braces(location)
    # Remote shards are not checked one by one here (a request each): a missing one is named
    # when the loader first needs it.
    missing = [p for p in paths if not storage.is_remote(p) and not storage.is_file(p)]
    if missing:
        raise LoaderConfigError(
            f"data.shards: {len(missing)} of {len(paths)} shards of {spec.location!r} do not exist "
            f"(first: {missing[0]})"
        )
    folder_counts: dict[str, dict[str, int] | None] = {}
    if storage.is_dir(location) and paths:
        folder_counts[storage.parent(paths[0])] = counts  # read above: not again
    folder_sizes: dict[str, dict[str, int]] = {}
    shards = []
    for p in paths:
        folder = storage.parent(p)
        if folder not in folder_counts:
            folder_counts[folder] = read_shard_counts(folder)
        known = folder_counts[folder] or {}
        shard_name = storage.basename(p)
        count, size = known[shard_name] if shard_name in known else (count_samples(p), None)
        if size is None and storage.is_remote(p):
            # Sizes the manifest does not give (sizes.json, other tools' tars): one listing
            # of the folder, not a request per shard in every process that opens it.
            if folder not in folder_sizes:
                folder_sizes[folder] = storage.object_sizes(folder)
            size = folder_sizes[folder].get(shard_name)
        shards.append(Shard(p, count, size))
    return source_from(spec, name, tuple(shards))


def source_from(spec: SourceSpec, name: str, shards: tuple[Shard, ...], subset=None) -> Source:
    return Source(
        name, shards, spec.weight or 1.0, subset, repeat=spec.repeat, proportion=spec.proportion
    )


def read_subset_source(location: str, spec: SourceSpec, name: str) -> Source | None:
    """A subset folder as a source: the source shards keeping samples, their kept positions;
    None when `location` holds no subset. Refused when a source shard changed since."""
    try:
        subset = read_subset_if_any(location)
        if subset is None:
            return None
        check_sources(subset)
    except SubsetError as exc:
        raise LoaderConfigError(f"data.shards: {exc}") from None
    shards = tuple(
        Shard(s.path, len(s.kept), s.bytes, s.kept) for s in subset.shards if len(s.kept)
    )
    return source_from(spec, name, shards, subset.summary())


def resolve_dataset(shards: str | list, resampled: bool | None = None) -> Dataset:
    """All specs -> the dataset. `resampled` True refuses repeat and proportion, False refuses
    weights (`specs.check_mixture`); None takes either (reading in stored order ignores them)."""
    specs = parse_source_specs(shards)
    if not specs:
        raise LoaderConfigError("data.shards is empty: give a shard folder or pattern")
    check_mixture(specs, resampled)
    sources = [resolve_source(spec) for spec in specs]
    seen: dict[str, int] = {}
    for i, source in enumerate(sources):
        if source.name in seen:
            first = specs[seen[source.name]].location
            raise LoaderConfigError(
                f"data.shards: sources {first} and {specs[i].location} would both be named "
                f"{source.name!r} (keys are name/key): name them, e.g. "
                f"{source.name}_a={first},{source.name}_b={specs[i].location}"
            )
        seen[source.name] = i
    for spec, source in zip(specs, sources):
        if source.total_samples == 0:
            label = spec.label if spec.name else f"source {source.name!r} ({spec.location})"
            raise LoaderConfigError(f"data.shards: {label} holds no samples")
    return Dataset(tuple(sources))
