"""`umt submit train|shard|eval|curate`: render a `slurm/*.sbatch` template from options (and, for
training, the config), write it into the run's folder and `sbatch` it.

Every value a user fills in comes from an option here, never from editing a script: partition,
account, time, nodes, GPUs, CPUs, memory and how the job activates its Python environment
(default: the virtual environment of the Python running `umt submit`). `--dry-run` prints the
script and submits nothing. A template line whose value is not given is left out (no
`--gres` without GPUs, no `--account` without an account).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from umt.shipped import slurm_dir

SLURM_DIR = slurm_dir()  # the repository's slurm/, or the copy a wheel installs
ENV_SETUP = "env_setup.sh"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")

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


class SubmitError(RuntimeError):
    """A submission that cannot be rendered or queued; the message says what to change."""


# --- rendering ----------------------------------------------------------------------------------


def default_env_setup() -> tuple[str, str]:
    """(activation line, python) for the job: this interpreter's virtual environment, if any."""
    python = sys.executable
    if sys.prefix != sys.base_prefix:  # a venv: activate it so `umt`, torchrun... are on PATH
        return f". {shlex.quote(str(Path(sys.prefix) / 'bin' / 'activate'))}", shlex.quote(python)
    return "", shlex.quote(python)


def env_setup_values(env_setup: str | None) -> dict[str, str]:
    """`--env-setup`: a file to source, or shell commands; the job then runs `python` from PATH."""
    if env_setup is None:
        activate, python = default_env_setup()
    elif Path(env_setup).is_file():
        activate, python = f". {shlex.quote(str(Path(env_setup).resolve()))}", "python"
    else:
        activate, python = env_setup, "python"
    return {"activate": activate, "python": python}


# How each placeholder may be filled (a value a user or a shared YAML gives must not become a
# command in the job, nor end the #SBATCH block early).
INTEGER_FIELDS = {
    "nodes", "tasks_per_node", "procs_per_node", "gpus_per_node", "cpus_per_task", "signal_s",
    "parts", "last_index", "requeue_limit",
}  # fmt: skip
QUOTED_FIELDS = {
    "train_args",
    "accelerate_args",
    "shard_args",
    "eval_args",
    "curate_args",
    "out",
    "run_dir",
    "python",
}  # shlex-quoted here
SHELL_FIELDS = {"activate"}  # --env-setup: the user's own shell commands, on purpose
SBATCH_VALUE = re.compile(r"^[A-Za-z0-9_.,:=@%/+\-\[\]]*$")
OPTION_OF = {
    "job_name": "--job-name", "partition": "--partition", "account": "--account",
    "time": "--time", "mem": "--mem", "workdir": "the working folder",
    "log_dir": "the log folder (from output_dir or --out)", "socket_ifname": "--nccl-socket-ifname",
    "throttle": "--max-parallel", "launcher": "--launcher", "activate": "--env-setup",
}  # fmt: skip


def safe_value(name: str, value: object, sbatch_line: bool) -> str:
    """The text that replaces {{name}}: checked or shell-quoted, so no value runs as a command."""
    text = str(value)
    option = OPTION_OF.get(name, name)
    if any(c in text for c in "\n\r\0"):
        raise SubmitError(
            f"{option}: a value with a line break cannot go into a job script ({text!r})"
        )
    if name in INTEGER_FIELDS:
        if not text.lstrip("-").isdigit():
            raise SubmitError(f"{option}: must be a whole number (got {text!r})")
        return text
    if sbatch_line:
        if not SBATCH_VALUE.match(text):
            raise SubmitError(
                f"{option}: {text!r} cannot go into an #SBATCH line (letters, digits and "
                ". , : = @ % / + - [ ] only)"
            )
        return text
    if name in QUOTED_FIELDS or name in SHELL_FIELDS:
        return text
    return shlex.quote(text)


