"""The daily jobs as a new user meets them: Ctrl-C saves, a run remembers its config (absolute
paths, resume from the run folder), exports carry their tokenizer and are readable by all,
evaluation that evaluates nothing fails, the help and the logs tell the truth."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow
TINY = [
    "model.preset=tiny", "model.text.vocab_size=512", "model.image.image_size=32",
    "data.train.max_text_len=12", "train.micro_batch_size=4", "train.warmup_steps=1",
    "data.train.num_workers=0", "log.every_steps=1",
]  # fmt: skip


def umt(*args: str, cwd: Path = REPO, env: dict | None = None, check: bool = True):
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("UMT_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, f"umt {args[0]} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working folder with shards (made --per image, with a `label` column) and a tokenizer,
    named by relative paths as a user would."""
    from data_pipeline.builtin import write_split, write_tokenizer
    from data_pipeline.shard import ShardOptions, shard_dataset

    root = tmp_path_factory.mktemp("daily")
    table = write_split(root / "data", "train", 24, 32)
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    for row in rows:  # a label column: the first word of the first caption's shape
        row["label"] = "circle" if "circle" in row["captions"][0] else "other"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = ShardOptions(
        image_col="image", caption_col="captions", resize="none", maxcount=12,
        save_additional_columns=("label",),
    )  # fmt: skip
    shard_dataset(table, root / "shards", options)
    write_tokenizer(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def trained(workdir: Path) -> Path:
    """A 2-step run started with relative paths from the working folder."""
    umt(
        "train", "output_dir=run", "data.train.shards=shards", "data.tokenizer=tokenizer",
        "train.steps=2", "train.warmup_steps=5", *TINY[:-3], "data.train.num_workers=0",
        cwd=workdir,
    )  # fmt: skip
    return workdir / "run"


def test_a_run_records_absolute_paths_and_exports_from_another_folder(workdir, trained, tmp_path):
    saved = yaml.safe_load((trained / "config.yaml").read_text())
    assert saved["output_dir"] == str(workdir / "run")
    assert saved["data"]["train"]["shards"] == str(workdir / "shards")
    assert saved["data"]["tokenizer"] == str(workdir / "tokenizer")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = umt("export", str(trained), "exp", cwd=elsewhere)  # the run folder names its checkpoint
    assert "Processing zero checkpoint" not in proc.stdout + proc.stderr  # DeepSpeed's prints
    export = elsewhere / "exp"
    manifest = json.loads((export / "umt_export.json").read_text())
    assert manifest["text"]["tokenizer"] == "." and (export / "tokenizer.json").is_file()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in export.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o644}, modes  # safetensors writes 0600


def test_an_export_whose_tokenizer_is_gone_is_an_error(workdir, trained, tmp_path):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained), str(run)], check=True)
    config = json.loads((run / "checkpoints" / "step2" / "umt_meta.json").read_text())
    config["config"]["data"]["tokenizer"] = str(tmp_path / "deleted_tokenizer")
    (run / "checkpoints" / "step2" / "umt_meta.json").write_text(json.dumps(config))
    proc = umt("export", str(run / "checkpoints"), str(tmp_path / "exp"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot load the tokenizer its config names" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "exp").exists()  # refused before writing anything


def test_warmup_longer_than_the_run_is_clamped_with_one_line_and_a_summary_ends_it(
    trained, tmp_path
):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained), str(run)], check=True)
    # Resumes with the saved config: warmup 5 > 3 steps.
    proc = umt("train", "--resume", str(run), "train.steps=3", cwd=tmp_path)
    assert "total_num_steps" not in proc.stderr  # DeepSpeed's warning on every start and resume
    for noise in ("Setting accelerator to CPU", "before it has started"):  # DeepSpeed's, too
        assert noise not in proc.stdout + proc.stderr
    assert "train.warmup_steps 5 > train.steps 3: warming up over the 3 steps" in proc.stderr
    assert "done: steps 3-3, 4 samples" in proc.stderr
    assert f"export:     umt export {run / 'checkpoints'}" in proc.stderr


