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
import select
import signal
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from umt import distributed, hang_report
from umt.collective_tracker import STATE as COLLECTIVES

log = logging.getLogger("umt.watchdog")

HANG_EXIT_CODE = 75  # EX_TEMPFAIL: try again (the Slurm job requeues itself on it)
AUTO_STEPS = 100  # the default timeout: this many median steps...
AUTO_FLOOR_S = 600.0  # ...at least this long...
AUTO_COLLECTIVE_SHARE = 0.8  # ...and at most this share of train.collective_timeout_min
STEP_TIMES_KEPT = 200
# A launcher that lost a rank SIGTERMs the others (torchrun, srun --kill-on-bad-exit, the
# deepspeed launcher). A rank blocked in a collective with the dead one cannot run its Python
# handler: if it has not within this long, it reports and exits instead of waiting for the
# launcher's SIGKILL (30 s later, and the deepspeed launcher waits for each rank in turn).
STOP_GRACE_S = 10.0
SUMMARY_WAIT_AFTER_SIGNAL_S = 5.0
HUNG, STOPPED_WHILE_STUCK = "hung", "stopped while stuck"
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}  # the trainer's handlers

# What a rank is doing, as its report says.
DATA_WAIT = "data wait"
FORWARD = "forward"
BACKWARD = "backward"
OPTIMIZER = "optimizer"
CHECKPOINT = "checkpoint"
EVAL = "eval"
LOGGING = "logging"  # the log step's reductions of metrics and step times
STEP_PHASES = (DATA_WAIT, FORWARD, BACKWARD, OPTIMIZER, LOGGING)


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
    `paused()` around evaluation; `start()` once, `stop()` at the end. `watch_signals()` (main
    thread) and `signal_handled()` (from the Python handlers) catch a rank that a launcher asks
    to stop while it is stuck: see `STOP_GRACE_S`."""

    def __init__(
        self,
        out: Path,
        rank: int,
        world_size: int,
        timeout_min: float | None,
        collective_timeout_min: float,
        earlier_incidents: set[str],
        before_exit: Callable[[], None] = lambda: None,
    ):
        self.out, self.rank, self.world_size = out, rank, world_size
        self.timeout_min, self.collective_timeout_min = timeout_min, collective_timeout_min
        self.earlier, self.before_exit = earlier_incidents, before_exit
        self.phase, self.phase_since = "start-up", time.monotonic()
        self.step = 0  # the last completed step
        self.step_times: collections.deque[float] = collections.deque(maxlen=STEP_TIMES_KEPT)
        self.armed = False  # after the first step of this start
        self.paused_at: float | None = None
        self.last_progress = time.monotonic()
        # Stop signals that reached the process (its C handler wrote them to the pipe) and that
        # its Python handler ran for. Counted, not timed: the handler may run before this thread
        # reads the pipe. `signal_at`: when this thread first saw more received than handled.
        self.signals_received = 0
        self.signals_handled = 0
        self.signal_at: float | None = None
        self._signal_pipe: int | None = None
        self.firing = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="umt-watchdog", daemon=True)

    @classmethod
    def for_run(cls, cfg, rank: int, world_size: int, before_exit: Callable[[], None]):
        """Every rank's watchdog of a run (a collective: rank 0's list of earlier hangs)."""
        out = Path(cfg.output_dir)
        earlier = distributed.broadcast_object(hang_report.incidents(out))
        t = cfg.train
        return cls(out, rank, world_size, t.hang_timeout_min, t.collective_timeout_min,
                   set(earlier), before_exit)  # fmt: skip

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

    def watch_signals(self) -> None:
        """Main thread, once the signal handlers are installed: Python's C-level handler writes
        each signal to this pipe even while the main thread is stuck in a native call, where the
        Python handler cannot run."""
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        # A forked loader worker would write its own signals here: not this process's.
        os.register_at_fork(after_in_child=_forget_wakeup_fd)
        self._signal_pipe = read

    def signal_handled(self) -> None:
        self.signals_handled += 1

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
        while not self._stop.is_set():
            self._wait(min(5.0, max(0.5, self.timeout_s() / 10)))
            now = time.monotonic()
            if self._stuck_after_signal(now):
                self.firing.set()
                self._report_and_exit(now - self.last_progress, STOPPED_WHILE_STUCK)
            if not self.armed or self.paused_at is not None:
                continue
            silent_s = now - self.last_progress
            if silent_s >= self.timeout_s():
                self.firing.set()
                self._report_and_exit(silent_s, HUNG)

    def _wait(self, seconds: float) -> None:
        """Sleep `seconds`, noting when a signal arrives."""
        if self._signal_pipe is None:
            self._stop.wait(seconds)
            return
        ready, _, _ = select.select([self._signal_pipe], [], [], seconds)
        if ready:
            received = os.read(self._signal_pipe, 64)
            self.signals_received += sum(1 for number in received if number in STOP_SIGNALS)

    def _stuck_after_signal(self, now: float) -> bool:
        """A stop signal came STOP_GRACE_S ago, the main thread never ran its Python handler
        and it is inside a step (not saving or evaluating, which may run long native code)."""
        if self.signals_received <= self.signals_handled:
            self.signal_at = None
            return False
        if self.signal_at is None:
            self.signal_at = now
        if now - self.signal_at < STOP_GRACE_S:
            return False
        return self.phase in STEP_PHASES

    def _report_and_exit(self, silent_s: float, reason: str) -> None:
        timeout_s = self.timeout_s()
        step = self.step + 1  # the step in progress
        folder = hang_report.incident_folder(self.out, step, self.earlier)
        now = time.monotonic()
        if reason == STOPPED_WHILE_STUCK:
            why = (
                f"a stop signal came {now - (self.signal_at or now):.0f} s ago and this rank, "
                "blocked in a native call, never handled it (a rank it waits for is gone?)"
            )
        else:
            why = (
                f"no optimizer step completed for {silent_s:.0f} s "
                f"(train.hang_timeout_min: {timeout_s:.0f} s)"
            )
        header = {
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "step": step,
            "reason": why,
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
            self.before_exit()  # e.g. TensorBoard's buffered scalars
            hang_report.write_atomic(path, hang_report.rank_report(header))
            log.error(
                "%s in step %d, phase %s, %s: stacks in %s; exiting with code %d",
                why, step, self.phase, header["collective"], path, HANG_EXIT_CODE,
            )  # fmt: skip
            # After a stop signal the launcher kills this process soon: a shorter wait.
            wait_s = SUMMARY_WAIT_AFTER_SIGNAL_S if reason == STOPPED_WHILE_STUCK else None
            summary = hang_report.settle_summary(folder, self.rank, self.world_size, wait_s)
            if summary is not None:
                log.error("summary (%s):\n%s", folder / hang_report.SUMMARY, summary)
        except Exception as exc:  # noqa: BLE001 - the exit below must happen whatever failed
            log.error("could not write the hang report to %s: %s", folder, exc)
        finally:
            for handler in logging.getLogger("umt").handlers:
                handler.flush()
            sys.stderr.flush()
            os._exit(HANG_EXIT_CODE)


def _forget_wakeup_fd() -> None:
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # not the main thread of the child: nothing was inherited to forget
        pass
