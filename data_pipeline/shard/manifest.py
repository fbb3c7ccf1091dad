"""Bookkeeping of a run: done-records, the output folder's identity, manifest, merges."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline import storage
from data_pipeline.shard import output as shard_output
from data_pipeline.shard.options import RUN_ONLY_FIELDS, OtherRunError, ShardError, ShardOptions
from data_pipeline.shard.plan import WorkItem
from data_pipeline.shard.sources import Row
from data_pipeline.tar_index import INDEX_SUFFIX, index_location


@dataclass
class ShardRecord:
    """The done-record of a shard, also the source of its manifest entry and errors."""

    name: str
    index: int
    count: int = 0  # samples
    bytes: int = 0
    sha256: str = ""
    rows: int = 0  # rows finished here (written + failed); rolled-over rows are not counted
    written: int = 0
    dropped_captions: int = 0
    failures: list[dict] = field(default_factory=list)
    overflow: list[WorkItem] = field(default_factory=list)  # rows rolled over (maxsize)


FORMAT_VERSION = 1


CREATED_BY = "umt shard"


STATE_DIR = ".umt-shard"  # run.json (fingerprint) and done/{shard}.json records


@dataclass
class ShardSummary:
    """What a run (or a merge) wrote; `line()` is the one-line report."""

    out: Path | str  # a folder, or the s3:// URL the run published to
    rows: int
    written: int
    failed: int
    failures: dict[str, int]
    samples: int
    shards: int
    resumed_shards: int = 0
    dropped_captions: int = 0

    def line(self) -> str:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self.failures.items())
        failed = f"{self.failed} failed" + (f" ({reasons})" if reasons else "")
        resumed = f", {self.resumed_shards} already done" if self.resumed_shards else ""
        return (
            f"{self.rows} rows: {self.written} written, {failed}; "
            f"{self.samples} samples in {self.shards} shards{resumed} -> {self.out}"
        )


def done_path(out: Path, name: str) -> Path:
    return out / STATE_DIR / "done" / f"{name}.json"


def record_to_json(record: ShardRecord) -> dict:
    data = asdict(record)
    data["overflow"] = [list(item) for item in record.overflow]
    return data


def load_done_record(out: Path, name: str, publish: str | None = None) -> ShardRecord | None:
    """The record of a finished shard, or None if the shard must be (re)written. The shard must
    be there with its size: in `out`, or in the store for a published run."""
    path = done_path(out, name)
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    data["overflow"] = [WorkItem(*item) for item in data["overflow"]]
    record = ShardRecord(**data)
    if record.count:
        if publish:
            size = shard_output.remote_size(publish, name)
        else:
            size = (out / name).stat().st_size if (out / name).is_file() else None
        if size != record.bytes:
            return None
    return record


def write_json_atomic(path: Path, data: Any, lines: bool = False) -> None:
    """Write JSON (or JSON Lines for a list with lines=True) under a temporary name, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if lines:
        text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in data)
    else:
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:  # a full disk, say: leave no partial file behind
        temporary.unlink(missing_ok=True)
        raise