def test_resume_from_the_run_folder_uses_its_saved_config(workdir, trained, tmp_path):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained), str(run)], check=True)
    versions = json.loads((run / "versions.json").read_text())
    assert set(versions) == {"umt", "torch", "deepspeed", "transformers", "git_commit"}
    (run / "versions.json").write_text(json.dumps({**versions, "torch": "0.0"}))
    # From another folder, with no --config and none of the first run's overrides:
    proc = umt("train", "--resume", str(run), "train.steps=4", cwd=tmp_path)
    assert (
        f"resuming with other versions than the run's last start: torch 0.0 -> {versions['torch']}"
        in proc.stderr
    )
    assert f"resuming {run} with its saved config {run / 'config.yaml'}" in proc.stderr
    assert "overrides on top: train.steps=4" in proc.stderr
    assert (run / "checkpoints" / "step4").is_dir()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["preset"] == "tiny" and saved["output_dir"] == str(run)
    # --resume auto with the run's output_dir finds the same saved config:
    proc = umt("train", "--resume", "auto", f"output_dir={run}", "train.steps=5", cwd=tmp_path)
    assert (run / "checkpoints" / "step5").is_dir()
    # A change that makes another run is refused, naming the keys:
    proc = umt(
        "train", "--resume", str(run), "model.text.num_layers=3", "train.seed=7",
        "model.text.dropout=0.1", "train.steps=6",
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"umt train: this config would change the run in {run}")
    assert "model.text.num_layers (2 -> 3)" in line and "train.seed (0 -> 7)" in line
    assert "dropout" not in line  # not a change of the run
    assert not (run / "checkpoints" / "step6").exists()


