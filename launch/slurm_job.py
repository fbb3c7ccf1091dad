"""What every `umt submit` job shares: rendering a `slurm/*.sbatch` template (every value checked
or shell-quoted, so no value a user or a shared YAML gives becomes a command), the job options
(partition, account, time, CPUs, memory, environment), what the partition can give, and sbatch.
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


def follow_hint(log_dir: Path, job_name: object, job_id: str) -> str:
    """Where a job's output goes (the templates' `%x-%j.out`) and how to watch it."""
    log = log_dir / f"{job_name}-{job_id}.out"
    return f"log: {log}\nfollow it: squeue -j {job_id}; tail -F {log}"
