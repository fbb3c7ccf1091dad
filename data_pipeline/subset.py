"""Subsets: a view over shards that `umt data curate` writes and every shard reader takes.

A subset is a folder whose `subset.json` names source shards and the samples kept in each:

    {"format_version": 1, "created_by": "umt data curate",
     "sources": ["/data/cc", ...],            the shard specs curated
     "rules": {...},                          the options that decided what was kept
     "samples": N, "kept": K, "removed": {"near_duplicate": n, ...},
     "shards": [{"path": "/data/cc/data-000000.tar", "sha256": "...", "bytes": 1234,
                 "manifest_sha256": "...", "samples": 100, "kept": 80,
                 "runs": [[0, 10], [12, 70]]}, ...]}

`runs` are [first position, count] ranges of the kept samples, positions counting a tar's samples
in stored order (its index); `samples` is how many of the shard's samples were curated (all, or
those a subset given as input kept). A shard with nothing kept is listed all the same (its sha256 is part
of the record) but adds no sample. `sha256` and `bytes` are those of the file read;
`manifest_sha256` what its folder's manifest said then (null without one). Beside it: `removed.jsonl` (each removed sample with its
reason and evidence) and the per-sample table of hashes and scores.

Nothing in the source shards changes; the subset records each one's sha256 and size, and a
source that changed since is refused in one line (`check_sources`): the positions would point at
other samples.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from data_pipeline import storage

SUBSET_FILE = "subset.json"
REMOVED_FILE = "removed.jsonl"
FORMAT_VERSION = 1
CREATED_BY = "umt data curate"


class SubsetError(ValueError):
    """A subset that cannot be read or no longer matches its source shards; names the file."""


@dataclass(frozen=True)
class SubsetShard:
    path: str
    sha256: str  # of the file as read
    bytes: int
    manifest_sha256: str | None  # its folder's manifest's entry when the subset was made
    samples: int  # of the source shard, curated (all of it, or a subset's kept ones)
    kept: np.ndarray = field(compare=False, repr=False)  # (k,) positions kept, ascending


@dataclass(frozen=True)
class Subset:
    location: str  # the subset folder
    manifest: dict = field(compare=False, repr=False)
    shards: tuple[SubsetShard, ...]

    @property
    def kept(self) -> int:
        return sum(len(s.kept) for s in self.shards)

    def summary(self) -> dict:
        """What a model card and `umt data inspect` say of it: where, rules, counts."""
        m = self.manifest
        return {
            "subset": self.location,
            "sources": m.get("sources", []),
            "rules": m.get("rules", {}),
            "samples": m.get("samples"),
            "kept": m.get("kept"),
            "removed": m.get("removed", {}),
        }


def runs_of(positions: np.ndarray) -> list[list[int]]:
    """Ascending positions -> [[first, count], ...] of consecutive runs."""
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [positions.size]])
    return [[int(positions[s]), int(e - s)] for s, e in zip(starts, ends)]


def positions_of(runs: list[list[int]]) -> np.ndarray:
    if not runs:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n in runs])


def subset_file(folder: str) -> str:
    return storage.join(folder, SUBSET_FILE)


def read_subset_if_any(folder: str) -> Subset | None:
    """The subset in `folder`, or None when it holds no subset.json."""
    where = subset_file(folder)
    text = storage.read_text_if_exists(where)
    if text is None:
        return None
    try:
        data = json.loads(text)
        if data.get("format_version") != FORMAT_VERSION:
            raise SubsetError(
                f"{where}: format_version {data.get('format_version')!r} is not supported "
                f"(this version reads {FORMAT_VERSION})"
            )
        shards = []
        for entry in data["shards"]:
            kept = positions_of(entry["runs"])
            if len(kept) != int(entry["kept"]) or len(kept) > int(entry["samples"]):
                raise SubsetError(f"{where}: the runs of {entry['path']} do not match its counts")
            shards.append(
                SubsetShard(
                    str(entry["path"]),
                    str(entry["sha256"]),
                    int(entry["bytes"]),
                    entry.get("manifest_sha256"),
                    int(entry["samples"]),
                    kept,
                )
            )
    except SubsetError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SubsetError(f"{where} is not a subset manifest: {exc!r}") from None
    return Subset(folder, data, tuple(shards))


def source_shas(folder: str) -> dict[str, str]:
    """{shard file name: sha256} from a source folder's manifest.json (empty without one)."""
    text = storage.read_text_if_exists(storage.join(folder, "manifest.json"))
    if text is None:
        return {}
    try:
        return {s["name"]: s["sha256"] for s in json.loads(text)["shards"] if s.get("sha256")}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def check_sources(subset: Subset) -> None:
    """Refuse (SubsetError, one line) a subset whose source shards changed since it was made:
    another sha256 in their folder's manifest than then, or another size on local disk. Cheap:
    one manifest read per source folder and a stat per local shard (`verify_sources` reads all)."""
    manifests: dict[str, dict[str, str]] = {}
    for shard in subset.shards:
        folder = storage.parent(shard.path)
        if folder not in manifests:
            manifests[folder] = source_shas(folder)
        now = manifests[folder].get(storage.basename(shard.path))
        if now != shard.manifest_sha256:
            said = f"sha256 {now[:12]}…" if now else "nothing of it"
            then = shard.manifest_sha256
            before = f"{then[:12]}… then" if then else "nothing of it then"
            raise SubsetError(
                changed(subset, shard, f"its folder's manifest says {said}, {before}")
            )
        if not storage.is_remote(shard.path):
            if not storage.is_file(shard.path):
                raise SubsetError(changed(subset, shard, "it is missing"))
            size = storage.size(shard.path)
            if size != shard.bytes:
                raise SubsetError(changed(subset, shard, f"{size} bytes, not {shard.bytes}"))


def changed(subset: Subset, shard: SubsetShard, how: str) -> str:
    return (
        f"{subset_file(subset.location)}: source shard {shard.path} changed since the subset "
        f"was made ({how}; recorded sha256 {shard.sha256[:12]}…): curate it again"
    )


def verify_sources(subset: Subset, sha256_of) -> list[str]:
    """Every source shard's sha256 recomputed (`sha256_of(path)`): the problems, one line each."""
    problems = []
    for shard in subset.shards:
        try:
            digest = sha256_of(shard.path)
        except (OSError, storage.StorageError) as exc:
            problems.append(changed(subset, shard, f"cannot be read: {exc}"))
            continue
        if digest != shard.sha256:
            problems.append(changed(subset, shard, f"its sha256 is now {digest[:12]}…"))
    return problems


def counts_by_source(subset: Subset) -> dict[str, Counter]:
    """{source folder: Counter(kept=n, <reason>=n, ...)} from subset.json and removed.jsonl."""
    counts: dict[str, Counter] = {}
    for shard in subset.shards:
        counts.setdefault(storage.parent(shard.path), Counter())["kept"] += len(shard.kept)
    text = storage.read_text_if_exists(storage.join(subset.location, REMOVED_FILE)) or ""
    for line in text.splitlines():
        record = json.loads(line)
        counts.setdefault(storage.parent(record["shard"]), Counter())[record["reason"]] += 1
    return counts
