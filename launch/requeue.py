"""`python -m launch.requeue EXIT_CODE RUN_DIR LIMIT`: the end of a Slurm training job's step.

slurm/train.sbatch runs this after its launcher returns. A hang (exit 75, the watchdog's) or a
rank killed by a signal (128+N, as srun and launch.torchrun report it) ended the step at once:
the job is requeued, and resumes from the last checkpoint, at most LIMIT times
(`train.requeue_limit`; preemptions, which requeue from the trainer, do not count). Any other
failure (a config or data error) would fail the same way again: not requeued. Each decision is a
line of RUN_DIR/slurm/requeues.jsonl, and one line of the job log.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from launch.train import requeue_slurm_job
from umt.watchdog import HANG_EXIT_CODE

RECORD = Path("slurm") / "requeues.jsonl"


def failure_reason(exit_code: int, run_dir: Path, since: float) -> str | None:
    """Why the step ended, when it is worth a requeue (None: it is not)."""
    hangs = sorted(
        (p for p in (run_dir / "hangs").glob("*/summary.txt") if p.stat().st_mtime >= since),
        key=lambda p: p.stat().st_mtime,
    )
    if hangs:  # under srun the others' kill (137) can hide the watchdog's own exit code
        return f"hang (exit {exit_code}): {hangs[-1]}"
    if exit_code == HANG_EXIT_CODE:
        return f"hang (exit {exit_code}): no summary written, see the ranks' lines in the log"
    if exit_code > 128:
        return f"a rank died of signal {exit_code - 128} (exit {exit_code})"
    return None


def decide(exit_code: int, run_dir: Path, limit: int, env: Mapping[str, str]) -> str:
    """Record the decision and requeue when due; returns the line for the log."""
    if exit_code == 0:
        return ""
    job = env.get("SLURM_JOB_ID", "")
    since = float(env.get("UMT_JOB_STARTED", "0") or 0)
    reason = failure_reason(exit_code, run_dir, since)
    record = run_dir / RECORD
    earlier = []
    if record.is_file():
        lines = record.read_text().splitlines()
        earlier = [json.loads(line) for line in lines if line.strip()]
    done = sum(1 for e in earlier if e.get("job") == job and e.get("requeued"))
    requeue = reason is not None and done < limit
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "job": job,
        "restart": int(env.get("SLURM_RESTART_COUNT", "0") or 0),
        "exit_code": exit_code,
        "reason": reason or f"exit {exit_code}: an error that a requeue would repeat",
        "requeued": requeue,
    }
    record.parent.mkdir(parents=True, exist_ok=True)
    with open(record, "a") as handle:
        handle.write(json.dumps(entry) + "\n")
    if reason is None:
        return (
            f"[umt] exit {exit_code}: not requeued (the error would repeat; its message is above)"
        )
    if not requeue:
        return (
            f"[umt] {reason}: not requeued, {done} requeues after failures already "
            f"(train.requeue_limit {limit})"
        )
    requeue_slurm_job(env)
    return f"[umt] {reason}: requeued ({done + 1} of {limit}), resuming from the last checkpoint"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: python -m launch.requeue EXIT_CODE RUN_DIR LIMIT", file=sys.stderr)
        return 2
    import logging

    logging.basicConfig(level=logging.INFO, format="[umt] %(message)s")
    line = decide(int(argv[0]), Path(argv[1]), int(argv[2]), os.environ)
    if line:
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
