"""`python -m launch.train --config X.yaml [a.b=c ...]` (also `umt train`): single process, torchrun,
`accelerate launch`, the deepspeed launcher or srun."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping

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
        default="none",
        help="`auto` (newest complete checkpoint, else fresh), a checkpoint folder, or `none`",
    )
    parser.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="config overrides key.path=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from umt.checkpoint import CheckpointError
    from umt.config import ConfigError, load_config
    from umt.distributed import discover_world
    from umt.run_config import absolute_paths, check_resume, resume_plan

    config, overrides, resume, run = resume_plan(args.resume, args.config, args.overrides)
    try:
        cfg = absolute_paths(load_config(config, overrides))  # a run remembers where things are
        check_resume(cfg, resume)  # a resume that would make another run is refused
        import torch

        from umt.preflight import check_accelerate_settings, check_training_inputs

        check_training_inputs(cfg)  # before the process group, the model and DeepSpeed
        launched_by = check_accelerate_settings(cfg, os.environ, torch.cuda.is_available())
    except ConfigError as exc:
        if discover_world().rank == 0:  # every rank finds the same: say it once
            print(f"umt train: {exc}", file=sys.stderr)
        return 2
    args.resume = resume

    from data_pipeline.loader import LoaderConfigError, LoaderStateError
    from data_pipeline.storage import StorageError
    from umt.distributed import shutdown
    from umt.logging import setup_logging
    from umt.train import Trainer, TrainingError

    setup_logging(discover_world().rank)
    if launched_by and discover_world().rank == 0:
        log.info("%s", launched_by)
    if run is not None and discover_world().rank == 0:
        given = ", ".join(args.overrides) or "none"
        log.info("resuming %s with its saved config %s; overrides on top: %s", run, config, given)
    try:
        trainer = Trainer(cfg, resume=args.resume)
        trainer.install_signal_handlers()
        trainer.train()
    except (
        CheckpointError,
        TrainingError,
        LoaderConfigError,
        LoaderStateError,
        StorageError,
    ) as exc:
        rank = discover_world().rank
        print(f"umt train{f' [rank {rank}]' if rank else ''}: {exc}", file=sys.stderr)
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
    from launch.cli import run_guarded

    _rank = os.environ.get("RANK", "0")
    sys.exit(
        run_guarded(f"umt train{f' [rank {_rank}]' if _rank != '0' else ''}", main, sys.argv[1:])
    )
