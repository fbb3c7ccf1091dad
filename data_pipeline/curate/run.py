"""A whole curation run (`curate`): plan per-shard scans, run this rank's share in worker
processes, and, once every shard of every rank is scanned, the global step that writes the
subset.

Ranks (torchrun, srun, or `--num-parts/--part-index`) take every num_parts-th shard; they share
nothing but the output folder. Whichever rank finds every shard's done-record after finishing its
own runs the global step, under a file lock; a rank that finds the subset already written for
these options stops there. The global step is a pure function of the tables, so any rank, or a
run started again after a kill, writes the same bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from data_pipeline import storage
from data_pipeline.curate.materialize import check_destination, materialize
from data_pipeline.curate.options import CurateError, CurateOptions, validate_options
from data_pipeline.curate.outputs import (
    CurateSummary,
    read_manifest,
    removed_lines,
    subset_manifest,
    summary_of,
    write_subset,
)
from data_pipeline.curate.rules import Samples, decide, load_samples
from data_pipeline.curate.scan import ShardTask, failpoint, load_done, scan_shard
from data_pipeline.loader.config import LoaderConfigError
from data_pipeline.loader.dataset import Dataset, resolve_dataset
from data_pipeline.shard.manifest import remove_dead_writers_temporaries, write_json_atomic
from data_pipeline.shard.pool import stop_workers
from data_pipeline.shard.run import check_output_folder
from data_pipeline.subset import REMOVED_FILE, SUBSET_FILE, read_subset_if_any, source_shas

STATE_DIR = ".umt-curate"  # run.json (identity), done/{task}.json, finalize lock, finalized.json


def curate(options: CurateOptions) -> CurateSummary:
    """Curate `options.sources` into the subset `options.out` (resuming a run of the same
    options), or, on a rank that is not the last to finish, scan its share of the shards."""
    validate_options(options)
    if storage.is_remote(options.out):
        raise CurateError(f"--out {options.out}: a subset is written to a local folder")
    out = Path(options.out)
    check_output_folder(out, "--out")
    train = resolve(options.sources, "the shards to curate", resampled=False)
    evals = [resolve([spec], f"--decontaminate {spec}", True) for spec in options.decontaminate]
    scorer_id = None
    if options.model:
        from data_pipeline.curate.scorers import scorer_identity

        scorer_id = scorer_identity(options.model)
    tasks = plan_tasks(train, evals, options, out, scorer_id)
    identity = run_identity(options, tasks, scorer_id)
    prepare_output(out, identity, options.overwrite)
    if options.materialize:  # before the scans: a folder of other shards is refused now
        check_destination(Path(options.materialize), None, options.overwrite)
    mine = tasks[options.part_index :: options.num_parts]
    scan_all(mine, options.workers, options.progress)
    if any(load_done(task) is None for task in tasks):  # another rank is still scanning
        return CurateSummary(str(out), scanned=len(mine), written=False)
    return finalize(options, tasks, identity, out, len(mine))


def resolve(specs: list[str], what: str, resampled: bool) -> Dataset:
    try:
        return resolve_dataset(specs, resampled)
    except LoaderConfigError as exc:
        message = str(exc).removeprefix("data.shards: ").removeprefix("data.shards ")
        raise CurateError(f"{what}: {message}") from None


def plan_tasks(
    train: Dataset, evals: list[Dataset], o: CurateOptions, out: Path, scorer_id: str | None
) -> list[ShardTask]:
    """One scan per shard: the training shards (scored with --model), then each eval set's."""
    table_dir = str(Path(o.table) if o.table else out / "table")
    # --table may be a folder of the user's: only our tables' temporaries, of a killed run
    remove_dead_writers_temporaries(Path(table_dir), ".*.parquet.*.tmp")
    state_dir = str(out / STATE_DIR)
    shas: dict[str, dict[str, str]] = {}

    def task(name: str, shard, scored: bool) -> ShardTask:
        path = shard.path if storage.is_remote(shard.path) else os.path.abspath(shard.path)
        folder = storage.parent(path)
        if folder not in shas:
            shas[folder] = source_shas(folder)
        sha = shas[folder].get(storage.basename(path))
        shard = replace(shard, path=path)
        return ShardTask(
            name, shard, sha, table_dir, state_dir,
            scorer=o.model if scored else None, scorer_id=scorer_id if scored else None,
            score_batch=o.score_batch, device=o.device, cache_dir=o.cache_dir,
        )  # fmt: skip

    tasks = [task(f"train-{i:06d}", s, bool(o.model)) for i, s in enumerate(train.shards)]
    for e, dataset in enumerate(evals):
        tasks += [task(f"eval{e}-{i:06d}", s, False) for i, s in enumerate(dataset.shards)]
    return tasks


def run_identity(o: CurateOptions, tasks: list[ShardTask], scorer_id: str | None) -> dict:
    """What makes two runs the same: the rules, the scorer and the shards read (path, size,
    manifest sha256, positions)."""
    shards = []
    for t in tasks:
        kept = None
        if t.shard.kept is not None:
            kept = hashlib.sha256(t.shard.kept.astype("<i8").tobytes()).hexdigest()[:16]
        shards.append([t.name, t.shard.path, t.shard.bytes, t.manifest_sha, t.shard.count, kept])
    return {"rules": o.rules(), "scorer": scorer_id, "shards": shards}


