"""Values that reach a rendered Slurm script (options, a shared YAML's output_dir) cannot run a
command in the job or end its #SBATCH block: line breaks are refused in one line naming the
option, #SBATCH values are checked, everything else is shell-quoted."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from launch import submit as submit_module
from tests.conftest import REPO

CONFIG = str(REPO / "configs" / "demo_cpu.yaml")


def submit(capsys, *argv: str) -> tuple[int, str, str]:
    code = submit_module.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "option, value",
    [
        ("--job-name", "x\ntouch /tmp/umt-pwned"),
        ("--partition", "p\n#SBATCH --requeue"),
        ("--account", "a\r"),
        ("--time", "1:00:00\nrm -rf ~"),
        ("--mem", "1G\n"),
        ("--nccl-socket-ifname", "eth0\ntouch /tmp/umt-pwned"),
        ("--env-setup", ". venv/bin/activate\ntouch /tmp/umt-pwned"),
    ],
)
def test_a_line_break_in_any_value_is_refused(capsys, option, value):
    code, out, err = submit(
        capsys, "train", "--config", CONFIG, "--gpus-per-node=0", f"{option}={value}", "--dry-run"
    )
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "line break" in err and option in err


def test_a_line_break_in_a_shared_yamls_output_dir_is_refused(capsys, tmp_path):
    code, out, err = submit(
        capsys, "train", "--config", CONFIG, "--gpus-per-node=0", "--dry-run", "--",
        f"output_dir={tmp_path}/run\ntouch /tmp/umt-pwned",
    )  # fmt: skip
    assert code == 2 and out == "" and "line break" in err


@pytest.mark.parametrize(
    "option, value",
    [("--job-name", "x;touch M"), ("--partition", "$(touch M)"), ("--time", "`touch M`")],
)
@pytest.mark.slow
def test_sbatch_lines_take_only_plain_values(capsys, option, value):
    code, _, err = submit(
        capsys, "train", "--config", CONFIG, "--gpus-per-node=0", f"{option}={value}", "--dry-run"
    )
    assert code == 2 and "cannot go into an #SBATCH line" in err and option in err


def fake_slurm_tools(folder: Path) -> Path:
    """srun, sbatch and scontrol that print what they were asked and do nothing."""
    folder.mkdir()
    for tool in ("srun", "sbatch", "scontrol"):
        path = folder / tool
        path.write_text('#!/bin/bash\necho "FAKE ' + tool + ' $*"\n')
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return folder


@pytest.mark.slow
def test_hostile_values_that_pass_run_no_command_in_the_job(capsys, tmp_path):
    marker = tmp_path / "PWNED"
    hostile = f"eth0;touch {marker};$(touch {marker})"
    code, script, err = submit(
        capsys, "train", "--config", CONFIG, "--gpus-per-node=0", "--tasks-per-node=2",
        f"--nccl-socket-ifname={hostile}", "--dry-run", "--",
        f"output_dir={tmp_path / 'run'}", f"data.tokenizer=tok;touch {marker}",
    )  # fmt: skip
    assert code == 0, err
    path = tmp_path / "train.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    tools = fake_slurm_tools(tmp_path / "bin")
    env = {
        **os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1", "SLURM_CPUS_PER_TASK": "1",
    }  # fmt: skip
    proc = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "FAKE srun" in proc.stdout and not marker.exists()
    assert f"NCCL_SOCKET_IFNAME={hostile}" not in script  # quoted, never bare
