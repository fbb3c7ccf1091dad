"""Stragglers: the rank that holds every step back, named with its host and the reason.

In synchronous data parallelism every rank's step takes the same wall time: a slow rank's delay
becomes the others' wait inside the next collective. So what is compared is each rank's own time
per step: its step minus the time it waited in collectives (`umt.collective_tracker`), split into
data wait (waiting for its loader) and compute (the rest). Every log window these two figures of
every rank are gathered (one all-reduce of a world x 2 table); TensorBoard gets the slowest rank's
own time over the median (`stragglers/max_over_median`), which rank that is
(`stragglers/slowest_rank`) and the median itself (`stragglers/median_step_s`). A rank over
`RATIO` x the median (and `MIN_EXCESS_S` over it) for `WINDOWS` windows in a row is named in
the log, with its host and whether its data wait or its compute is what is over the median.

Times are the host's: on GPUs a rank whose own GPU is slow makes every rank wait in the same
host reads, so it is not singled out; a slow loader, CPU or host is.
"""

from __future__ import annotations

import logging
import socket
import statistics

import torch

from umt import distributed
from umt.metrics import Window

log = logging.getLogger("umt.train")

RATIO = 1.25
WINDOWS = 3
MIN_EXCESS_S = 0.05  # and at least this much over the median per step: not scheduling noise


def straggler_reason(own: tuple[float, float], median: tuple[float, float]) -> str:
    """`data wait` or `compute`: which of a rank's (compute, data wait) per step is further over
    the median of that part."""
    compute_over, data_over = own[0] - median[0], own[1] - median[1]
    return "data wait" if data_over > compute_over else "compute"


class StragglerMonitor:
    """`__call__(window)` on every rank at each log step: the TensorBoard figures (every rank
    gets them; rank 0 writes them) and, on rank 0, the warning naming a straggler."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.hosts = distributed.all_gather_object(socket.gethostname())
        self.over = [0] * world_size  # windows in a row over RATIO x the median, per rank

    def __call__(self, window: Window) -> dict[str, float]:
        steps = max(window.steps, 1)
        compute = max(window.step_s - window.data_wait_s - window.waited_s, 0.0) / steps
        row = torch.zeros(self.world_size, 2, dtype=torch.float64)
        row[self.rank] = torch.tensor([compute, window.data_wait_s / steps])
        table = distributed.all_reduce(row).tolist()  # (W, 2): (compute, data wait) per step
        own = [c + d for c, d in table]
        median = statistics.median(own)
        slowest = max(range(self.world_size), key=own.__getitem__)
        for r, seconds in enumerate(own):
            slow = seconds > RATIO * median and seconds - median >= MIN_EXCESS_S
            self.over[r] = self.over[r] + 1 if slow else 0
            if self.over[r] == WINDOWS and self.rank == 0:
                self.warn(r, table, median)
        return {
            "stragglers/max_over_median": own[slowest] / median if median > 0 else 1.0,
            "stragglers/slowest_rank": float(slowest),
            "stragglers/median_step_s": median,
        }

    def warn(self, r: int, table: list[list[float]], median: float) -> None:
        median_parts = (
            statistics.median(c for c, _ in table),
            statistics.median(d for _, d in table),
        )
        compute, data = table[r]
        log.warning(
            "straggler: rank %d on host %s took %.3f s per step of its own (compute %.3f s, "
            "data wait %.3f s) against a median of %.3f s over the ranks, %d log windows in a "
            "row; the excess is %s",
            r, self.hosts[r], compute + data, compute, data, median, WINDOWS,
            straggler_reason((compute, data), median_parts),
        )  # fmt: skip
