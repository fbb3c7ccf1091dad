"""The hang watchdog: a rank whose optimizer steps stop completing ends the run in minutes, with
evidence, instead of waiting in a collective until `train.collective_timeout_min`.

A thread per rank watches the time since the last completed step. Past `train.hang_timeout_min`
(default: 100 median steps, at least 10 minutes and at most 80% of the collective timeout; the
first step of a start and evaluation are not timed) every rank writes its report
(`umt.hang_report`: phase, collective, every thread's stack) to
`OUTPUT_DIR/hangs/step{N}/rank{R}.txt`, the first rank that can writes the summary, and every
rank exits with `HANG_EXIT_CODE`. The thread does this by itself: the main thread of a hung
rank is blocked in a collective or a native call, where no Python signal handler runs, and
`os._exit` ends the process without waiting for it. On Slurm the job script then requeues the
job (`launch.requeue`), which resumes from the last checkpoint.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

from umt import hang_report
from umt.collective_tracker import STATE as COLLECTIVES

log = logging.getLogger("umt.watchdog")

HANG_EXIT_CODE = 75  # EX_TEMPFAIL: try again (the Slurm job requeues itself on it)
AUTO_STEPS = 100  # the default timeout: this many median steps...
AUTO_FLOOR_S = 600.0  # ...at least this long...
AUTO_COLLECTIVE_SHARE = 0.8  # ...and at most this share of train.collective_timeout_min
STEP_TIMES_KEPT = 200

# What a rank is doing, as its report says.
DATA_WAIT = "data wait"
FORWARD = "forward"
BACKWARD = "backward"
OPTIMIZER = "optimizer"
CHECKPOINT = "checkpoint"
EVAL = "eval"
LOGGING = "logging"  # the log step's reductions of metrics and step times


def hang_timeout_s(
    configured_min: float | None, step_times_s: list[float], collective_timeout_min: float
) -> float:
    """`train.hang_timeout_min` in seconds, or the default from the median step time."""
    if configured_min is not None:
        return configured_min * 60
    median = statistics.median(step_times_s) if step_times_s else 0.0
    ceiling = AUTO_COLLECTIVE_SHARE * collective_timeout_min * 60
    return min(max(AUTO_FLOOR_S, AUTO_STEPS * median), ceiling)


class HangWatchdog:
    """`enter(phase)` as the step moves on, `step_done(step, seconds)` after each optimizer step,
    `paused()` around evaluation; `start()` once, `stop()` at the end."""

    def __init__(
        self,
        out: Path,
        rank: int,
        world_size: int,
        timeout_min: float | None,
        collective_timeout_min: float,
        earlier_incidents: set[str],
    ):
        self.out, self.rank, self.world_size = out, rank, world_size
        self.timeout_min, self.collective_timeout_min = timeout_min, collective_timeout_min
        self.earlier = earlier_incidents
        self.phase, self.phase_since = "start-up", time.monotonic()
        self.step = 0  # the last completed step
        self.step_times: collections.deque[float] = collections.deque(maxlen=STEP_TIMES_KEPT)
        self.armed = False  # after the first step of this start
        self.paused_at: float | None = None
        self.last_progress = time.monotonic()
        self.firing = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="umt-watchdog", daemon=True)

    # --- called by the trainer ------------------------------------------------------------------
    def enter(self, phase: str) -> None:
        self.phase, self.phase_since = phase, time.monotonic()

    def step_done(self, step: int, seconds: float) -> None:
        if self.armed:  # the first step of a start (compilation, loader start-up) is not typical
            self.step_times.append(seconds)
        self.step, self.armed = step, True
        self.last_progress = time.monotonic()

    @contextlib.contextmanager
    def paused(self):
        """Evaluation is not timed (it can take long and is not an optimizer step)."""
        self.paused_at = time.monotonic()
        try:
            yield
        finally:
            self.last_progress += time.monotonic() - self.paused_at
            self.paused_at = None

    def timeout_s(self) -> float:
        return hang_timeout_s(self.timeout_min, list(self.step_times), self.collective_timeout_min)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the watch; a watchdog that has begun reporting a hang ends the process instead."""
        if self.firing.is_set():
            self._thread.join()  # it calls os._exit
        self._stop.set()

    # --- the thread -------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, max(0.5, self.timeout_s() / 10))):
            if not self.armed or self.paused_at is not None:
                continue
            silent_s = time.monotonic() - self.last_progress
            if silent_s >= self.timeout_s():
                self.firing.set()
                self._report_and_exit(silent_s)

    def _report_and_exit(self, silent_s: float) -> None:
        timeout_s = self.timeout_s()
        step = self.step + 1  # the step in progress
        folder = hang_report.incident_folder(self.out, step, self.earlier)
        now = time.monotonic()
        header = {
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "step": step,
            "phase": self.phase,
            "phase_for_s": f"{now - self.phase_since:.0f}",
            "collective": COLLECTIVES.describe(now),
            "collective_seq": COLLECTIVES.seq,
            "in_collective": "yes" if COLLECTIVES.seq and COLLECTIVES.left is None else "no",
            "last_step_done": f"step {self.step}, {silent_s:.0f} s ago",
            "hang_timeout_s": f"{timeout_s:.0f}",
        }
        path = folder / f"rank{self.rank}.txt"
        try:
            hang_report.write_atomic(path, hang_report.rank_report(header))
            log.error(
                "no optimizer step completed for %.0f s (train.hang_timeout_min: %.0f s) in "
                "step %d, phase %s, %s: stacks in %s; exiting with code %d",
                silent_s, timeout_s, step, self.phase, header["collective"], path, HANG_EXIT_CODE,
            )  # fmt: skip
            summary = hang_report.settle_summary(folder, self.rank, self.world_size, timeout_s)
            if summary is not None:
                log.error("hang summary (%s):\n%s", folder / hang_report.SUMMARY, summary)
        except Exception as exc:  # noqa: BLE001 - the exit below must happen whatever failed
            log.error("could not write the hang report to %s: %s", folder, exc)
        finally:
            for handler in logging.getLogger("umt").handlers:
                handler.flush()
            sys.stderr.flush()
            os._exit(HANG_EXIT_CODE)