def remove_dead_writers_temporaries(folder: Path, pattern: str = ".*.tmp") -> list[Path]:
    """Delete `.NAME.PID.tmp` files (what the atomic writes leave) matching `pattern` of writers
    no longer running: a run killed mid-write leaves one; a live process's (a concurrent run)
    is kept."""
    removed = []
    for path in folder.glob(pattern) if folder.is_dir() else ():
        pid = path.name.rsplit(".", 2)[-2]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def run_identity(
    rows: list[Row], source_format: str, input_path: Path, options: ShardOptions
) -> dict:
    """What makes two runs the same: the rows read and every option that changes the output."""
    digest = hashlib.sha256()
    for row in rows:
        image = row.image if isinstance(row.image, bytes) else row.image.encode("utf-8", "replace")
        fields_ = [row.file, str(row.index), row.image_key, *row.captions, *row.extra]
        digest.update(json.dumps(fields_, ensure_ascii=True).encode() + b"\0")
        digest.update(hashlib.sha256(image).digest())
        digest.update((row.problem.reason if row.problem else "").encode() + b"\n")
    args = {k: v for k, v in asdict(options).items() if k not in RUN_ONLY_FIELDS}
    args = json.loads(json.dumps(args))  # as run.json reads back (tuples become lists)
    return {
        "input": {
            "path": str(input_path),
            "format": source_format,
            "rows": len(rows),
            "rows_sha256": digest.hexdigest(),
            # the file itself: tells an edited input from options that read it otherwise
            "file_sha256": file_sha256(input_path) if input_path.is_file() else None,
        },
        "args": args,
    }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_output(
    out: Path, identity: dict, options: ShardOptions, publish: str | None = None
) -> None:
    """Create `out`, or check that it holds this same run; refuse anything else. For a published
    run, `out` is the staging folder and the store's state decides (pulled into it first)."""
    run_file = out / STATE_DIR / "run.json"
    if options.overwrite:
        clear_output(out, options.prefix)
        if publish:
            shard_output.clear(publish, options.prefix)
    if publish:
        shard_output.pull_state(publish, out)
    if run_file.is_file():
        existing = json.loads(run_file.read_text(encoding="utf-8"))
        differences = identity_differences(existing, identity)
        if differences:
            raise OtherRunError(publish or out, differences)
        return
    foreign = (
        shard_output.foreign_outputs(publish, options.prefix)
        if publish
        else out.is_dir()
        and (any(out.glob(f"{options.prefix}-*.tar")) or any(out.glob("manifest*.json")))
    )
    if foreign:
        raise ShardError(
            f"{publish or out} already holds shards or a manifest that this command did not make "
            f"(no {STATE_DIR}/run.json); pass --overwrite to replace them, or choose another --out"
        )
    write_json_atomic(run_file, identity)
    if publish:
        shard_output.publish(out, publish, f"{STATE_DIR}/run.json")


def identity_differences(old: dict, new: dict) -> list[str]:
    """What differs between the run that wrote a folder and this one, each in words."""
    differences = []
    defaults = json.loads(json.dumps(asdict(ShardOptions())))
    for name, value in new["args"].items():
        # An option newer than the run that wrote the folder: that run had its default.
        before = old.get("args", {}).get(name, defaults.get(name))
        if before != value:
            differences.append(f"--{name.replace('_', '-')} was {before}, now {value}")
    old_input, new_input = old.get("input", {}), new["input"]
    if old_input.get("rows_sha256") != new_input["rows_sha256"]:
        path, rows_then, rows_now = new_input["path"], old_input.get("rows"), new_input["rows"]
        same_file = old_input.get("file_sha256") and (
            old_input.get("file_sha256") == new_input.get("file_sha256")
        )
        counts = (
            f"{rows_then} rows then, {rows_now} now"
            if rows_then != rows_now
            else (f"{rows_now} rows then and now, other content")
        )
        if old_input.get("path") != path:
            differences.append(f"the input was {old_input.get('path')}, now {path} ({counts})")
        elif not same_file:
            differences.append(f"{path} changed since that run ({counts})")
        elif not differences:  # the same file read otherwise, and no option says why
            differences.append(f"{path} is unchanged but reads as other rows ({counts})")
    return differences


def clear_output(out: Path, prefix: str) -> None:
    """Delete what a run writes in `out` (shards, temporaries, manifests, state), nothing else."""
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    patterns = (
        f"{prefix}-*.tar",
        f"{prefix}-*.tar.tmp",
        f"{prefix}-*{INDEX_SUFFIX}",
        "manifest*.json",
        "sizes.json",
        "errors*.jsonl",
    )
    for pattern in patterns:
        for path in out.glob(pattern):
            path.unlink()


