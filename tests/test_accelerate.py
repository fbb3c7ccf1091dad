"""`accelerate launch` as a launcher of `umt train`: a user's accelerate config file starts the
same ranks torchrun starts, the run is the same to the bit, and a config file that asks for
what UMT would silently not do is refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from tests.test_train import TINY, assert_same_weights, consolidated, scalars, train

pytestmark = pytest.mark.slow
STEPS = ["train.steps=4", "checkpoint.every_steps=4", "zero.stage=2"]


def accelerate_config(path: Path, **settings) -> Path:
    values = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",
        "num_machines": 1,
        "num_processes": 2,
        "machine_rank": 0,
        "main_process_port": free_port(),
        "mixed_precision": "'no'",
        **settings,
    }
    path.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    return path


def accelerate_train(config: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "-m", "launch.train", f"output_dir={out}", *TINY, *STEPS, *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("UMT_DEBUG", None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_accelerate_launch_with_a_config_file_trains_as_torchrun_does(tmp_path):
    proc = accelerate_train(accelerate_config(tmp_path / "acc.yaml"), tmp_path / "acc")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "started by accelerate launch (mixed_precision=no)" in proc.stdout + proc.stderr
    train(tmp_path / "torchrun", *STEPS)
    assert_same_weights(
        consolidated(tmp_path / "acc", "step4"), consolidated(tmp_path / "torchrun", "step4")
    )
    assert scalars(tmp_path / "acc", "loss/total") == scalars(tmp_path / "torchrun", "loss/total")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"mixed_precision": "bf16"},
            "accelerate's mixed_precision=bf16 differs from train.precision=fp32",
        ),
        ({"distributed_type": "FSDP"}, "the accelerate config asks for FSDP"),
    ],
)
def test_an_accelerate_config_that_asks_for_what_umt_would_not_do_is_refused(
    tmp_path, settings, message
):
    proc = accelerate_train(accelerate_config(tmp_path / "acc.yaml", **settings), tmp_path / "r")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("umt train:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-3000:]
    assert not (tmp_path / "r" / "checkpoints").exists()
