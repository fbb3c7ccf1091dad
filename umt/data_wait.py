"""Waiting for the next batch without losing the ability to stop.

The training loop takes each batch through `DataWaiter.next`, which fetches it in a helper thread
and waits on it in short slices. So a stop signal (Slurm's USR1 before the time limit, SIGTERM,
Ctrl-C) that arrives while the loop waits for data is seen within a second: the wait then goes on
for at most `grace_s` (the batch may still come, and the step is then completed and
checkpointed), after which `DataWaitInterrupted` ends the run instead of a hang. A wait that
lasts long is reported in the log, with how long, so a stalled data path is visible.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("umt.train")

POLL_S = 0.5


class DataWaitInterrupted(RuntimeError):
    """A stop was requested and the batch did not come within the grace period."""

    def __init__(self, waited_s: float):
        super().__init__(f"waited {waited_s:.0f} s for data")
        self.waited_s = waited_s


class DataWaiter:
    """`next(stop_requested)` returns the iterable's next item, or raises DataWaitInterrupted.

    The fetching thread is a daemon: one stuck forever in a hung loader does not keep the process
    from exiting once the run gives up on it.
    """

    def __init__(
        self,
        iterable: Iterable,
        grace_s: float = 15.0,
        report_every_s: float = 60.0,
        before_fetch: Callable[[], None] | None = None,
    ):
        self._iterator = iter(iterable)
        self.grace_s, self.report_every_s = grace_s, report_every_s
        self._before_fetch = before_fetch
        self._requests: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="umt-data", daemon=True)
        self._thread.start()
        self._abandoned = False

    def _serve(self) -> None:
        while self._requests.get() is not None:
            try:
                if self._before_fetch is not None:
                    self._before_fetch()
                self._results.put((True, next(self._iterator)))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the training loop
                self._results.put((False, exc))

    def next(self, stop_requested: Callable[[], bool]) -> Any:
        self._requests.put(True)
        start = time.monotonic()
        stop_seen: float | None = None
        reported = 0
        while True:
            try:
                ok, item = self._results.get(timeout=POLL_S)
            except queue.Empty:
                pass
            else:
                if ok:
                    return item
                raise item  # StopIteration and loader errors, as from the iterator itself
            now = time.monotonic()
            if stop_requested():
                if stop_seen is None:
                    stop_seen = now
                    log.warning(
                        "stop requested while waiting for data: waiting up to %.0f s more",
                        self.grace_s,
                    )
                elif now - stop_seen >= self.grace_s:
                    raise DataWaitInterrupted(now - start)
            if now - start >= (reported + 1) * self.report_every_s:
                reported += 1
                log.warning("waiting for data for %.0f s", now - start)

    def close(self, timeout_s: float = 30.0) -> None:
        """End the fetching thread, waiting for a fetch in progress (up to `timeout_s`): a thread
        left inside torch code while the interpreter exits can abort the process."""
        self._requests.put(None)
        if not self._abandoned:
            self._thread.join(timeout_s)

    def abandon(self) -> None:
        """Give up on a fetch that does not return: `close` will not wait for it."""
        self._abandoned = True
