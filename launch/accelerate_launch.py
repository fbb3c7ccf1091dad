"""`python -m launch.accelerate_launch ARGS`: `accelerate launch ARGS` as one Slurm task per node
(`umt submit train --launcher accelerate`).

Two things `accelerate launch` does not do on Slurm, done here before handing over to it:
- `--machine_rank` comes from this task's `SLURM_NODEID` when not given (the batch script runs on
  the first node only, so it cannot pass each node's rank);
- USR1 (Slurm's warning before the time limit) is ignored by this process: its torchrun agent
  does not handle USR1 and would die of it, leaving its ranks. srun signals every process of
  the job step, so the ranks get USR1 themselves and checkpoint (they install their own handler;
  an ignored signal's disposition is inherited, so one that comes before is ignored, not fatal).
"""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    script_at = next((i for i, a in enumerate(argv) if a in ("-m", "--module")), len(argv))
    own = argv[:script_at]
    if not any(a.split("=")[0] == "--machine_rank" for a in own) and "SLURM_NODEID" in os.environ:
        argv[script_at:script_at] = ["--machine_rank", os.environ["SLURM_NODEID"]]
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(argv)
    launch_command(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
