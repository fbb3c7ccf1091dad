"""How many threads torch's CPU operations use in a training process, whatever the launcher.

torch starts one thread per core in every process. A rank that shares its cores with other
ranks and with its loader workers then thrashes: one process on 2 cores with 2 workers trained
6-9x slower than with one thread (measured for issue #26). torchrun sets OMP_NUM_THREADS=1 for
everyone, which wastes a big node's cores; a plain `umt train` set nothing. So each rank takes
the CPUs it may run on (its affinity, and Slurm's CPUs per task), its share of them when a launcher
runs several ranks in one CPU set, minus its loader workers (one thread each), at least one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadChoice:
    count: int  # torch.set_num_threads(count)
    cpus: int  # CPUs this process and the ranks sharing them may use
    sharing: int  # ranks started by one launcher in that CPU set (LOCAL_WORLD_SIZE)
    workers: int  # loader worker processes of this rank
    configured: bool  # train.cpu_threads set it

    def describe(self) -> str:
        if self.configured:
            return f"torch CPU threads per rank: {self.count} (train.cpu_threads)"
        share = f"{self.cpus} CPUs" + (f" / {self.sharing} local ranks" if self.sharing > 1 else "")
        return (
            f"torch CPU threads per rank: {self.count} ({share}, minus {self.workers} loader "
            "workers; train.cpu_threads sets another count)"
        )


def available_cpus(env: Mapping[str, str]) -> int:
    """CPUs this process may run on: its affinity, at most Slurm's CPUs per task."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    slurm = env.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
    return max(1, cpus or 1)


def choose_threads(
    configured: int, workers: int, env: Mapping[str, str] | None = None
) -> ThreadChoice:
    """`configured` (train.cpu_threads) when > 0, else this rank's share of the CPUs minus its
    loader workers. torchrun and `accelerate launch` run LOCAL_WORLD_SIZE ranks in one task's
    CPU set, the deepspeed launcher LOCAL_SIZE; srun with a task per rank gives each its own
    (SLURM_CPUS_PER_TASK)."""
    env = os.environ if env is None else env
    cpus = available_cpus(env)
    local = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or "1"
    sharing = max(1, int(local)) if local.isdigit() else 1
    if configured > 0:
        return ThreadChoice(configured, cpus, sharing, workers, True)
    return ThreadChoice(max(1, cpus // sharing - workers), cpus, sharing, workers, False)
