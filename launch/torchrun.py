"""`python -m launch.torchrun [torchrun options] -m launch.train ...`: torchrun, with the signals a
person or Slurm sends handled as UMT's ranks expect (`umt train --nproc-per-node N` runs this).

torchrun treats SIGINT (Ctrl-C) like a death signal: it forwards it, gives the ranks 30 s
(`--shutdown_timeout`), SIGKILLs them, and exits 1 with its own traceback, however cleanly the
ranks saved. Here the agent does not die of SIGINT, SIGTERM or SIGUSR1: it passes each on to its
ranks, which finish their step, save a checkpoint together and exit 0, and torchrun then ends as
they did. Ranks run in sessions of their own (torchrun starts them so), so a terminal's Ctrl-C
reaches only this process. A second Ctrl-C is passed on too (the ranks stop without saving); a
third kills them. A rank that dies makes torchrun stop the others (SIGTERM, SIGKILL after
--shutdown_timeout); the exit code then says how it ended (`launcher_exit_code`).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
TORCHRUN_HANDLES = "SIGHUP,SIGQUIT"  # still fatal to the agent, as torchrun makes them


def child_pids(parent: int) -> list[int]:
    """Processes whose parent is `parent` (Linux /proc): torchrun's ranks."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after it.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == parent:
            pids.append(int(entry.name))
    return pids


def forward_signals() -> None:
    """Install the agent's handlers: pass each signal on to the ranks (Ctrl-C: say what happens)."""
    presses = [0]

    def forward(signum, _frame):
        sig = signal.Signals(signum)
        if sig == signal.SIGINT:
            presses[0] += 1
            message = {
                1: "the ranks finish their step, save a checkpoint and stop "
                "(Ctrl-C again: stop now, without saving)",
                2: "stopping the ranks now, without saving (Ctrl-C again: kill them)",
            }.get(presses[0], "killing the ranks")
            print(f"umt: Ctrl-C: {message}", file=sys.stderr, flush=True)
            if presses[0] >= 3:
                sig = signal.SIGKILL
        for pid in child_pids(os.getpid()):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for sig in FORWARDED:
        signal.signal(sig, forward)


def torchrun_args(argv: list[str]) -> list[str]:
    """`argv` with torchrun's own handling left to SIGHUP and SIGQUIT (a --signals_to_handle the
    user gave loses the forwarded signals, which this process handles)."""
    script_at = next((i for i, a in enumerate(argv) if a in ("-m", "--module")), len(argv))
    own, rest = argv[:script_at], argv[script_at:]
    kept, skip = [], False
    for i, arg in enumerate(own):
        if skip:
            skip = False
            continue
        name, eq, value = arg.partition("=")
        if name in ("--signals_to_handle", "--signals-to-handle"):
            if not eq:
                value, skip = (own[i + 1] if i + 1 < len(own) else ""), True
            given = [s for s in value.split(",") if s.strip() not in [f.name for f in FORWARDED]]
            kept.append(f"--signals_to_handle={','.join(given) or TORCHRUN_HANDLES}")
            continue
        kept.append(arg)
    if not any(a.split("=")[0] in ("--signals_to_handle", "--signals-to-handle") for a in kept):
        kept.append(f"--signals_to_handle={TORCHRUN_HANDLES}")
    return kept + rest


def main(argv: list[str] | None = None) -> int:
    argv = torchrun_args(list(sys.argv[1:] if argv is None else argv))
    forward_signals()
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as exc:
        return report_failed_ranks(exc)
    return 0


def report_failed_ranks(exc) -> int:
    """One line for torchrun's ChildFailedError (each rank printed its own error above) and the
    exit code that tells the Slurm job what happened: 75 when the hang watchdog ended a rank,
    128+N when a rank died of signal N (both requeue the job: `launch.requeue`), else the
    ranks' own code."""
    codes = sorted({f.exitcode for f in exc.failures.values()})
    ranks = sorted(exc.failures)  # keyed by global rank
    print(
        f"umt: rank(s) {', '.join(map(str, ranks))} exited with "
        f"{', '.join(map(str, codes))} (their own messages are above)",
        file=sys.stderr,
    )
    return launcher_exit_code(codes)


def launcher_exit_code(codes: list[int]) -> int:
    """torchrun reports a rank killed by signal N as exit code -N."""
    from umt.watchdog import HANG_EXIT_CODE

    if HANG_EXIT_CODE in codes:
        return HANG_EXIT_CODE
    signals = [-c for c in codes if c < 0]
    if signals:
        return 128 + signals[0]
    return codes[0] if len(codes) == 1 and codes[0] > 0 else 1


if __name__ == "__main__":
    from launch.cli import exit_process

    exit_process(main())
