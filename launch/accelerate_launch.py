"""`python -m launch.accelerate_launch ARGS`: `accelerate launch ARGS` with UMT's handling of
signals, as one Slurm task per node (`umt submit train --launcher accelerate`) or by hand.

What `accelerate launch` does not do, done here before handing over to it:
- `--machine_rank` comes from this task's `SLURM_NODEID` when not given (the batch script runs on
  the first node only, so it cannot pass each node's rank);
- SIGINT (Ctrl-C), SIGTERM and USR1 (Slurm's warning before the time limit) do not kill its
  torchrun agent: they are passed on to the ranks, which finish their step, save a checkpoint
  together and exit 0 (`launch.torchrun`). Plain `accelerate launch` dies of them and exits 130
  after giving the ranks 30 s; srun, which signals every process of the step, would kill it
  before its ranks could save;
- a rank that failed, hung or died ends it with one line and the exit code of `launch.torchrun`
  (75 for a hang, 128+N for a rank killed by signal N), not a traceback.
"""

from __future__ import annotations

import os
import sys

from launch.torchrun import TORCHRUN_HANDLES, forward_signals, report_failed_ranks


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    script_at = next((i for i, a in enumerate(argv) if a in ("-m", "--module")), len(argv))
    own = argv[:script_at]
    if not any(a.split("=")[0] == "--machine_rank" for a in own) and "SLURM_NODEID" in os.environ:
        argv[script_at:script_at] = ["--machine_rank", os.environ["SLURM_NODEID"]]
    # accelerate builds torchrun's options from torchrun's own parser, whose defaults come from
    # PET_* variables: the agent itself then handles only these (the others are forwarded).
    os.environ["PET_SIGNALS_TO_HANDLE"] = TORCHRUN_HANDLES
    forward_signals()
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as exc:  # its torchrun agent's: a rank failed, hung or died
        return report_failed_ranks(exc)
    return 0


if __name__ == "__main__":
    from launch.cli import exit_process

    exit_process(main())
