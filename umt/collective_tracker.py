"""Which collective the training thread last entered, and how long it waited in collectives.

Two questions nothing in torch answers cheaply from Python: when a run hangs, which collective
is each rank in (or last left), and, for stragglers, how much of a rank's step was its own work
and how much waiting for the others (in synchronous data parallelism every rank's step takes the
same wall time: the slow rank's delay shows up as the others' wait inside a collective).

`install()` wraps the collectives of the `torch.distributed` package once per process, before
DeepSpeed starts its communication backend (which looks some of them up at that moment). A call
from the main thread records its name, a sequence number and when it was entered and left; the
time inside is added to `waited_s`. Calls from other threads (the background checkpoint writer)
pass straight through. Cost: two clock reads per collective.

On GPUs, NCCL collectives return once queued and the host waits later, at the next read of a
device value: `umt.distributed`'s helpers count that read as part of their collective (see
`waiting`), DeepSpeed's own waits count as work.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from dataclasses import dataclass

import torch.distributed as dist

# The collectives of torch.distributed that UMT or DeepSpeed call on the training thread.
WRAPPED = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
    "all_to_all_single", "barrier", "monitored_barrier", "broadcast", "broadcast_object_list",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "send", "recv",
    "all_reduce_coalesced",
)  # fmt: skip


FLIGHT_RECORDER_ENTRIES = 2000


@dataclass
class CollectiveState:
    """What the main thread did in collectives (read by the watchdog thread without a lock:
    each field is one attribute write, and a report a few microseconds stale is still right)."""

    name: str = ""  # the last collective entered
    seq: int = 0  # how many were entered so far
    entered: float = 0.0  # time.monotonic() at its entry
    left: float | None = None  # at its return; None while inside
    waited_s: float = 0.0  # total time inside collectives

    def describe(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        if not self.seq:
            return "no collective entered yet"
        if self.left is None:
            return f"waiting in {self.name} #{self.seq} for {now - self.entered:.0f} s"
        return (
            f"not in a collective; last: {self.name} #{self.seq}, returned "
            f"{now - self.left:.0f} s ago"
        )


STATE = CollectiveState()
_main = threading.main_thread()
_depth = [0]  # nesting of our helpers around torch's calls: only the outermost one is timed


def _enter(name: str) -> float:
    _depth[0] += 1
    now = time.monotonic()
    if _depth[0] == 1:
        STATE.name, STATE.entered, STATE.left = name, now, None
        STATE.seq += 1
    return now


def _leave(started: float) -> None:
    _depth[0] -= 1
    if _depth[0] == 0:
        STATE.left = time.monotonic()
        STATE.waited_s += STATE.left - started


@contextlib.contextmanager
def waiting(name: str):
    """Count a block of the main thread as waiting in collective `name` (a helper's collective
    together with its read of the result back to the host)."""
    if threading.current_thread() is not _main:
        yield
        return
    started = _enter(name)
    try:
        yield
    finally:
        _leave(started)


def _tracked(name: str, fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if threading.current_thread() is not _main:
            return fn(*args, **kwargs)
        started = _enter(name)
        try:
            return fn(*args, **kwargs)
        finally:
            _leave(started)

    call.__umt_tracked__ = True
    return call


def install() -> None:
    """Wrap torch.distributed's collectives (once per process; before DeepSpeed's init), and turn
    on torch's flight recorder (each process group's last collectives, for the hang reports;
    TORCH_FR_BUFFER_SIZE=0 turns it off) before the process group starts."""
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(FLIGHT_RECORDER_ENTRIES))
    for name in WRAPPED:
        fn = getattr(dist, name, None)
        if fn is not None and not getattr(fn, "__umt_tracked__", False):
            setattr(dist, name, _tracked(name, fn))
