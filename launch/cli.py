"""The `umt` command: dispatches `umt <command> ...` to `launch.<module>.main(argv)`.

Each command lives in its own module and is imported only when it runs, so `umt --help` and
`umt shard` do not pay for importing DeepSpeed.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import NoReturn

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("launch.train", "train a model on WebDataset shards with DeepSpeed ZeRO"),
    "shard": ("launch.shard", "turn image-text pairs into WebDataset shards + manifest"),
    "data": ("launch.data", "inspect shards and print the sample order a rank sees"),
    "eval": ("launch.evaluate", "image-text retrieval evaluation of a checkpoint or export"),
    "export": ("launch.export", "consolidate a ZeRO checkpoint into loadable weights"),
    "submit": ("launch.submit", "render a Slurm script from a config and sbatch it"),
    "demo": ("launch.demo", "the whole loop on a CPU on a built-in dataset"),
    "model": ("launch.model", "list model presets and their parameter counts"),
    "config": ("launch.config", "list the shipped configs, or print one to start your own"),
    "tokenizer": ("launch.tokenizer", "train a WordPiece tokenizer on shards' captions"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: umt <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [
        "",
        "Run `umt <command> --help` for a command's options; `umt --debug <command> ...` (or",
        "UMT_DEBUG=1) shows the traceback of an error instead of its one-line message.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:  # tracebacks for every error, here and in processes started from here
        argv.remove("--debug")
        os.environ["UMT_DEBUG"] = "1"
    if argv[:1] == ["--version"]:
        from umt.versions import umt_version

        print(f"umt {umt_version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"umt: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return run_guarded(f"umt {name}", module.main, rest)


# Whether the collector was on when each pause in force began (the outermost first).
_GC_PAUSES: list[bool] = []


def _gc_back_in_a_forked_child() -> None:
    """A process forked during a start-up (a loader worker, say) runs for the whole job: it gets
    the collector as it was before the pause, not paused."""
    if _GC_PAUSES and _GC_PAUSES[0]:
        gc.enable()
    _GC_PAUSES.clear()


os.register_at_fork(after_in_child=_gc_back_in_a_forked_child)


@contextlib.contextmanager
def gc_paused() -> Iterator[Callable[[], None]]:
    """Python's cyclic garbage collector off while a command starts up: importing torch,
    transformers and DeepSpeed, building the model and its engine, loading weights. Those make
    millions of objects and few cycles, and the collections they set off cost about 1 s of CPU
    per process (a tiny training run: 6.3-7.6 s of CPU with the collector on, 5.8-6.3 s with it
    off). Yields `work_begins`, which turns the collector back on (if it was on) where the
    command's own work starts; leaving the block does too, whatever way it is left. A process
    forked meanwhile starts with the collector as it was before the pause."""
    was_enabled = gc.isenabled()
    _GC_PAUSES.append(was_enabled)
    gc.disable()
    ended = False

    def work_begins() -> None:
        nonlocal ended
        if not ended:
            ended = True
            if _GC_PAUSES:  # a forked child's list is empty
                _GC_PAUSES.pop()
            if was_enabled:
                gc.enable()

    try:
        yield work_begins
    finally:
        work_begins()


def say(line: str) -> None:
    """`line` on stderr in one write: ranks share their launcher's stderr, and under `python -u`
    (torchrun, srun) `print` writes the text and its newline apart, so two ranks' lines could
    come out glued together (one line with both messages, the other empty)."""
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


def run_guarded(prog: str, main_fn: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """`main_fn(argv)`, with an error no command handles shown as one line (exit 1), not a
    traceback, unless UMT_DEBUG=1 (or --debug) asks for the traceback."""
    from umt.logs import debugging

    if debugging():
        return int(main_fn(argv) or 0)
    try:
        return int(main_fn(argv) or 0)
    except KeyboardInterrupt:
        say(f"{prog}: interrupted")
        return 130
    except BrokenPipeError:  # `umt data inspect ... | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the exit's flush does not fail again
        return 141  # as a process killed by SIGPIPE
    except Exception as exc:  # noqa: BLE001 - the last line of defence, named as such
        text = " ".join(str(exc).split())[:500] or "(no message)"
        where = (
            f" ({exc.filename})"
            if getattr(exc, "filename", None) and str(exc.filename) not in text
            else ""
        )
        say(
            f"{prog}: error: {type(exc).__name__}: {text}{where} "
            "[unexpected: run again with --debug (or UMT_DEBUG=1) for the traceback]"
        )
        return 1


def exit_process(code: int) -> NoReturn:
    """End this process with `code`, skipping only the interpreter's teardown of its modules.

    With torch, DeepSpeed and transformers imported, that teardown costs about 2 s of CPU per
    process (`python -c "import umt.train"`: 7.9 s; with `os._exit(0)` at the end: 6.1 s),
    paid by every rank of every job and every `umt` command that loaded a model. Everything that
    teardown does that a user could see happens first, in the interpreter's own order:
    non-daemon threads are joined, `atexit` handlers run (logging's flush, multiprocessing's
    worker clean-up, temporary folders), then stdout and stderr are flushed.
    """
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # noqa: SLF001 - what the interpreter runs at exit, run early
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be written
            pass
    os._exit(code)


def console_main() -> NoReturn:
    """The `umt` console script: `main()`, then `exit_process` (in-process callers use main)."""
    exit_process(main())


if __name__ == "__main__":
    console_main()
