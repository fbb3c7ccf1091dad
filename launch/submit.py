"""`umt submit train|shard|eval|curate`: render a `slurm/*.sbatch` template from options (and, for
training, the config), write it into the run's folder and `sbatch` it.

Every value a user fills in comes from an option here, never from editing a script: partition,
account, time, nodes, GPUs, CPUs, memory and how the job activates its Python environment
(default: the virtual environment of the Python running `umt submit`). `--dry-run` prints the
script and submits nothing. A template line whose value is not given is left out (no
`--gres` without GPUs, no `--account` without an account).

The jobs share `launch.slurm_job`; training is `launch.submit_train`, curation
`launch.submit_curate`, sharding and evaluation are here.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from launch.slurm_job import (
    SubmitError,
    add_job_options,
    fit_request,
    follow_hint,
    job_values,
    quote_all,
    refuse_line_breaks,
    render,
    sbatch,
    split_passthrough,
    write_script,
)
from launch.submit_curate import submit_curate
from launch.submit_train import submit_train

EXAMPLES = """examples:
  umt submit train --config configs/pretrain_base.yaml --nodes 4 --gpus-per-node 8 \\
      --time 24:00:00 --partition gpu --account proj --chain 3
  umt submit train --config configs/demo_cpu.yaml --gpus-per-node 0 --tasks-per-node 2 \\
      --dry-run -- train.steps=50 output_dir=runs/try
  umt submit shard pairs.parquet --out shards/web --parts 16 --cpus-per-task 8 -- --maxcount 5000
  umt submit eval --model runs/x/checkpoints --shards coco-test/ --out runs/x/coco.json \\
      --gpus-per-node 1 -- --itm-rerank 256
  umt submit curate shards/cc --out subsets/cc --nodes 2 --tasks-per-node 4 \\
      --cpus-per-task 8 -- --dedup exact,near --decontaminate shards/coco_test"""


# --- shard --------------------------------------------------------------------------------------


def shard_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="umt submit shard",
        description="Shard a dataset as a Slurm job array (one part per array task) and queue "
        "the merge of the part manifests after it. Options after -- go to `umt shard` "
        "(e.g. -- --maxcount 5000 --image-size 256).",
    )
    parser.add_argument("input", help="the input of `umt shard` (table, JSON or folder)")
    parser.add_argument("--out", required=True, help="output folder for shards and manifest")
    parser.add_argument("--parts", type=int, required=True, help="array tasks (parts)")
    parser.add_argument("--max-parallel", type=int, help="array tasks running at once")
    add_job_options(parser)
    return parser


def submit_shard(argv: list[str]) -> int:
    own, shard_options = split_passthrough(argv)
    args = shard_parser().parse_args(own)
    refuse_line_breaks(args, shard_options)
    if args.parts < 1:
        raise SubmitError(f"--parts must be >= 1 (got {args.parts})")
    if "://" in args.out:  # an s3:// output: scripts and logs stay in the working folder
        out: Path | str = args.out.rstrip("/")
        name = out.rsplit("/", 1)[-1]
        folder = Path.cwd() / f"umt-shard-{name}" / "slurm"
    else:
        out = Path(args.out).resolve()
        name, folder = out.name, out / "slurm"
    # `umt shard` runs one worker per CPU it is given: 4 by default, fewer where nodes are smaller.
    cpus = fit_request(args, 4)
    values = job_values(args, f"umt-shard-{name}", folder / "logs", cpus)
    shard_args = [str(Path(args.input).resolve()), "--out", str(out), *shard_options]
    values |= {
        "parts": args.parts,
        "last_index": args.parts - 1,
        "throttle": f"%{args.max_parallel}" if args.max_parallel else "",
        "shard_args": quote_all(shard_args),
        "out": shlex.quote(str(out)),
    }
    array_text = render("shard_array.sbatch", values)
    merge_values = {**values, "job_name": f"{values['job_name']}-merge"}
    merge_text = render("shard_merge.sbatch", merge_values)
    if args.dry_run:
        print(array_text, end="")
        print("# ---- then, after every array task: ----")
        print(merge_text, end="")
        return 0
    array_script = write_script(folder, "shard_array.sbatch", array_text)
    merge_script = write_script(folder, "shard_merge.sbatch", merge_text)
    array_id = sbatch(array_script, args.sbatch_arg)
    merge_id = sbatch(merge_script, args.sbatch_arg, f"afterany:{array_id}")
    print(f"submitted shard array {array_id} ({args.parts} parts) and merge job {merge_id}")
    print(f"logs: {folder / 'logs'}; follow them: squeue -j {array_id},{merge_id}")
    return 0


# --- eval ---------------------------------------------------------------------------------------


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="umt submit eval",
        description="Retrieval evaluation of a checkpoint or export as a Slurm job (`umt eval`). "
        "Options after -- go to `umt eval` (e.g. --itm-rerank 256).",
    )
    parser.add_argument("--model", required=True, help="export folder, checkpoint root or step")
    parser.add_argument("--shards", required=True, help="evaluation shards")
    parser.add_argument("--out", required=True, help="the JSON report")
    parser.add_argument("--gpus-per-node", type=int, default=1, help="0: a CPU job")
    add_job_options(parser)
    return parser


def submit_eval(argv: list[str]) -> int:
    own, eval_options = split_passthrough(argv)
    args = eval_parser().parse_args(own)
    refuse_line_breaks(args, eval_options)
    report = Path(args.out).resolve()
    folder = report.parent / "slurm"
    cpus = fit_request(args, 8, gpus_per_node=args.gpus_per_node)
    values = job_values(args, f"umt-eval-{report.stem}", folder / "logs", cpus)
    model = args.model if "://" in args.model else str(Path(args.model).resolve())
    eval_args = ["--model", model, "--shards", args.shards, "--out", str(report), *eval_options]
    values |= {
        "gpus_per_node": args.gpus_per_node or None,
        "procs_per_node": args.gpus_per_node or 1,
        "eval_args": quote_all(eval_args),
    }
    text = render("eval.sbatch", values)
    if args.dry_run:
        print(text, end="")
        return 0
    script = write_script(folder, f"eval-{report.stem}.sbatch", text)
    job = sbatch(script, args.sbatch_arg)
    print(f"submitted eval job {job} ({script})")
    print(follow_hint(folder / "logs", values["job_name"], job))
    return 0


COMMANDS = {
    "train": submit_train,
    "shard": submit_shard,
    "eval": submit_eval,
    "curate": submit_curate,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: umt submit {{{','.join(COMMANDS)}}} [options]  (-h for each)\n\n{EXAMPLES}"
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage, file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except SubmitError as exc:
        print(f"umt submit {argv[0]}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