def interrupt(command: list[str], cwd: Path, after: str, group: bool = False, env=None):
    """Start `command`; once a line of its stderr holds `after`, send one SIGINT: to the process
    (a launcher), or with `group` to its whole process group, as a terminal's Ctrl-C does.
    Returns (exit code, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("UMT_DEBUG", None)
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    lines = []
    for line in proc.stderr:  # the run says when its loop (and its handlers) are in place
        lines.append(line)
        if after in line:
            (os.killpg if group else os.kill)(proc.pid, signal.SIGINT)
            break
    _, rest = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + rest


def assert_stopped_cleanly(rc: int, stderr: str, out: Path) -> None:
    """Exit 0, no traceback, one Ctrl-C message per process that owns one, and the checkpoint
    saved at the step the log names."""
    assert rc == 0, stderr[-4000:]
    assert "Traceback" not in stderr and "SignalException" not in stderr, stderr[-4000:]
    said = [line for line in stderr.splitlines() if "umt.train: Ctrl-C:" in line]
    assert len(said) == 1, said  # rank 0's, and no loader worker's
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert f"stopping at step {latest.removeprefix('step')} after a signal" in stderr
    assert (
        "stopped early, of 100000" in stderr and f"go on:      umt train --resume {out}" in stderr
    )


def test_ctrl_c_in_a_terminal_saves_a_checkpoint_and_exits_0(workdir, tmp_path):
    """One process with loader workers: the terminal's SIGINT reaches the workers too, which
    must leave it to the trainer (one of them once said "saving after step 1")."""
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "launch.cli", "train", f"output_dir={out}", *TINY[:-2],
        f"data.train.shards={workdir / 'shards'}", f"data.tokenizer={workdir / 'tokenizer'}",
        "data.train.num_workers=2", "train.steps=100000", "checkpoint.every_steps=0",
    ]  # fmt: skip
    rc, stderr = interrupt(command, tmp_path, "training steps 1-100000", group=True)
    assert_stopped_cleanly(rc, stderr, out)


def accelerate_file(path: Path) -> Path:
    from tests.conftest import free_port

    path.write_text(
        "distributed_type: MULTI_GPU\nnum_machines: 1\nnum_processes: 2\nmachine_rank: 0\n"
        f"main_process_port: {free_port()}\nmixed_precision: 'no'\n"
    )
    return path


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_ctrl_c_to_the_launcher_saves_a_checkpoint_and_exits_0(tmp_path, launcher):
    """torchrun (`umt train --nproc-per-node`) and `accelerate launch` (launch.accelerate_launch)
    pass the SIGINT on to their ranks and end as the ranks do: no torchrun traceback, exit 0.
    Rank 1 starts late: the Ctrl-C comes as soon as rank 0 says that Ctrl-C saves, which must
    then hold for rank 1 too (on a loaded machine it once died of the KeyboardInterrupt)."""
    out = tmp_path / "run"
    train = [
        f"output_dir={out}", *TINY, "data.train.synthetic=true", "train.steps=100000",
        "checkpoint.every_steps=0",
    ]  # fmt: skip
    if launcher == "torchrun":
        command = [sys.executable, "-m", "launch.cli", "train", "--nproc-per-node", "2", *train]
    else:
        config = accelerate_file(tmp_path / "accelerate.yaml")
        command = [sys.executable, "-m", "launch.accelerate_launch", "--config_file",
                   str(config), "-m", "launch.train", *train]  # fmt: skip
    late = {"UMT_FAULT_SLOW_START": "1:3"}
    rc, stderr = interrupt(command, tmp_path, "training steps 1-100000", env=late)
    assert_stopped_cleanly(rc, stderr, out)
    assert "umt: Ctrl-C: the ranks finish their step, save a checkpoint and stop" in stderr
    assert "--nproc-per-node 2" in stderr  # the command that goes on keeps both ranks


def test_a_run_folder_is_resumed_or_refused_and_restart_moves_it_aside(trained, tmp_path):
    """Re-running a run's command never starts it over (it once trained steps 1-5 into a folder
    at step 210, and checkpoint.keep then deleted the old run)."""
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained), str(run)], check=True)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    proc = umt("train", f"output_dir={run}", "train.steps=1", cwd=tmp_path)
    assert f"the run in {run} is at step 2" in proc.stderr and "nothing to train" in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    refused = umt("train", "--resume", "none", f"output_dir={run}", cwd=tmp_path, check=False)
    assert refused.returncode == 2
    assert (
        "holds a run (newest checkpoint step2)" in refused.stderr and "--restart" in refused.stderr
    )
    # Starting over is asked for: the old run is moved aside, whole.
    umt(
        "train",
        "--restart",
        f"output_dir={run}",
        "train.steps=1",
        "checkpoint.keep=1",
        cwd=tmp_path,
    )
    [aside] = run.glob("replaced-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == before
    assert (run / "checkpoints" / "latest").read_text() == "step1"
    assert (
        json.loads((run / "checkpoints" / "step1" / "umt_meta.json").read_text())["run_id"]
        != (json.loads((aside / "checkpoints" / "step2" / "umt_meta.json").read_text())["run_id"])
    )


# --- evaluation that evaluates nothing -----------------------------------------------------------


def test_zero_shot_with_no_labelled_sample_fails_and_label_field_labels(workdir, trained, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("circle\nother\n")
    common = ["--model", str(trained / "checkpoints"), "--shards", str(workdir / "shards")]
    proc = umt("eval", *common, "--classes", str(classes), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "none of its 24 samples has a label among the 2 classes" in line
    assert "--label-field FIELD" in line
    typo = umt("eval", *common, "--classes", str(classes), "--label-field", "lable", check=False)
    assert typo.returncode == 1 and typo.stderr.strip().splitlines()[-1] == (
        f"umt eval: --label-field lable: none of the 24 samples of {workdir / 'shards'} has that "
        "json field (their fields: caption, captions, height, image_key, key, label, "
        "original_height, original_width, source, width)"
    )
    report = tmp_path / "zs.json"
    umt("eval", *common, "--classes", str(classes), "--label-field", "label", "--out", str(report))
    result = json.loads(report.read_text())
    assert result["samples"] == 24 and result["unlabelled"] == 0
    assert (result["chance_top1"], result["chance_top5"]) == (50.0, 100.0)
    assert all(round(v, 4) == v for v in (result["top1"], result["top5"]))


def test_retrieval_refuses_per_caption_shards(workdir, trained, tmp_path):
    from data_pipeline.shard import ShardOptions, shard_dataset

    table = workdir / "data" / "train.jsonl"
    per_caption = tmp_path / "per_caption"
    options = ShardOptions(image_col="image", caption_col="captions", resize="none", per="caption")
    shard_dataset(table, per_caption, options)
    proc = umt(
        "eval", "--model", str(trained / "checkpoints"), "--shards", str(per_caption), check=False
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "(shards made with --per caption)" in line and "--per image" in line


def test_retrieval_report_is_rounded(workdir, trained, tmp_path):
    report = tmp_path / "r.json"
    umt("eval", "--model", str(trained / "checkpoints"), "--shards", str(workdir / "shards"),
        "--out", str(report))  # fmt: skip
    itc = json.loads(report.read_text())["itc"]
    assert itc and all(round(v, 4) == v for v in itc.values())


def test_model_help_and_unknown_preset_tell_the_truth():
    proc = umt("model", "xl", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        == "umt model: unknown preset 'xl'; the presets: tiny, small, base, large"
    )
    helps = umt("train", "--help").stdout
    assert "demo_cpu.yaml values" not in helps and "the `base` model at 224 px" in " ".join(
        helps.split()
    )