def remove_stale_temporaries(out: Path, names: list[str]) -> None:
    """Temporaries a killed run left of these shards (a tar, its index or its done-record being
    written by another worker at the kill): only this run's own shards, since the parts of a job
    array share the folder and may be writing theirs. One listing of each folder, however many
    shards (a glob per shard would list a folder of 100k shards 100k times)."""
    names = set(names)
    index_of = {Path(index_location(str(out / name))).name: name for name in names}
    for path in out.glob("*.tmp"):  # {name}.tmp, {index}.{pid}.tmp
        if path.name.removesuffix(".tmp") in names or path.name.rsplit(".", 2)[0] in index_of:
            path.unlink(missing_ok=True)
    for path in (out / STATE_DIR / "done").glob(".*.tmp"):  # .{name}.json.{pid}.tmp
        if path.name[1:].rsplit(".", 2)[0].removesuffix(".json") in names:
            path.unlink(missing_ok=True)


def part_suffix(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


@dataclass
class Tally:
    """What finished shards add up to: their manifest entries and row counts."""

    shards: list[dict] = field(default_factory=list)  # {"name", "count", "bytes", "sha256"}
    rows: int = 0
    failures: Counter = field(default_factory=Counter)  # reason -> rows
    dropped_captions: int = 0

    def add_records(self, records: Iterable[ShardRecord]) -> None:
        for r in records:
            if r.count:
                self.shards.append(
                    {"name": r.name, "count": r.count, "bytes": r.bytes, "sha256": r.sha256}
                )
            self.rows += r.rows
            self.failures.update(failure["reason"] for failure in r.failures)
            self.dropped_captions += r.dropped_captions


def build_manifest(identity: dict, prefix: str, tally: Tally) -> dict:
    """The manifest: shards sorted by name, totals that add up, failure counts by reason."""
    failed = sum(tally.failures.values())
    shards = sorted(tally.shards, key=lambda shard: shard["name"])
    return {
        "format_version": FORMAT_VERSION,
        "created_by": CREATED_BY,
        "prefix": prefix,
        "shards": shards,
        "total_samples": sum(shard["count"] for shard in shards),
        "rows": tally.rows,
        "written": tally.rows - failed,
        "failed": failed,
        "failures": dict(sorted(tally.failures.items())),
        "dropped_captions": tally.dropped_captions,
        "per_mode": identity["args"]["per"],
        "image_format": identity["args"]["image_format"],
        "input": identity["input"],
        "args": identity["args"],
    }


def write_outputs(
    out: Path, manifest: dict, errors: list[dict], suffix: str | None, publish: str | None = None
) -> None:
    """manifest.json, sizes.json and errors.jsonl (or a part's manifest-{suffix}.json and errors);
    published in that order, the manifest last, for an s3:// output."""
    if suffix is None:
        names = ["errors.jsonl", "sizes.json", "manifest.json"]  # last: its presence means complete
        write_json_atomic(out / names[0], errors, lines=True)
        sizes = {shard["name"]: shard["count"] for shard in manifest["shards"]}
        write_json_atomic(out / names[1], sizes)
        write_json_atomic(out / names[2], manifest)
    else:
        names = [f"errors-{suffix}.jsonl", f"manifest-{suffix}.json"]
        write_json_atomic(out / names[0], errors, lines=True)
        write_json_atomic(out / names[1], manifest)
    for name in names if publish else ():
        shard_output.publish(out, publish, name)


def summary_from_manifest(out: Path | str, manifest: dict, resumed: int = 0) -> ShardSummary:
    return ShardSummary(
        out=out,
        rows=manifest["rows"],
        written=manifest["written"],
        failed=manifest["failed"],
        failures=dict(manifest["failures"]),
        samples=manifest["total_samples"],
        shards=len(manifest["shards"]),
        resumed_shards=resumed,
        dropped_captions=manifest["dropped_captions"],
    )


def merge_parts(inputs: list[str | Path], out: str | Path) -> ShardSummary:
    """Join the part manifests of a sliced run (folders or manifest files, local or s3://) into
    `out` (a folder, or an s3:// prefix where the parts were published)."""
    publish = str(out).rstrip("/") if storage.is_remote(str(out)) else None
    local_out = shard_output.default_staging(publish) if publish else Path(out)
    manifests = find_part_manifests([str(p) for p in inputs])
    first = manifests[0][1]
    count = first["part"]["count"]
    by_index: dict[int, tuple[str, dict]] = {}
    for path, manifest in manifests:
        if manifest["input"] != first["input"] or manifest["args"] != first["args"]:
            raise ShardError(f"{path} belongs to another run than {manifests[0][0]}: cannot merge")
        if manifest["part"]["count"] != count:
            raise ShardError(f"{path} is one of {manifest['part']['count']} parts, not {count}")
        index = manifest["part"]["index"]
        if index in by_index:
            raise ShardError(f"part {index} is given twice: {by_index[index][0]} and {path}")
        by_index[index] = (path, manifest)
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        raise ShardError(f"parts {missing} of {count} are missing (not finished, or not given)")
    tally, errors = Tally(), []
    for index in range(count):
        path, manifest = by_index[index]
        tally.shards += part_shards(path, manifest, publish or str(local_out))
        tally.rows += manifest["rows"]
        tally.failures.update(manifest["failures"])
        tally.dropped_captions += manifest["dropped_captions"]
        errors_file = storage.join(
            storage.parent(path), f"errors-{part_suffix(index, count)}.jsonl"
        )
        errors += [json.loads(line) for line in storage.read_text(errors_file).splitlines()]
    local_out.mkdir(parents=True, exist_ok=True)
    identity = {"input": first["input"], "args": first["args"]}
    merged = build_manifest(identity, first["prefix"], tally)
    errors.sort(key=lambda failure: failure["shard"])  # stable: keeps each shard's row order
    write_outputs(local_out, merged, errors, None, publish)
    return summary_from_manifest(publish or local_out, merged)


def find_part_manifests(inputs: list[str]) -> list[tuple[str, dict]]:
    paths: list[str] = []
    for item in inputs:
        if storage.is_remote(item) and not item.endswith(".json"):
            names = storage.list_names(item)
            paths += [storage.join(item.rstrip("/"), n) for n in names if _PART_MANIFEST.match(n)]
        elif storage.is_remote(item) or os.path.isfile(item):
            paths.append(item)
        elif os.path.isdir(item):
            paths += sorted(str(p) for p in Path(item).glob("manifest-part-*-of-*.json"))
        else:
            raise ShardError(f"{item} does not exist")
    if not paths:
        raise ShardError(
            f"no part manifests (manifest-part-*-of-*.json) in {', '.join(map(str, inputs))}"
        )
    manifests = []
    for path in paths:
        manifest = json.loads(storage.read_text(path))
        if manifest.get("format_version") != FORMAT_VERSION or "part" not in manifest:
            raise ShardError(
                f"{path} is not a part manifest of umt shard (format {FORMAT_VERSION})"
            )
        manifests.append((path, manifest))
    return manifests


_PART_MANIFEST = re.compile(r"^manifest-part-\d+-of-\d+\.json$")


def part_shards(path: str, manifest: dict, out: str) -> list[dict]:
    """A part's shard entries, named relative to `out`; each file must exist with its size."""
    shards = []
    folder = storage.parent(path)
    for shard in manifest["shards"]:
        location = storage.join(folder, shard["name"])
        try:
            size = storage.size(location)
        except (storage.StorageError, OSError):
            size = None
        if size != shard["bytes"]:
            raise ShardError(f"{location} is missing or not the size its manifest says")
        if storage.is_remote(out) or storage.is_remote(folder):
            if folder.rstrip("/") != out.rstrip("/"):
                raise ShardError(f"{location}: parts in a store are merged where they are ({out})")
            name = shard["name"]
        else:
            same_folder = Path(folder).resolve() == Path(out).resolve()
            name = shard["name"] if same_folder else os.path.relpath(location, out)
        shards.append({**shard, "name": name})
    return shards
