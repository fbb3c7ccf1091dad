"""Failure injection for the tests of failure handling: every hook, in one place.

Each hook is an environment variable read when its component starts; unset, it does nothing.
They exist so that tests place a crash or a stall exactly (never by timing):

Training (read by the trainer, `TrainingFaults`):
- UMT_FAULT_KILL_AT_STEP=N: every rank SIGKILLs itself right after step N (no checkpoint).
- UMT_FAULT_NAN_AT_STEP=N: rank 0's loss is NaN on the first micro-batch tried for step N.
- UMT_FAULT_DATA_STALL=N:S: rank 0's first batch of step N takes S more seconds to come.
Storage (`data_pipeline.storage`):
- UMT_FAULT_KILL_IN_DOWNLOAD=1: SIGKILL after a download's first chunk (part of it on disk).
Sharding (`data_pipeline.shard.write`):
- UMT_SHARD_FAILPOINT=SHARD:N | SHARD:renamed | SHARD:published: SIGKILL the sharder's process
  group after N samples of that shard are written, after its rename, or after its publication.

This module sits on the lowest floor (the data side) so that every component can read it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

KILL_AT_STEP = "UMT_FAULT_KILL_AT_STEP"
NAN_AT_STEP = "UMT_FAULT_NAN_AT_STEP"
DATA_STALL = "UMT_FAULT_DATA_STALL"
KILL_IN_DOWNLOAD = "UMT_FAULT_KILL_IN_DOWNLOAD"
SHARD_FAILPOINT = "UMT_SHARD_FAILPOINT"


@dataclass(frozen=True)
class TrainingFaults:
    """The training hooks, read from the environment once."""

    kill_at_step: int = -1
    nan_at_step: int = -1
    stall_at_step: int = -1
    stall_s: float = 0.0

    def nan_at(self, step: int, micro: int, skipped_run: int) -> bool:
        return step == self.nan_at_step and micro == 0 and skipped_run == 0

    def kill_after(self, step: int) -> None:
        if step == self.kill_at_step:
            kill_self()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TrainingFaults:
        env = os.environ if env is None else env
        stall_step, _, stall_s = env.get(DATA_STALL, "-1:0").partition(":")
        return cls(
            int(env.get(KILL_AT_STEP, -1)),
            int(env.get(NAN_AT_STEP, -1)),
            int(stall_step),
            float(stall_s or 0),
        )


def kill_in_download() -> bool:
    return os.environ.get(KILL_IN_DOWNLOAD) == "1"


def shard_failpoint() -> str:
    return os.environ.get(SHARD_FAILPOINT, "")


def kill_self() -> None:
    """SIGKILL this process: no handler, no cleanup, as a crash or an OOM kill leaves it."""
    os.kill(os.getpid(), signal.SIGKILL)


def trigger_failpoint(failpoint: str, here: str) -> None:
    """SIGKILL the whole process group (a run and its workers) when `failpoint` names `here`."""
    if failpoint and failpoint == here:
        os.killpg(os.getpgrp(), signal.SIGKILL)