def identity_differences(old: dict, new: dict) -> list[str]:
    differences = [
        f"{name} was {old.get('rules', {}).get(name)!r}, now {value!r}"
        for name, value in new["rules"].items()
        if old.get("rules", {}).get(name) != value
    ]
    if old.get("scorer") != new["scorer"]:
        differences.append("the --model weights differ")
    if old.get("shards") != new["shards"]:
        differences.append("the shards read differ (other shards, or changed since)")
    return differences


def prepare_output(out: Path, identity: dict, overwrite: bool) -> None:
    """Create `out`, or check that it holds this same run (then it resumes); refuse anything
    else unless `overwrite`, which starts over (the tables, keyed by content, stay)."""
    state = out / STATE_DIR
    run_file = state / "run.json"
    if not overwrite and run_file.is_file():
        old = json.loads(run_file.read_text(encoding="utf-8"))
        if old == identity:
            return
        differences = "; ".join(identity_differences(old, identity))
        raise CurateError(
            f"--out {out} holds a subset of other options ({differences}); pass --overwrite to "
            f"replace it, or choose another --out (with --table {out / 'table'} to reuse its "
            "hashes and scores)"
        )
    if not overwrite and ((out / SUBSET_FILE).exists() or (out / REMOVED_FILE).exists()):
        raise CurateError(
            f"--out {out} already holds a subset that this command did not make "
            f"(no {STATE_DIR}/run.json); pass --overwrite to replace it"
        )
    shutil.rmtree(state, ignore_errors=True)
    for name in (SUBSET_FILE, REMOVED_FILE):
        (out / name).unlink(missing_ok=True)
    write_json_atomic(run_file, identity)


def _scan_in_worker(task: ShardTask) -> str:
    scan_shard(task)
    return task.name


@contextmanager
def single_threaded_children() -> Iterator[None]:
    """Worker processes are the parallelism: one BLAS / OpenMP thread each (set before they
    start, as those libraries read it once)."""
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def scan_all(tasks: list[ShardTask], workers: int, progress: bool) -> None:
    todo = [t for t in tasks if load_done(t) is None]
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), unit="shard", disable=not progress)
    try:
        if workers == 1 or len(todo) <= 1:
            for task in todo:
                scan_shard(task)
                bar.update()
            return
        # spawn, not fork: a forked child inheriting a lock held by a thread (tqdm's) hangs.
        context = multiprocessing.get_context("spawn")
        with single_threaded_children():
            pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context)
            try:
                pending = {pool.submit(_scan_in_worker, task) for task in todo}
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        future.result()
                        bar.update()
            except BaseException:
                stop_workers(pool)
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()


@contextmanager
def finalize_lock(state: Path) -> Iterator[None]:
    """One rank at a time runs the global step (the lock dies with its holder)."""
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "finalize.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def finalize(
    options: CurateOptions, tasks: list[ShardTask], identity: dict, out: Path, scanned: int
) -> CurateSummary:
    """The global step over every shard's table: decide, write removed.jsonl and subset.json,
    then the materialized shards."""
    state = out / STATE_DIR
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    with finalize_lock(state):
        marker = state / "finalized.json"
        if not (marker.is_file() and json.loads(marker.read_text())["identity"] == digest):
            records = {t.name: load_done(t) for t in tasks}
            train_records = [records[t.name] for t in tasks if t.name.startswith("train-")]
            table_dir = Path(tasks[0].table_dir)
            train = load_samples(train_records, table_dir)
            evals = load_evals(options, tasks, records, table_dir)
            decisions = decide(train, evals, options)
            manifest = subset_manifest(train, train_records, decisions, options)
            removed = removed_lines(train, decisions)
            write_subset(out, manifest, removed, lambda: failpoint("finalize"))
            if options.materialize:
                write_materialized(out, options)
            write_json_atomic(marker, {"identity": digest})
        summary = summary_of(str(out), read_manifest(out), scanned)
        summary.materialized = options.materialize
        return summary


def load_evals(
    options: CurateOptions, tasks: list[ShardTask], records: dict, table_dir: Path
) -> Samples | None:
    """Every evaluation set's samples as one; an eval set without a readable image is refused."""
    if not options.decontaminate:
        return None
    all_records = []
    for e, spec in enumerate(options.decontaminate):
        mine = [records[t.name] for t in tasks if t.name.startswith(f"eval{e}-")]
        samples = load_samples(mine, table_dir)
        if not samples.readable.any():
            reasons = sorted({err for err in samples.error if err})
            raise CurateError(
                f"--decontaminate {spec}: no readable image among its {len(samples)} samples "
                f"({', '.join(reasons) or 'none'}): nothing to decontaminate against"
            )
        all_records += mine
    return load_samples(all_records, table_dir)


def write_materialized(out: Path, options: CurateOptions) -> None:
    subset = read_subset_if_any(str(out))
    sha = hashlib.sha256((out / SUBSET_FILE).read_bytes()).hexdigest()
    dest = Path(options.materialize)
    check_destination(dest, sha, options.overwrite)
    materialize(subset, sha, dest, options.cache_dir)
