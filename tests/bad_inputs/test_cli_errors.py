"""Careless input to `umt shard`, `umt train` and `umt eval`: one line naming the flag, key, file
or URL, exit 2 (usage) or 1 (runtime), no traceback, before any expensive set-up, partial outputs
cleaned; `--debug` / UMT_DEBUG=1 shows the traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch import cli
from launch import evaluate as eval_cli
from launch import shard as shard_cli
from launch import train as train_cli
from tests.conftest import REPO
from tests.data_pipeline.test_shard import good_dataset, output_files

TINY = [
    "model.preset=tiny", "model.text.vocab_size=512", "data.train.max_text_len=12",
    "train.micro_batch_size=4", "train.steps=1",
]  # fmt: skip


def only_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Real shards of the built-in dataset, their tokenizer, a one-step checkpoint and its export."""
    from data_pipeline.builtin import write_split, write_tokenizer
    from data_pipeline.shard import ShardOptions, shard_dataset

    root = tmp_path_factory.mktemp("cli_errors")
    table = write_split(root / "data", "train", 24, 32)
    options = ShardOptions(image_col="image", caption_col="captions", resize="none", maxcount=12)
    shard_dataset(table, root / "shards", options)
    tokenizer = write_tokenizer(root / "tokenizer")
    run = root / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    common = [f"data.train.shards={root / 'shards'}", f"data.tokenizer={tokenizer}"]
    subprocess.run(
        [sys.executable, "-m", "launch.cli", "train", f"output_dir={run}", *TINY, *common,
         "model.image.image_size=32", "data.train.num_workers=0"],
        cwd=REPO, env=env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "launch.cli", "export", str(run / "checkpoints"), str(root / "exp")],
        cwd=REPO, env=env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return {
        "table": table,
        "shards": root / "shards",
        "tokenizer": tokenizer,
        "checkpoint": run / "checkpoints",
        "export": root / "exp",
    }


# --- umt shard ----------------------------------------------------------------------------------


def test_shard_out_that_is_a_file_or_under_one(tmp_path: Path, capsys) -> None:
    table = good_dataset(tmp_path / "in", n=2)
    afile = tmp_path / "afile"
    afile.write_text("")
    assert shard_cli.main([str(table), "--out", str(afile)]) == 2
    assert only_line(capsys.readouterr().err) == (
        f"umt shard: error: --out {afile}: a file is there, not a folder"
    )
    assert shard_cli.main([str(table), "--out", str(afile / "sub")]) == 2
    assert only_line(capsys.readouterr().err) == (
        f"umt shard: error: --out {afile / 'sub'}: cannot write there ({afile} is a file, not a "
        "folder)"
    )


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 64 KiB file system (tmpfs): needs root and mount, which CI has."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_shard_on_a_full_disk_fails_in_one_line_then_resumes(tmp_path, small_disk, capsys):
    table = good_dataset(tmp_path / "in", n=40)
    args = [str(table), "--image-size", "64", "--maxcount", "4", "--no-progress"]
    out = small_disk / "out"
    assert shard_cli.main([*args, "--out", str(out)]) == 1
    line = only_line(capsys.readouterr().err)
    assert line.startswith(f"umt shard: error: {out}") and "No space left on device" in line
    assert line.endswith("run the same command again to resume")
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no partial files
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    assert shard_cli.main([*args, "--out", str(out)]) == 0
    assert "already done" in capsys.readouterr().out  # what was finished was kept
    assert shard_cli.main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert output_files(out) == output_files(tmp_path / "whole")


# --- umt train ----------------------------------------------------------------------------------


def train_error(tmp_path: Path, capsys, *overrides: str, config: str | None = None) -> str:
    out = tmp_path / "run"
    argv = ([f"--config={config}"] if config else []) + [f"output_dir={out}", *TINY, *overrides]
    assert train_cli.main(argv) == 2
    assert not out.exists()  # failed before the model, DeepSpeed or any output
    return only_line(capsys.readouterr().err)


@pytest.mark.slow
def test_train_shards_that_are_not_tars_or_not_there(tmp_path, capsys, data) -> None:
    common = (f"data.tokenizer={data['tokenizer']}",)
    line = train_error(tmp_path, capsys, *common, f"data.train.shards={data['table']}")
    assert line == (
        f"umt train: data.train.shards: {data['table']} is not a readable tar: invalid header"
    )
    line = train_error(tmp_path, capsys, *common, f"data.train.shards={tmp_path / 'nope'}")
    assert line.startswith(f"umt train: data.train.shards: 1 of 1 shards of '{tmp_path / 'nope'}'")


