"""`umt submit train`: render slurm/train.sbatch for a config and sbatch it, after checking what
the job's `umt train` will load (config, shards, tokenizer) as it will: not after hours in the
queue."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from launch import slurm_job

# --- train --------------------------------------------------------------------------------------


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="umt submit train",
        description="Render slurm/train.sbatch for a config and sbatch it. The job resumes from "
        "the newest checkpoint (--resume auto), checkpoints on USR1/TERM and requeues itself.",
    )
    parser.add_argument(
        "--config",
        help="YAML config: a path or a shipped config's name (umt config list); without it the "
        "built-in defaults apply",
    )
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument(
        "--gpus-per-node", type=int, default=8, help="GPUs per node; 0: a CPU job (no --gres)"
    )
    parser.add_argument(
        "--tasks-per-node",
        type=int,
        help="ranks per node (default: --gpus-per-node, or 1 without GPUs)",
    )
    parser.add_argument(
        "--launcher",
        choices=["srun", "torchrun", "accelerate"],
        default="srun",
        help="srun: one task per rank; torchrun: one task per node, torchrun starts the ranks; "
        "accelerate: one task per node, `accelerate launch` starts the ranks",
    )
    parser.add_argument(
        "--accelerate-config",
        metavar="FILE",
        help="with --launcher accelerate: your `accelerate config` file (ports, environment...); "
        "UMT's config still decides precision and ZeRO stage, and a file that asks for others "
        "is refused",
    )
    parser.add_argument(
        "--signal-s",
        type=int,
        default=300,
        help="USR1 this many seconds before the time limit (time to finish a step and save)",
    )
    parser.add_argument(
        "--chain", type=int, default=1, help="queue K jobs, each starting after the previous ends"
    )
    parser.add_argument("--nccl-socket-ifname", help="NCCL/Gloo network interface, e.g. ib0")
    slurm_job.add_job_options(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides key.path=value (after --)")
    return parser


def submit_train(argv: list[str]) -> int:
    own, passthrough = slurm_job.split_passthrough(argv)
    args = train_parser().parse_args(own)
    args.overrides += passthrough
    slurm_job.refuse_line_breaks(args)
    from umt.config import ConfigError, load_config

    try:  # validate now: a config error should not wait in the queue
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise slurm_job.SubmitError(str(exc)) from None
    if args.nodes < 1 or args.gpus_per_node < 0 or args.chain < 1:
        raise slurm_job.SubmitError("--nodes and --chain must be >= 1 and --gpus-per-node >= 0")
    procs = args.tasks_per_node or args.gpus_per_node or 1
    accelerate_args = accelerate_launch_args(args, cfg)
    torchrun = args.launcher in ("torchrun", "accelerate")  # a launcher task per node
    # Each rank feeds its GPU from data.train.num_workers loader processes, plus its own; with
    # torchrun one task holds every rank of the node.
    wanted = (cfg.data.train.num_workers + 2) * (procs if torchrun else 1)
    cpus = slurm_job.fit_request(
        args, wanted, args.nodes, 1 if torchrun else procs, args.gpus_per_node
    )
    out = Path(cfg.output_dir).resolve()
    folder = out / "slurm"
    train_args = ["--config", job_config(args.config)] if args.config else []
    train_args += list(args.overrides)
    values = slurm_job.job_values(args, f"umt-train-{out.name}", folder / "logs", cpus)
    values |= {
        "nodes": args.nodes,
        "tasks_per_node": 1 if torchrun else procs,
        "procs_per_node": procs,
        "gpus_per_node": args.gpus_per_node or None,
        "signal_s": args.signal_s,
        "socket_ifname": args.nccl_socket_ifname,
        "launcher": args.launcher,
        "train_args": slurm_job.quote_all(train_args),
        "accelerate_args": slurm_job.quote_all(accelerate_args),
        "run_dir": shlex.quote(str(out)),
        "requeue_limit": cfg.train.requeue_limit,
    }
    text = slurm_job.render("train.sbatch", values)
    problem = job_input_problem(cfg)
    if args.dry_run:
        if problem:
            print(
                f"umt submit: warning: the job would stop at its start: {problem}", file=sys.stderr
            )
        print(text, end="")
        return 0
    if problem:
        raise slurm_job.SubmitError(f"the job would stop at its start: {problem}")
    script = slurm_job.write_script(folder, "train.sbatch", text)
    previous: str | None = None
    for _ in range(args.chain):
        dependency = f"afterany:{previous}" if previous else None
        previous = slurm_job.sbatch(script, args.sbatch_arg, dependency)
        print(f"submitted training job {previous} ({script})")
    print(slurm_job.follow_hint(folder / "logs", values["job_name"], previous))
    return 0


def job_input_problem(cfg) -> str | None:
    """What the job's `umt train` would refuse in the data it loads (shards, tokenizer, the
    negatives field), checked here as it will check them, from the folder the job runs in."""
    from umt.config import ConfigError
    from umt.preflight import check_training_inputs
    from umt.run_config import absolute_paths

    try:
        check_training_inputs(absolute_paths(cfg))
    except ConfigError as exc:
        return str(exc)
    return None


def job_config(given: str) -> str:
    """--config as the job names it: a file's absolute path, or a shipped config's name (the
    job's own UMT installation resolves it; a path under the submitting folder would not exist)."""
    if Path(given).is_file():
        return str(Path(given).resolve())
    return given  # load_config accepted it: a shipped config's name


def accelerate_launch_args(args: argparse.Namespace, cfg) -> list[str]:
    """`--config_file FILE` for `accelerate launch`, after checking the file against the config
    as the ranks will (a conflict should not wait in the queue)."""
    if args.accelerate_config is None:
        return []
    if args.launcher != "accelerate":
        raise slurm_job.SubmitError("--accelerate-config goes with --launcher accelerate")
    import yaml

    from umt.config import ConfigError
    from umt.preflight import check_accelerate_settings

    path = Path(args.accelerate_config).resolve()
    try:
        settings = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise slurm_job.SubmitError(f"--accelerate-config {path}: cannot read it ({exc})") from None
    if not isinstance(settings, dict):
        raise slurm_job.SubmitError(
            f"--accelerate-config {path}: not an accelerate config (a mapping)"
        )
    kind = str(settings.get("distributed_type", "MULTI_GPU"))
    if kind not in ("MULTI_GPU", "NO", "MULTI_CPU"):
        raise slurm_job.SubmitError(
            f"--accelerate-config {path}: distributed_type {kind}: UMT runs its own DeepSpeed "
            "ZeRO (zero.stage); use distributed_type: MULTI_GPU"
        )
    precision = settings.get("mixed_precision", "no")
    env = {"ACCELERATE_MIXED_PRECISION": "no" if precision is False else str(precision)}
    try:
        check_accelerate_settings(cfg, env, cuda=args.gpus_per_node > 0)
    except ConfigError as exc:
        raise slurm_job.SubmitError(f"--accelerate-config {path}: {exc}") from None
    return ["--config_file", str(path)]
