"""A whole run (`shard_dataset`): plan, skip finished shards, write the rest, the manifest."""

from __future__ import annotations

import os
from pathlib import Path

from data_pipeline import storage
from data_pipeline.shard import output as shard_output
from data_pipeline.shard.manifest import (
    ShardRecord,
    ShardSummary,
    Tally,
    build_manifest,
    part_suffix,
    prepare_output,
    remove_stale_temporaries,
    run_identity,
    summary_from_manifest,
    write_outputs,
)
from data_pipeline.shard.options import ShardError, ShardOptions, validate_options
from data_pipeline.shard.plan import (
    KeyLayout,
    ShardTask,
    cut_overflow,
    key_layout,
    plan_shards,
    shard_name,
)
from data_pipeline.shard.pool import Progress, run_tasks
from data_pipeline.shard.sources import Row, SourceSpec, read_source


def check_output_folder(out: Path, flag: str) -> None:
    """Before any row is read: the output folder is, or can be made, a folder one can write in
    (nothing is created here: a refused input leaves no empty folder behind)."""
    if out.exists() and not out.is_dir():
        raise ShardError(f"{flag} {out}: a file is there, not a folder")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ShardError(f"{flag} {out}: cannot write there ({existing} is a file, not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ShardError(f"{flag} {out}: cannot write there (permission denied on {existing})")


def shard_dataset(
    input_path: str | Path,
    out: str | Path,
    options: ShardOptions | None = None,
    progress: bool = False,
) -> ShardSummary:
    """Shard `input_path` into `out` (resuming a previous run of the same arguments)."""
    try:
        return _shard_dataset(input_path, out, options, progress)
    except OSError as exc:
        if exc.filename is None:  # ENOSPC from a write names no file: name the output
            raise OSError(exc.errno, exc.strerror or str(exc), str(out)) from exc
        raise


def _shard_dataset(
    input_path: str | Path, out: str | Path, options: ShardOptions | None, progress: bool
) -> ShardSummary:
    options = options or ShardOptions()
    validate_options(options)
    publish = str(out).rstrip("/") if storage.is_remote(str(out)) else None
    if publish and storage.scheme(publish) != "s3":
        raise ShardError(f"--out {out}: shards can be written to local folders and s3:// only")
    part = f"#part{options.part_index}-of-{options.num_parts}" if options.num_parts > 1 else ""
    staging = options.staging or (
        shard_output.default_staging(publish + part) if publish else None
    )  # a staging folder per part: tasks of a job array may share a node
    input_path, out = Path(input_path), Path(staging or out)
    check_output_folder(out, "--staging" if staging and options.staging else "--out")
    spec = SourceSpec(
        path=input_path,
        format=options.format_in,
        image_col=options.image_col,
        caption_col=options.caption_col,
        image_root=Path(options.image_root) if options.image_root else None,
        split=options.split,
        extra_cols=tuple(options.save_additional_columns),
    )
    source = read_source(spec)
    identity = run_identity(source.rows, source.format, input_path, options)
    prepare_output(out, identity, options, publish)
    plan = plan_shards(source.rows, options)
    layout = key_layout(plan, options.maxcount)
    parts, part = options.num_parts, options.part_index
    tasks = [
        ShardTask(index, shard_name(options.prefix, index), items)
        for index, items in enumerate(plan)
        if index % parts == part
    ]
    total_rows = sum(len(task.items) for task in tasks)
    bar = Progress(total_rows, 0, 0, progress)
    try:
        records, resumed = run_all(
            tasks, source.rows, out, options, layout, bar, len(plan), publish
        )
    finally:
        bar.close()
    tally = Tally()
    tally.add_records(records)
    manifest = build_manifest(identity, options.prefix, tally)
    errors = [f for record in sorted(records, key=lambda r: r.name) for f in record.failures]
    suffix = None
    if parts > 1:
        suffix = part_suffix(part, parts)
        manifest["part"] = {"index": part, "count": parts}
    write_outputs(out, manifest, errors, suffix, publish)
    return summary_from_manifest(publish or out, manifest, resumed)


def run_all(
    tasks: list[ShardTask],
    rows: list[Row],
    out: Path,
    options: ShardOptions,
    layout: KeyLayout,
    progress: Progress,
    planned: int,
    publish: str | None = None,
) -> tuple[list[ShardRecord], int]:
    """Planned shards, then rounds of overflow shards until no row rolls over.

    Overflow shards of part i of p are numbered planned + i, planned + i + p, ... so parts
    never collide, and a single part numbers them contiguously.
    """
    all_records: list[ShardRecord] = []
    resumed_total = 0
    next_overflow = 0
    while tasks:
        remove_stale_temporaries(out, [task.name for task in tasks])
        records, resumed = run_tasks(tasks, rows, out, options, layout, progress, publish)
        all_records += records
        resumed_total += resumed
        rolled = [item for record in records for item in record.overflow]
        tasks = []
        for items in cut_overflow(rolled, options.maxcount):
            index = planned + options.part_index + options.num_parts * next_overflow
            tasks.append(ShardTask(index, shard_name(options.prefix, index), items))
            next_overflow += 1
    return all_records, resumed_total
