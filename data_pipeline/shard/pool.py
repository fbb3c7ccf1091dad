"""The worker pool: processes writing whole shards, progress, and a clean stop."""

from __future__ import annotations

import multiprocessing
import queue
import signal
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_pipeline.shard.manifest import ShardRecord, load_done_record
from data_pipeline.shard.options import ShardOptions
from data_pipeline.shard.plan import KeyLayout, ShardTask
from data_pipeline.shard.sources import Row
from data_pipeline.shard.write import ShardJob, write_shard

_progress_queue: Any = None  # set in each worker process by _init_worker


def _init_worker(progress_queue: Any) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the parent


def _report_to_parent(rows: int, failed: int) -> None:
    if rows or failed:
        _progress_queue.put((rows, failed))


def _write_shard_in_worker(job: ShardJob) -> ShardRecord:
    return write_shard(job, _report_to_parent)


class Progress:
    """A tqdm bar over rows with the failure count beside it (silent when disabled)."""

    def __init__(self, total: int, done: int, failed: int, enabled: bool) -> None:
        self.failed = failed
        self.bar = tqdm(
            total=total, initial=done, unit="row", disable=not enabled, dynamic_ncols=True
        )
        self.bar.set_postfix(failed=failed, refresh=False)

    def update(self, rows: int, failed: int) -> None:
        self.failed += failed
        self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(rows)

    def close(self) -> None:
        self.bar.close()


def run_tasks(
    tasks: list[ShardTask],
    rows: list[Row],
    out: Path,
    options: ShardOptions,
    layout: KeyLayout,
    progress: Progress,
    publish: str | None = None,
) -> tuple[list[ShardRecord], int]:
    """Records of all tasks in task order, writing those not done yet; and how many were done."""
    records: dict[int, ShardRecord] = {}
    jobs: list[ShardJob] = []
    for task in tasks:
        record = load_done_record(out, task.name, publish)
        if record is not None:
            records[task.index] = record
            progress.update(record.rows, len(record.failures))
            continue
        job_rows = {item.row: rows[item.row] for item in task.items}
        jobs.append(ShardJob(task, job_rows, out, options, layout, publish))
    resumed = len(records)
    if options.workers == 1 or len(jobs) <= 1:
        for job in jobs:
            records[job.task.index] = write_shard(job, progress.update)
    else:
        for record in write_in_processes(jobs, options.workers, progress):
            records[record.index] = record
    return [records[task.index] for task in tasks], resumed


def write_in_processes(
    jobs: list[ShardJob], workers: int, progress: Progress
) -> Iterator[ShardRecord]:
    """Records of `jobs` as they finish, written by `workers` processes: this one and
    `workers - 1` started ones.

    This process takes shards from the end of the queue, each one no worker has started yet:
    one process fewer to start (each costs ~0.4 s of CPU in imports), and shards are written
    from the first moment, while the workers start.
    """
    # spawn, not fork: the parent may hold threads (tqdm's monitor, the caller's), and a forked
    # child inheriting a held lock hangs.
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    pool = ProcessPoolExecutor(
        max_workers=min(workers - 1, len(jobs)),
        mp_context=context,
        initializer=_init_worker,
        initargs=(progress_queue,),
    )

    def report_here(rows: int, failed: int) -> None:
        progress.update(rows, failed)
        drain_progress(progress_queue, progress)

    try:
        futures = [pool.submit(_write_shard_in_worker, job) for job in jobs]
        pending = set(futures)
        while pending:
            # cancel() succeeds only for a shard no worker has taken (or one cancelled before)
            mine = next(
                (
                    i
                    for i in reversed(range(len(jobs)))
                    if futures[i] in pending and futures[i].cancel()
                ),
                None,
            )
            if mine is not None:
                pending.discard(futures[mine])
                yield write_shard(jobs[mine], report_here)
                continue
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            drain_progress(progress_queue, progress)
            for future in finished:
                yield future.result()
        drain_progress(progress_queue, progress)
    except BaseException:
        # Ctrl-C or a failed shard: stop at once rather than finish every queued shard (a failed
        # worker is seen when this process finishes the shard it is writing). A shard cut short
        # is only a temporary file, rewritten by the next run.
        stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def stop_workers(pool: ProcessPoolExecutor) -> None:
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()


def drain_progress(progress_queue: Any, progress: Progress) -> None:
    while True:
        try:
            rows, failed = progress_queue.get_nowait()
        except queue.Empty:
            return
        progress.update(rows, failed)
