"""`--materialize OUT`: a subset's kept samples written as shards with the sharder's writer.

One output shard per source shard that keeps samples, in the subset's order (`data-NNNNNN.tar`),
each sample's members copied byte for byte under their names: the same keys, counts and order
as the subset, so training on these shards sees the same samples at every step as training on
the subset. Each tar is written under a temporary name and renamed, with its index; manifest.json
(and sizes.json) come last. A folder holding shards this subset did not make is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from data_pipeline import storage
from data_pipeline.curate.options import CurateError
from data_pipeline.shard.manifest import (
    file_sha256,
    remove_dead_writers_temporaries,
    write_json_atomic,
)
from data_pipeline.shard.write import TarMembers
from data_pipeline.shard_cache import ShardCache, default_cache_dir
from data_pipeline.subset import Subset
from data_pipeline.tar_index import (
    TarIndex,
    index_location,
    load_index,
    split_members,
    write_index,
)

MARKER = ".umt-materialized.json"  # which subset (its sha256) this folder holds
CREATED_BY = "umt data curate --materialize"


def check_destination(dest: Path, subset_sha: str | None, overwrite: bool) -> None:
    """Accept `dest` when it is new, or holds this subset's shards (a resumed run); with
    `overwrite`, clear what another materialization wrote. `subset_sha` None: the subset is not
    written yet, only shards this command did not make are refused."""
    if not dest.exists():
        return
    if not dest.is_dir():
        raise CurateError(f"--materialize {dest}: a file is there, not a folder")
    marker = dest / MARKER
    made_from = json.loads(marker.read_text()).get("subset_sha256") if marker.is_file() else None
    ours = made_from is not None and (subset_sha is None or made_from == subset_sha)
    holds = any(dest.glob("*.tar")) or (dest / "manifest.json").exists()
    if ours or not (holds or marker.is_file()):
        return
    if not overwrite:
        whose = "another subset's shards" if made_from else "shards that this command did not make"
        raise CurateError(
            f"--materialize {dest} already holds {whose}; choose another folder or pass --overwrite"
        )
    if subset_sha is not None:  # replaced: only what a materialization writes
        for pattern in ("data-*.tar", "data-*.index.json", ".data-*.tmp"):
            for path in dest.glob(pattern):
                path.unlink()
        for name in ("manifest.json", "sizes.json", MARKER):
            (dest / name).unlink(missing_ok=True)


def materialize(subset: Subset, subset_sha: str, dest: Path, cache_dir: str | None) -> dict:
    """Write the shards, their indexes, manifest.json and sizes.json; returns the manifest."""
    dest.mkdir(parents=True, exist_ok=True)
    remove_dead_writers_temporaries(dest)  # of a run killed mid-write
    write_json_atomic(dest / MARKER, {"subset": subset.location, "subset_sha256": subset_sha})
    cache = None
    entries = []
    for shard in (s for s in subset.shards if len(s.kept)):
        name = f"data-{len(entries):06d}.tar"
        final = dest / name
        if not (final.is_file() and Path(index_location(str(final))).is_file()):
            if storage.is_remote(shard.path) and cache is None:
                cache = ShardCache(cache_dir or default_cache_dir())
            write_kept(shard.path, shard.bytes, shard.kept.tolist(), final, cache)
        entries.append(
            {
                "name": name,
                "count": len(shard.kept),
                "bytes": final.stat().st_size,
                "sha256": file_sha256(final),
                "source": shard.path,
            }
        )
    manifest = {
        "format_version": 1,
        "created_by": CREATED_BY,
        "prefix": "data",
        "shards": entries,
        "total_samples": sum(e["count"] for e in entries),
        "subset": subset.summary(),
    }
    write_json_atomic(dest / "sizes.json", {e["name"]: e["count"] for e in entries})
    write_json_atomic(dest / "manifest.json", manifest)
    return manifest


def write_kept(
    path: str, size: int, positions: list[int], final: Path, cache: ShardCache | None
) -> None:
    """The samples at `positions` of the tar at `path`, members as they are, into `final`."""
    held = cache.acquire(path, size) if cache is not None else None
    local = str(held.path) if held is not None else path
    temporary = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        index = load_index(path, local if held is not None else None)
        keys, offsets, lengths = [], [], []
        with open(local, "rb") as source, open(temporary, "wb") as handle:
            tar = TarMembers(handle)
            for position in positions:
                key = index.keys[position]
                source.seek(index.offsets[position])
                members = split_members(source.read(index.lengths[position]))
                keys.append(key)
                offsets.append(tar.offset)
                for extension, data in members.items():
                    tar.add(f"{key}.{extension}", data)
                lengths.append(tar.offset - offsets[-1])
            tar.close()
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        if held is not None:
            held.release()
    tar_index = TarIndex(
        final.name, final.stat().st_size, tuple(keys), tuple(offsets), tuple(lengths)
    )
    write_index(tar_index, index_location(str(final)))
