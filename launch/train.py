"""`python -m launch.train --config X.yaml [a.b=c ...]` (also `umt train`): single process, torchrun,
the deepspeed launcher or srun."""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="umt train", description=__doc__)
    parser.add_argument("--config", help="YAML config (default: configs/demo_cpu.yaml values)")
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

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"umt train: {exc}", file=sys.stderr)
        return 2

    from umt.distributed import discover_world
    from umt.logging import setup_logging
    from umt.train import Trainer, TrainingError

    setup_logging(discover_world().rank)
    try:
        trainer = Trainer(cfg, resume=args.resume)
        trainer.install_signal_handlers()
        trainer.train()
    except (CheckpointError, TrainingError) as exc:
        print(f"umt train: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
