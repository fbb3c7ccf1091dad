"""`python -m launch.train --config X.yaml [a.b=c ...]` (also `umt train`): single process, torchrun,
`accelerate launch`, the deepspeed launcher or srun."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping

from launch.cli import gc_paused, say

log = logging.getLogger("umt.launch")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="umt train", description=__doc__)
    parser.add_argument(
        "--config",
        help="YAML config (configs/*.yaml); without it the built-in defaults apply: the `base` "
        "model at 224 px, which needs data.train.shards and data.tokenizer",
    )
    parser.add_argument(
        "--resume",
        default="auto",
        help="default `auto`: a run folder (output_dir) holding a checkpoint is resumed from its "
        "newest one, else the run starts fresh; or a run folder, its checkpoints/ or one step "
        "folder to go on from; `none`: a fresh start, refused in a folder that holds a run",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="start over in an output_dir that holds a run: the old run is moved into "
        "OUTPUT_DIR/replaced-<time>/ (nothing is deleted)",
    )
    parser.add_argument(
        "--new-mixture",
        action="store_true",
        help="resume with another data.train.shards mixture (sources added or left out, repeat, "
        "proportion or weight changed): a new phase of the sample stream starts at the "
        "checkpoint's position, with a whole epoch of the new mixture; recorded in the run",
    )
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        metavar="N",
        help="run N ranks on this machine (through torchrun, Ctrl-C saving cleanly)",
    )
    parser.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="config overrides key.path=value")
    args = parser.parse_args(argv)
    if args.restart and args.resume not in ("auto", "none"):
        parser.error("--restart starts over: it goes without --resume")
    if args.new_mixture and (args.restart or args.resume == "none"):
        parser.error("--new-mixture changes the data of a run that goes on: it goes with a resume")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        parser.error(f"--nproc-per-node must be >= 1 (got {args.nproc_per_node})")
    return args


def main(argv: list[str] | None = None) -> int:
    with gc_paused() as work_begins:  # start-up, until the trainer is built
        return _main(sys.argv[1:] if argv is None else argv, work_begins)


def _main(argv: list[str], work_begins: Callable[[], None]) -> int:
    args = parse_args(argv)
    from umt.checkpoint import CheckpointError
    from umt.config import ConfigError, load_config
    from umt.distributed import discover_world
    from umt.run_config import absolute_paths, check_resume, record_config_change, resume_plan

    try:
        # --restart: the run's saved config (unless --config), started over
        config, overrides, resume, run = resume_plan(args.resume, args.config, args.overrides)
        resume = "none" if args.restart else resume
        cfg = absolute_paths(load_config(config, overrides))  # a run remembers where things are
        check_resume(cfg, resume, args.restart, args.new_mixture)  # resumed or refused
        import torch

        from umt.preflight import check_accelerate_settings, check_training_inputs

        check_training_inputs(cfg)  # before the process group, the model and DeepSpeed
        launched_by = check_accelerate_settings(cfg, os.environ, torch.cuda.is_available())
    except (ConfigError, CheckpointError) as exc:
        return said_by_rank0(str(exc), 2)  # every rank finds the same: said once
    done = finished_run(cfg, resume)
    if done:
        if discover_world().rank == 0:
            say(f"umt train: {done}")
        return 0
    if args.nproc_per_node is not None and discover_world().launcher == "single":
        work_begins()  # from here this process supervises its ranks, for the whole run
        return launch_ranks(args.nproc_per_node, argv)
    args.resume = resume
    if discover_world().rank == 0 and not args.restart:
        record_config_change(cfg, resume, args.new_mixture)  # before config.yaml is rewritten

    from data_pipeline.loader import LoaderConfigError, LoaderStateError
    from data_pipeline.storage import StorageError
    from umt.distributed import shutdown
    from umt.logs import setup_logging
    from umt.train import Trainer, TrainingError

    setup_logging(discover_world().rank)
    if launched_by and discover_world().rank == 0:
        log.info("%s", launched_by)
    if run is not None and discover_world().rank == 0:
        given = ", ".join(args.overrides) or "none"
        what = "starting over in" if args.restart else "resuming"
        log.info("%s %s with its saved config %s; overrides on top: %s", what, run, config, given)
    try:
        trainer = Trainer(cfg, args.resume, args.restart, args.new_mixture)
        trainer.install_signal_handlers()
        work_begins()
        trainer.train()
    except (
        CheckpointError,
        TrainingError,
        LoaderConfigError,
        LoaderStateError,
        StorageError,
    ) as exc:
        rank = discover_world().rank
        say(f"{prog(rank)}: {exc}")
        if getattr(exc, "requeue", False) and rank == 0:
            requeue_slurm_job(os.environ)  # it resumes from the last checkpoint
        return 1
    shutdown()
    # train() returns before train.steps only after a signal, once every rank's checkpoint is on
    # disk: requeued to go on, unless a person stopped it (Ctrl-C).
    stopped_by_user = trainer.stop_signal == signal.SIGINT
    if trainer.state.step < cfg.train.steps and trainer.rank == 0 and not stopped_by_user:
        requeue_slurm_job(os.environ)
    return 0


def prog(rank: int) -> str:
    """How a rank's lines start: `umt train`, `umt train [rank N]` for the others."""
    return f"umt train [rank {rank}]" if rank else "umt train"