def test_train_tokenizer_folder_missing_or_empty(tmp_path, capsys, data) -> None:
    common = (f"data.train.shards={data['shards']}",)
    line = train_error(tmp_path, capsys, *common, f"data.tokenizer={tmp_path / 'none'}")
    assert line == (
        f"umt train: data.tokenizer: {tmp_path / 'none'} is not a folder "
        "(a tokenizer folder or a Hub name)"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    line = train_error(tmp_path, capsys, *common, f"data.tokenizer={empty}")
    assert line.startswith(f"umt train: data.tokenizer: {empty} holds no tokenizer")


def test_train_crop_scale_out_of_range_names_the_override(tmp_path, capsys) -> None:
    line = train_error(tmp_path, capsys, "data.train.synthetic=true", "data.train.crop_scale=[2,1]")
    assert line == (
        "umt train: data.train.crop_scale must be [low, high] with 0 < low <= high <= 1 "
        "(got [2, 1]) (override 'data.train.crop_scale=[2,1]')"
    )


def test_override_errors_blame_the_override_and_file_errors_the_file(tmp_path, capsys) -> None:
    config = tmp_path / "shared.yaml"
    config.write_text("train:\n  lr: -1.0\n")
    line = train_error(
        tmp_path, capsys, "data.train.synthetic=true", "train.steps=abc", config=str(config)
    )
    assert line == "umt train: train.steps must be int (got 'abc') (override 'train.steps=abc')"
    line = train_error(tmp_path, capsys, "data.train.synthetic=true", config=str(config))
    assert line == f"umt train: train.lr must be > 0 (got -1.0) in {config}"


def test_train_negatives_field_that_no_sample_has(tmp_path, capsys, data) -> None:
    line = train_error(
        tmp_path,
        capsys,
        f"data.train.shards={data['shards']}",
        f"data.tokenizer={data['tokenizer']}",
        "data.train.negatives=hard_negatives",
    )
    assert line.startswith(
        "umt train: data.train.negatives: no json field 'hard_negatives' in the first 12 samples "
        f"of {data['shards'] / 'data-000000.tar'} (their fields: caption, captions,"
    )
    assert line.endswith("shard with --save-additional-columns hard_negatives")


# --- umt eval -----------------------------------------------------------------------------------


def eval_error(capsys, *argv: str, code: int) -> str:
    assert eval_cli.main(list(argv)) == code
    return only_line(capsys.readouterr().err)


def test_eval_flags_naming_nothing_usable(tmp_path, capsys, data) -> None:
    model, shards = str(data["export"]), str(data["shards"])
    assert eval_error(capsys, "--model", model, "--shards", "/nope", code=2) == (
        "umt eval: --shards /nope: 1 of 1 shards of '/nope' do not exist (first: /nope)"
    )
    missing = tmp_path / "missing.txt"
    assert eval_error(
        capsys, "--model", model, "--shards", shards, "--classes", str(missing), code=2
    ) == (f"umt eval: --classes {missing}: no such file (one class name per line)")
    assert eval_error(capsys, "--model", str(tmp_path / "gone"), "--shards", shards, code=2) == (
        f"umt eval: --model {tmp_path / 'gone'}: no such file or folder"
    )
    neither = tmp_path / "neither"
    neither.mkdir()
    line = eval_error(capsys, "--model", str(neither), "--shards", shards, code=1)
    assert line == (
        f"umt eval: --model {neither}: the folder is empty: not an export, or a run, checkpoint "
        "or step folder"
    )  # and not about --resume, which eval has not


def test_eval_truncated_export_names_the_file(tmp_path, capsys, data) -> None:
    export = tmp_path / "exp"
    shutil.copytree(data["export"], export)
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = eval_error(capsys, "--model", str(export), "--shards", str(data["shards"]), code=1)
    assert line.startswith(f"umt eval: {weights}: not a readable safetensors file")


def test_eval_from_a_checkpoint_still_works(tmp_path, data) -> None:
    """The checks above refuse nothing usable: the same flags with good values evaluate."""
    report = tmp_path / "report.json"
    argv = [
        "--model",
        str(data["checkpoint"]),
        "--shards",
        str(data["shards"]),
        "--out",
        str(report),
    ]
    assert eval_cli.main(argv) == 0 and report.is_file()


# --- the last line of defence -------------------------------------------------------------------


def test_an_unexpected_error_is_one_line_unless_debug(monkeypatch, capsys) -> None:
    def broken(argv):
        raise KeyError("a bug")

    monkeypatch.delenv("UMT_DEBUG", raising=False)
    assert cli.run_guarded("umt x", broken, []) == 1
    assert only_line(capsys.readouterr().err) == (
        "umt x: error: KeyError: 'a bug' [unexpected: run again with --debug (or UMT_DEBUG=1) "
        "for the traceback]"
    )
    monkeypatch.setenv("UMT_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.run_guarded("umt x", broken, [])
