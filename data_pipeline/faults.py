"""Failure injection for the tests of failure handling: every hook, in one place.

Each hook is an environment variable read when its component starts; unset, it does nothing.
They exist so that tests place a crash or a stall exactly (never by timing):

Training (read by the trainer, `TrainingFaults`):
- UMT_FAULT_KILL_AT_STEP=N[:RANK][@RUN]: every rank (or only RANK) SIGKILLs itself right after
  step N (no checkpoint): a crash, an OOM kill, a node that dies.
- UMT_FAULT_NAN_AT_STEP=N: rank 0's loss is NaN on the first micro-batch tried for step N.
- UMT_FAULT_DATA_STALL=N:S: rank 0's first batch of step N takes S more seconds to come.
- UMT_FAULT_HANG_AT_STEP=N[:RANK][@RUN]: every rank (or only RANK) blocks forever in the forward
  of step N, in a native call where no Python signal handler runs, as a rank stuck in a driver or
  NCCL call does; the others then wait in the next collective.
- UMT_FAULT_SLOW_RANK=R:S: rank R sleeps S seconds in every step (a slow node).
- UMT_FAULT_SLOW_START=R:S: rank R sleeps S seconds before it installs its signal handlers (a
  node slow to start, while the others already train).
- UMT_FAULT_KILL_IN_CHECKPOINT_WRITE=N[:RANK][@RUN]: with checkpoint.async_save, every rank (or
  only RANK) SIGKILLs itself in the middle of the background write of step N's checkpoint: after
  its first file, once training has gone on past the save.
`@RUN`: only in that run of a Slurm job (SLURM_RESTART_COUNT; default 0, the first), so that a
job requeued after the fault goes on; outside Slurm every start is run 0.
Storage (`data_pipeline.storage`):
- UMT_FAULT_KILL_IN_DOWNLOAD=1: SIGKILL after a download's first chunk (part of it on disk).
Sharding (`data_pipeline.shard.write`):
- UMT_SHARD_FAILPOINT=SHARD:N | SHARD:renamed | SHARD:published: SIGKILL the sharder's process
  group after N samples of that shard are written, after its rename, or after its publication.
Curation (`data_pipeline.curate.scan`):
- UMT_CURATE_FAILPOINT=TASK | finalize: SIGKILL the curation's process group when that task's
  results are written, or before the subset's manifest is.

This module sits on the lowest floor (the data side) so that every component can read it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

KILL_AT_STEP = "UMT_FAULT_KILL_AT_STEP"
NAN_AT_STEP = "UMT_FAULT_NAN_AT_STEP"
DATA_STALL = "UMT_FAULT_DATA_STALL"
HANG_AT_STEP = "UMT_FAULT_HANG_AT_STEP"
SLOW_RANK = "UMT_FAULT_SLOW_RANK"
SLOW_START = "UMT_FAULT_SLOW_START"
KILL_IN_CHECKPOINT_WRITE = "UMT_FAULT_KILL_IN_CHECKPOINT_WRITE"
KILL_IN_DOWNLOAD = "UMT_FAULT_KILL_IN_DOWNLOAD"
SHARD_FAILPOINT = "UMT_SHARD_FAILPOINT"
CURATE_FAILPOINT = "UMT_CURATE_FAILPOINT"


@dataclass(frozen=True)
class TrainingFaults:
    """The training hooks of one rank, read from the environment once."""

    kill_at_step: int = -1
    nan_at_step: int = -1
    stall_at_step: int = -1
    stall_s: float = 0.0
    hang_at_step: int = -1
    slow_s: float = 0.0  # this rank's sleep in every step
    kill_in_checkpoint_write: int = -1
    slow_start_s: float = 0.0  # this rank's sleep before it installs its signal handlers

    def nan_at(self, step: int, micro: int, skipped_run: int) -> bool:
        return step == self.nan_at_step and micro == 0 and skipped_run == 0

    def kill_after(self, step: int) -> None:
        if step == self.kill_at_step:
            print(
                f"fault: SIGKILL after step {step} (pid {os.getpid()})", file=sys.stderr, flush=True
            )
            kill_self()

    def hang_in(self, step: int) -> None:
        """Block forever when `step` is the hang step (in the forward of that step)."""
        if step == self.hang_at_step:
            print(f"fault: blocking forever in step {step}", file=sys.stderr, flush=True)
            block_forever()

    def slow_down(self) -> None:
        if self.slow_s > 0:
            time.sleep(self.slow_s)

    def slow_start(self) -> None:
        if self.slow_start_s > 0:
            time.sleep(self.slow_start_s)

    def kill_in_write(self, step: int) -> None:
        """In the background write of step `step`'s checkpoint, after its first file."""
        if step == self.kill_in_checkpoint_write:
            print(
                f"fault: SIGKILL in the background write of step {step}",
                file=sys.stderr,
                flush=True,
            )
            kill_self()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, rank: int = 0) -> TrainingFaults:
        env = os.environ if env is None else env
        run = int(env.get("SLURM_RESTART_COUNT") or 0)
        stall_step, _, stall_s = env.get(DATA_STALL, "-1:0").partition(":")
        slow_rank, _, slow_s = env.get(SLOW_RANK, "-1:0").partition(":")
        late_rank, _, late_s = env.get(SLOW_START, "-1:0").partition(":")
        return cls(
            _step_for(env.get(KILL_AT_STEP, ""), rank, run),
            int(env.get(NAN_AT_STEP, -1)),
            int(stall_step),
            float(stall_s or 0),
            _step_for(env.get(HANG_AT_STEP, ""), rank, run),
            float(slow_s or 0) if int(slow_rank) == rank else 0.0,
            _step_for(env.get(KILL_IN_CHECKPOINT_WRITE, ""), rank, run),
            float(late_s or 0) if int(late_rank) == rank else 0.0,
        )


def _step_for(value: str, rank: int, run: int) -> int:
    """`N[:RANK][@RUN]`: the step N when the hook is for this rank and this run, else -1."""
    if not value:
        return -1
    value, _, only_run = value.partition("@")
    step, _, only_rank = value.partition(":")
    if only_rank and int(only_rank) != rank:
        return -1
    return int(step) if int(only_run or 0) == run else -1


def block_forever() -> None:
    """Block in a native call that signals do not interrupt (a mutex locked twice), as a rank
    stuck in a driver or NCCL call is: its Python signal handlers never run."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mutex = ctypes.create_string_buffer(64)  # a zeroed pthread_mutex_t: a default mutex
        libc.pthread_mutex_lock(mutex)
        libc.pthread_mutex_lock(mutex)  # never returns (ctypes released the GIL)
    except (OSError, AttributeError):  # no glibc: a lock, whose wait does run signal handlers
        pass
    threading.Event().wait()


def kill_in_download() -> bool:
    return os.environ.get(KILL_IN_DOWNLOAD) == "1"


def shard_failpoint() -> str:
    return os.environ.get(SHARD_FAILPOINT, "")


def curate_failpoint() -> str:
    return os.environ.get(CURATE_FAILPOINT, "")


def kill_self() -> None:
    """SIGKILL this process: no handler, no cleanup, as a crash or an OOM kill leaves it."""
    os.kill(os.getpid(), signal.SIGKILL)


def trigger_failpoint(failpoint: str, here: str) -> None:
    """SIGKILL the whole process group (a run and its workers) when `failpoint` names `here`."""
    if failpoint and failpoint == here:
        os.killpg(os.getpgrp(), signal.SIGKILL)