# How long the other ranks leave rank 0 to say a refusal they share before they say it too.
RANK0_SAYS_S = 60.0


def said_by_rank0(message: str, code: int) -> int:
    """Exit `code` with a refusal every rank finds alike (its config, its checkpoint), said in
    one line by rank 0. The other ranks wait for their launcher to end them (torchrun, `accelerate
    launch` and srun --kill-on-bad-exit stop the rest once a rank fails): one that exited first
    had the launcher kill rank 0 before its line, and the user saw no reason at all. Past
    RANK0_SAYS_S (rank 0 on another node, under another launcher) they say it themselves."""
    from umt.distributed import discover_world

    world = discover_world()
    if world.rank != 0:
        threading.Event().wait(RANK0_SAYS_S)  # the launcher's SIGTERM ends it before
    say(f"{prog(world.rank)}: {message}")
    return code


def finished_run(cfg, resume: str) -> str | None:
    """Why there is nothing to train (the checkpoint resumed from is at or past train.steps), or
    None. Said before any set-up: re-running a finished run's command only says so."""
    from pathlib import Path

    from umt.checkpoint import resolve

    root = Path(cfg.checkpoint.dir or Path(cfg.output_dir) / "checkpoints")
    ref = resolve(resume, root)
    if ref is None or ref.step < cfg.train.steps:
        return None
    return (
        f"the run in {cfg.output_dir} is at step {ref.step} ({ref.path}) and train.steps is "
        f"{cfg.train.steps}: nothing to train (train.steps=N with N > {ref.step} goes on)"
    )


def launch_ranks(nproc: int, argv: list[str]) -> int:
    """`umt train --nproc-per-node N ...`: the same command as N ranks under torchrun on this
    machine (a rendezvous of its own on a free port)."""
    from launch.torchrun import main as torchrun

    rest, skip = [], False
    for arg in argv:  # everything but --nproc-per-node goes to each rank
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            rest.append(arg)
    return torchrun(["--standalone", f"--nproc_per_node={nproc}", "-m", "launch.train", *rest])


def requeue_slurm_job(env: Mapping[str, str]) -> None:
    """Put this Slurm job back in the queue (it resumes with --resume auto), if it is requeueable."""
    job = env.get("SLURM_JOB_ID")
    if not job:
        log.info("not a Slurm job: continue with `umt train --resume auto`")
        return
    show = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
    if "Requeue=1" not in show.stdout.split():
        log.info("Slurm job %s is not requeueable (sbatch --requeue): exiting cleanly", job)
        return
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode == 0:
        log.info("requeued Slurm job %s; it resumes from the checkpoint", job)
    else:  # e.g. the job was cancelled meanwhile: the checkpoint is kept either way
        log.warning("scontrol requeue %s failed: %s", job, (proc.stderr or proc.stdout).strip())


if __name__ == "__main__":  # under torchrun, srun or the deepspeed launcher: one line per error
    from launch.cli import exit_process, run_guarded

    exit_process(run_guarded(prog(int(os.environ.get("RANK", "0"))), main, sys.argv[1:]))