def refuse_line_breaks(args: argparse.Namespace, extra: list[str] = ()) -> None:
    """Before anything else: no option value (nor override, nor passed-through argument) may hold
    a line break, which would start a new command or end the #SBATCH block in the job script."""
    for name, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and any(c in item for c in "\n\r\0"):
                option = "override" if name == "overrides" else f"--{name.replace('_', '-')}"
                raise SubmitError(
                    f"{option}: a value with a line break cannot go into a job script ({item!r})"
                )
    for item in extra:
        if any(c in item for c in "\n\r\0"):
            raise SubmitError(f"argument {item!r}: a line break cannot go into a job script")


def render(template: str, values: dict[str, object]) -> str:
    """`slurm/<template>` with `{{env_setup}}` inlined and every `{{name}}` replaced.

    A line with a placeholder whose value is None is dropped (an option not given); every
    placeholder must have a value, so a template and this module cannot drift apart silently.
    Values are checked or quoted (`safe_value`): none can add a command or an #SBATCH line.
    """
    text = (SLURM_DIR / template).read_text()
    text = text.replace("{{env_setup}}\n", (SLURM_DIR / ENV_SETUP).read_text())
    lines = []
    for line in text.splitlines(keepends=True):
        names = PLACEHOLDER.findall(line)
        unknown = sorted(set(names) - set(values))
        if unknown:
            raise SubmitError(f"slurm/{template} uses {unknown}, which umt submit does not fill")
        if any(values[name] is None for name in names):
            continue
        sbatch = line.startswith("#SBATCH")
        lines.append(
            PLACEHOLDER.sub(
                lambda m, sbatch=sbatch: safe_value(m.group(1), values[m.group(1)], sbatch), line
            )
        )
    return "".join(lines)


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """(options of umt submit, arguments after `--` for the command the job runs)."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def quote_all(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


# --- options shared by every job ----------------------------------------------------------------


def add_job_options(parser: argparse.ArgumentParser) -> None:
    job = parser.add_argument_group("Slurm job")
    job.add_argument("--partition", help="partition (default: the cluster's default)")
    job.add_argument("--account", help="account to charge")
    job.add_argument("--time", help="time limit, e.g. 24:00:00 (default: the partition's)")
    job.add_argument("--mem", help="memory per node, e.g. 200G (default: the partition's)")
    job.add_argument(
        "--cpus-per-task",
        type=int,
        help="CPUs per task (default: train, data.train.num_workers + 2 per rank; shard and "
        "curate 4; eval 8; capped to fit the partition's nodes)",
    )
    job.add_argument("--job-name", help="job name (default: umt-<what>-<folder name>)")
    job.add_argument(
        "--env-setup",
        help="a file to source or shell commands that activate the environment in the job "
        "(e.g. 'module load cuda/12.4; . ~/venvs/umt/bin/activate'); "
        "default: this Python's virtual environment",
    )
    job.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra sbatch option, repeatable (e.g. --sbatch-arg=--qos=high)",
    )
    job.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")


def job_values(
    args: argparse.Namespace, name: str, log_dir: Path, cpus_per_task: int | None = None
) -> dict[str, object]:
    return {
        "job_name": args.job_name or name,
        "partition": args.partition,
        "account": args.account,
        "time": args.time,
        "mem": args.mem,
        "cpus_per_task": cpus_per_task or args.cpus_per_task,
        "workdir": str(Path.cwd()),  # an #SBATCH line: no shell quoting
        "log_dir": str(log_dir),
        **env_setup_values(args.env_setup),
    }


# --- what the partition can give ---------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    name: str
    cpus_per_node: int  # the smallest node's
    gpus_per_node: int  # the smallest node's (0: no GPU gres)
    nodes: int


def partition_info(name: str | None) -> tuple[Partition | None, str | None]:
    """(the partition a job would run in: `name` or the cluster's default, a problem) from sinfo;
    (None, None) where sinfo cannot be asked (a laptop rendering a dry run)."""
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-o", "%P|%c|%G|%D"], capture_output=True, text=True, timeout=30
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None, None
    if proc.returncode != 0:
        return None, None
    found: dict[str, list[tuple[int, int, int]]] = {}
    default = None
    for line in proc.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 4:
            continue
        pname, cpus, gres, nodes = fields
        if pname.endswith("*"):
            pname = default = pname[:-1]
        gpus = sum(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))
        found.setdefault(pname, []).append(
            (int(re.sub(r"\D.*", "", cpus) or 0), gpus, int(nodes or 0))
        )
    wanted = name or default
    if wanted is None:
        return None, "the cluster has no default partition: pass --partition"
    if wanted not in found:
        return None, f"partition {wanted} does not exist (sinfo lists: {', '.join(sorted(found))})"
    rows = found[wanted]
    return (
        Partition(
            wanted, min(r[0] for r in rows), min(r[1] for r in rows), sum(r[2] for r in rows)
        ),
        None,
    )


def request_problems(
    part: Partition, nodes: int, tasks_per_node: int, cpus_per_task: int, gpus_per_node: int
) -> list[str]:
    """What in a request the partition can never give (the job would pend forever, silently)."""
    problems = []
    if nodes > part.nodes:
        problems.append(f"--nodes {nodes}: partition {part.name} has {part.nodes} node(s)")
    if gpus_per_node > part.gpus_per_node:
        have = f"{part.gpus_per_node} GPU(s) per node" if part.gpus_per_node else "no GPUs"
        problems.append(
            f"--gpus-per-node {gpus_per_node}: partition {part.name} has {have}"
            + ("; use --gpus-per-node 0 for a CPU job" if not part.gpus_per_node else "")
        )
    if tasks_per_node * cpus_per_task > part.cpus_per_node:
        problems.append(
            f"{tasks_per_node} task(s) per node x --cpus-per-task {cpus_per_task} = "
            f"{tasks_per_node * cpus_per_task} CPUs: partition {part.name}'s nodes have "
            f"{part.cpus_per_node}"
        )
    return problems


def fit_request(
    args: argparse.Namespace,
    wanted_cpus: int,
    nodes: int = 1,
    tasks_per_node: int = 1,
    gpus_per_node: int = 0,
) -> int:
    """CPUs per task for the job: `--cpus-per-task`, else `wanted_cpus` capped by the partition's
    nodes. A request the partition can never run is refused (a dry run only warns)."""
    part, problem = partition_info(args.partition)
    cpus, note = args.cpus_per_task or wanted_cpus, None
    if part is not None and not args.cpus_per_task:
        fitting = max(1, part.cpus_per_node // max(1, tasks_per_node))
        if cpus > fitting:
            note = (
                f"umt submit: {cpus} CPUs per task wanted, {fitting} fit partition {part.name}'s "
                f"{part.cpus_per_node}-CPU nodes with {tasks_per_node} task(s) each: asking for that"
            )
            cpus = fitting
    problems = [problem] if problem else []
    if part is not None:
        problems += request_problems(part, nodes, tasks_per_node, cpus, gpus_per_node)
    if problems and not args.dry_run:
        raise SubmitError("this job could never start: " + "; ".join(problems))
    for line in ([note] if note else []) + [f"umt submit: warning: {p}" for p in problems]:
        print(line, file=sys.stderr)
    return cpus


def sbatch(script: Path, extra: list[str], dependency: str | None = None) -> str:
    """Queue `script`; returns the job id."""
    cmd = ["sbatch", "--parsable", *extra]
    if dependency:
        cmd.append(f"--dependency={dependency}")
    cmd.append(str(script))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise SubmitError("sbatch not found: run this on a Slurm login node") from None
    if proc.returncode != 0:
        raise SubmitError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]  # "id" or "id;cluster"


def write_script(folder: Path, name: str, text: str) -> Path:
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)
    return path


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
    add_job_options(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides key.path=value (after --)")
    return parser


def submit_train(argv: list[str]) -> int:
    own, passthrough = split_passthrough(argv)
    args = train_parser().parse_args(own)
    args.overrides += passthrough
    refuse_line_breaks(args)
    from umt.config import ConfigError, load_config

    try:  # validate now: a config error should not wait in the queue
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise SubmitError(str(exc)) from None
    if args.nodes < 1 or args.gpus_per_node < 0 or args.chain < 1:
        raise SubmitError("--nodes and --chain must be >= 1 and --gpus-per-node >= 0")
    procs = args.tasks_per_node or args.gpus_per_node or 1
    accelerate_args = accelerate_launch_args(args, cfg)
    torchrun = args.launcher in ("torchrun", "accelerate")  # a launcher task per node
    # Each rank feeds its GPU from data.train.num_workers loader processes, plus its own; with
    # torchrun one task holds every rank of the node.
    wanted = (cfg.data.train.num_workers + 2) * (procs if torchrun else 1)
    cpus = fit_request(args, wanted, args.nodes, 1 if torchrun else procs, args.gpus_per_node)
    out = Path(cfg.output_dir).resolve()
    folder = out / "slurm"
    train_args = ["--config", job_config(args.config)] if args.config else []
    train_args += list(args.overrides)
    values = job_values(args, f"umt-train-{out.name}", folder / "logs", cpus)
    values |= {
        "nodes": args.nodes,
        "tasks_per_node": 1 if torchrun else procs,
        "procs_per_node": procs,
        "gpus_per_node": args.gpus_per_node or None,
        "signal_s": args.signal_s,
        "socket_ifname": args.nccl_socket_ifname,
        "launcher": args.launcher,
        "train_args": quote_all(train_args),
        "accelerate_args": quote_all(accelerate_args),
        "run_dir": shlex.quote(str(out)),
        "requeue_limit": cfg.train.requeue_limit,
    }
    text = render("train.sbatch", values)
    problem = job_input_problem(cfg)
    if args.dry_run:
        if problem:
            print(
                f"umt submit: warning: the job would stop at its start: {problem}", file=sys.stderr
            )
        print(text, end="")
        return 0
    if problem:
        raise SubmitError(f"the job would stop at its start: {problem}")
    script = write_script(folder, "train.sbatch", text)
    previous: str | None = None
    for _ in range(args.chain):
        dependency = f"afterany:{previous}" if previous else None
        previous = sbatch(script, args.sbatch_arg, dependency)
        print(f"submitted training job {previous} ({script})")
    print(follow_hint(folder / "logs", values["job_name"], previous))
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
        raise SubmitError("--accelerate-config goes with --launcher accelerate")
    import yaml

    from umt.config import ConfigError
    from umt.preflight import check_accelerate_settings

    path = Path(args.accelerate_config).resolve()
    try:
        settings = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SubmitError(f"--accelerate-config {path}: cannot read it ({exc})") from None
    if not isinstance(settings, dict):
        raise SubmitError(f"--accelerate-config {path}: not an accelerate config (a mapping)")
    kind = str(settings.get("distributed_type", "MULTI_GPU"))
    if kind not in ("MULTI_GPU", "NO", "MULTI_CPU"):
        raise SubmitError(
            f"--accelerate-config {path}: distributed_type {kind}: UMT runs its own DeepSpeed "
            "ZeRO (zero.stage); use distributed_type: MULTI_GPU"
        )
    precision = settings.get("mixed_precision", "no")
    env = {"ACCELERATE_MIXED_PRECISION": "no" if precision is False else str(precision)}
    try:
        check_accelerate_settings(cfg, env, cuda=args.gpus_per_node > 0)
    except ConfigError as exc:
        raise SubmitError(f"--accelerate-config {path}: {exc}") from None
    return ["--config_file", str(path)]


def follow_hint(log_dir: Path, job_name: object, job_id: str) -> str:
    """Where a job's output goes (the templates' `%x-%j.out`) and how to watch it."""
    log = log_dir / f"{job_name}-{job_id}.out"
    return f"log: {log}\nfollow it: squeue -j {job_id}; tail -F {log}"


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


def submit_curate(argv: list[str]) -> int:
    from launch.submit_curate import submit_curate as submit  # its own module: this one is full

    return submit(argv)


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
