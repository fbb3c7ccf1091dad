"""`umt submit curate`: `umt data curate` as a Slurm job (slurm/curate.sbatch), rendered and
queued as the others are (launch/slurm_job.py); the options after `--` are checked before sbatch."""

from __future__ import annotations

import argparse
from pathlib import Path

from launch import slurm_job


def curate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="umt submit curate",
        description="Curate shards as a Slurm job (`umt data curate`): nodes x tasks-per-node "
        "tasks split the shards, each with --cpus-per-task worker processes; the last to finish "
        "writes the subset. Options after -- go to `umt data curate` (e.g. --dedup exact,near).",
    )
    parser.add_argument("shards", help="the shards of `umt data curate` (folder, pattern, subset)")
    parser.add_argument("--out", required=True, help="the subset folder")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--tasks-per-node", type=int, default=1, help="ranks per node")
    parser.add_argument(
        "--gpus-per-node", type=int, default=0, help="GPUs per node for the scorer (0: CPU)"
    )
    slurm_job.add_job_options(parser)
    return parser


def submit_curate(argv: list[str]) -> int:
    own, curate_options = slurm_job.split_passthrough(argv)
    args = curate_parser().parse_args(own)
    slurm_job.refuse_line_breaks(args, curate_options)
    if args.nodes < 1 or args.tasks_per_node < 1 or args.gpus_per_node < 0:
        raise slurm_job.SubmitError(
            "--nodes and --tasks-per-node must be >= 1, --gpus-per-node >= 0"
        )
    check_curate_options(args.shards, args.out, curate_options)
    out = Path(args.out).resolve()
    folder = out / "slurm"
    cpus = slurm_job.fit_request(args, 4, args.nodes, args.tasks_per_node, args.gpus_per_node)
    values = slurm_job.job_values(args, f"umt-curate-{out.name}", folder / "logs", cpus)
    shards = args.shards if "://" in args.shards else str(Path(args.shards).resolve())
    values |= {
        "nodes": args.nodes,
        "tasks_per_node": args.tasks_per_node,
        "gpus_per_node": args.gpus_per_node or None,
        "curate_args": slurm_job.quote_all([shards, "--out", str(out), *curate_options]),
    }
    text = slurm_job.render("curate.sbatch", values)
    if args.dry_run:
        print(text, end="")
        return 0
    script = slurm_job.write_script(folder, "curate.sbatch", text)
    job = slurm_job.sbatch(script, args.sbatch_arg)
    print(f"submitted curation job {job} ({script})")
    print(slurm_job.follow_hint(folder / "logs", values["job_name"], job))
    return 0


def check_curate_options(shards: str, out: str, options: list[str]) -> None:
    """The options `umt data curate` will get, checked now (parsing and ranges; the shards are
    read in the job): a bad flag should not wait in the queue."""
    from data_pipeline.curate.options import CurateError, validate_options
    from launch.curate import options_from_args
    from launch.data import build_parser

    try:
        args = build_parser().parse_args(["curate", shards, "--out", out, *options])
    except SystemExit:  # argparse has printed which option, as `umt data curate` would
        raise slurm_job.SubmitError(
            "the options after -- are not those of `umt data curate`"
        ) from None
    try:
        validate_options(options_from_args(args))
    except CurateError as exc:
        raise slurm_job.SubmitError(f"options after --: {exc}") from None
