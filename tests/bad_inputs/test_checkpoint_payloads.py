"""Checkpoints someone hands you: a file of one that would run code when unpickled is refused
with one line naming it, by `umt train --resume` (also across a world-size change), `umt export`
and `umt eval`, and its payload never runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_torchrun
from tests.shard_writer import write_color_shards

pytestmark = pytest.mark.slow
TRAIN = REPO / "launch" / "train.py"
TINY = [
    "model.preset=tiny", "model.text.vocab_size=512", "data.train.synthetic=true",
    "data.train.max_text_len=12", "train.micro_batch_size=4", "train.warmup_steps=1",
]  # fmt: skip


class Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    run_torchrun(TRAIN, f"output_dir={out}", *TINY, "train.steps=1", nproc=1)
    return out


def poisoned(clean_run: Path, tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A copy of the clean run's checkpoints with file `name` of step1 replaced by a payload."""
    root = tmp_path / "checkpoints"
    shutil.copytree(clean_run / "checkpoints", root)
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"state": Payload(marker), "tensor": torch.zeros(2)}, root / "step1" / name)
    return root, marker


def one_line(stderr: str, prefix: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


FILES = ["rank0.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]


@pytest.mark.parametrize("name", FILES)
def test_resume_refuses_a_file_that_would_run_code(clean_run, tmp_path, name):
    root, marker = poisoned(clean_run, tmp_path, name)
    proc = run_torchrun(
        TRAIN, "--resume", str(root), f"output_dir={tmp_path / 'run'}", *TINY, "train.steps=2",
        nproc=1, check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and not marker.exists()
    line = one_line(proc.stderr, "umt train:")
    assert str(root / "step1" / name) in line and "refused to load" in line


@pytest.mark.parametrize("name", FILES[1:])
def test_export_and_eval_refuse_a_file_that_would_run_code(clean_run, tmp_path, name):
    root, marker = poisoned(clean_run, tmp_path, name)
    shards = write_color_shards(tmp_path / "shards", n_images=4, per_shard=2)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for argv in (
        ["export", str(root), str(tmp_path / "export")],
        ["eval", "--model", str(root), "--shards", str(shards)],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "launch.cli", *argv], cwd=REPO, env=env,
            capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 1 and not marker.exists(), proc.stderr[-2000:]
        line = one_line(proc.stderr, f"umt {argv[0]}:")
        assert name in line and "refused to load" in line


def test_the_universal_conversion_refuses_a_file_that_would_run_code(clean_run, tmp_path):
    """Resuming on another number of ranks converts the checkpoint in a subprocess: it too
    loads weights-only."""
    root, marker = poisoned(clean_run, tmp_path, FILES[2])
    proc = run_torchrun(
        TRAIN, "--resume", str(root), f"output_dir={tmp_path / 'run'}", *TINY,
        "train.steps=2", "objectives.itm_weight=0", nproc=2, check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and not marker.exists()
    line = one_line(proc.stderr, "umt train:")
    assert FILES[2] in line and "refused to load" in line
