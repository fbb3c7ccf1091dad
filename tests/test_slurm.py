"""Slurm templates and `umt submit` on a real one-node cluster (slurm/local_cluster.sh): scripts
that sbatch accepts, a 2-rank training job, USR1 -> checkpoint -> requeue -> the same weights as
an uninterrupted job, and a sharding job array whose merge equals a single-process run.

The cluster is the running one, else one that `slurm/local_cluster.sh start` brings up (and
stops afterwards); tests that need it skip, with the script's reason, only where it cannot start.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from launch import submit as submit_module
from tests.conftest import REPO
from tests.test_train import TINY, assert_same_weights, consolidated, scalars

pytestmark = pytest.mark.slow
CLUSTER_SCRIPT = REPO / "slurm" / "local_cluster.sh"
JOB_TIMEOUT_S = 600  # a job takes ~1 min on 2 idle cores (more when shared); a stuck one fails
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
# The tiny synthetic run of tests/test_train.py; the signal lands after the step-20 checkpoint,
# with 60 steps (~12 s) to spare, and the signal's checkpoint is the one the job resumes from.
STEPS, EVERY = 80, 20
TRAIN = [*TINY, "log.every_steps=10", f"train.steps={STEPS}", f"checkpoint.every_steps={EVERY}"]


# --- the cluster ------------------------------------------------------------------------------


def default_partition() -> str | None:
    """The default partition when a controller answers and a node takes jobs, else None."""
    if shutil.which("sinfo") is None:
        return None
    proc = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        name, state = line.split()
        # A node still finishing another test's job (the slow tier runs two at a time) is usable.
        usable = ("idle", "mixed", "alloc", "allocated", "completing", "planned")
        if name.endswith("*") and state.rstrip("*~#").split("+")[0] in usable:
            return name.rstrip("*")
    return None


@pytest.fixture(scope="module")
def partition():
    """A partition of a usable cluster: the running one, or one this fixture starts and stops."""
    name = default_partition()
    if name is not None:
        yield name
        return
    proc = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=900
    )
    name = default_partition()
    if name is None:
        pytest.skip(f"no Slurm cluster: slurm/local_cluster.sh start said: {proc.stderr[-600:]}")
    yield name
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], capture_output=True, timeout=120)


@pytest.fixture
def jobs():
    """Job ids a test submitted; any still queued or running when it ends is cancelled."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


def umt_submit(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`umt submit ARGS`; the job gets this environment (sbatch exports it), plus `env`."""
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "submit", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"umt submit failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def submitted_ids(stdout: str) -> list[str]:
    return re.findall(r"(?:job|array) (\d+)", stdout)


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def logs(folder: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(folder.glob("slurm/logs/*.out")))


def wait_until(predicate, what: str, log_folder: Path, timeout_s: float = JOB_TIMEOUT_S):
    """Poll the cluster (an external system) until `predicate()` is truthy, at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(
        f"{what}: not within {timeout_s} s\n--- job log\n{logs(log_folder)[-6000:]}"
    )


def wait_for_job(job_id: str, log_folder: Path, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, str]:
    """The job's final record (state COMPLETED, FAILED, ...)."""

    def finished():
        info = job_info(job_id)
        return info if info.get("JobState") in FINAL_STATES else None

    return wait_until(finished, f"job {job_id} to finish", log_folder, timeout_s)


def submit_training(
    out: Path,
    partition: str,
    jobs: list[str],
    *options: str,
    overrides: tuple[str, ...] = (),
    env: dict | None = None,
) -> str:
    proc = umt_submit(
        "train",
        "--config",
        str(REPO / "configs" / "demo_cpu.yaml"),
        *options,
        "--gpus-per-node=0",
        "--tasks-per-node=2",
        "--cpus-per-task=1",
        "--time=00:15:00",
        f"--partition={partition}",
        "--",
        f"output_dir={out}",
        *TRAIN,
        *overrides,
        cwd=out.parent,
        env=env,
    )
    [job_id] = submitted_ids(proc.stdout)
    jobs.append(job_id)
    return job_id


# --- rendering (no cluster) -------------------------------------------------------------------


def render_train(*args: str, capsys) -> str:
    config = str(REPO / "configs" / "demo_cpu.yaml")
    argv = ["train", "--config", config, *args, "--dry-run", "--", "output_dir=/tmp/x"]
    assert submit_module.main(argv) == 0
    return capsys.readouterr().out


def test_gpu_script_asks_for_gpus_one_task_each_and_requeues(capsys):
    text = render_train(
        "--nodes=4", "--gpus-per-node=8", "--time=24:00:00", "--partition=p", capsys=capsys
    )
    for line in [
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gres=gpu:8",
        "#SBATCH --partition=p",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
    ]:
        assert line + "\n" in text, line
    assert "--account" not in text  # options not given leave no line
    assert "TRAIN_ARGS=(--resume auto --config /" in text and "output_dir=/tmp/x)" in text
    torchrun = render_train("--gpus-per-node=8", "--launcher=torchrun", capsys=capsys)
    assert "#SBATCH --ntasks-per-node=1\n" in torchrun and "--nproc_per_node=8" in torchrun


def test_cpus_per_task_default_to_the_loader_workers_plus_two(capsys):
    """Each rank feeds its GPU from data.train.num_workers processes besides itself: the demo
    config has 1, so 3 CPUs per task (one task per GPU), 24 for one torchrun task of 8 ranks.
    (Partition `p` is not the local cluster's: nothing to cap against, a warning says so.)"""
    text = render_train("--gpus-per-node=8", "--partition=p", capsys=capsys)
    assert "#SBATCH --cpus-per-task=3\n" in text
    torchrun = render_train(
        "--gpus-per-node=8", "--partition=p", "--launcher=torchrun", capsys=capsys
    )
    assert "#SBATCH --cpus-per-task=24\n" in torchrun


def test_cpu_script_has_no_gres(capsys):
    text = render_train("--gpus-per-node=0", "--tasks-per-node=2", capsys=capsys)
    assert "--gres" not in text and "#SBATCH --ntasks-per-node=2\n" in text


# --- on the cluster ---------------------------------------------------------------------------


def assert_sbatch_accepts(script: Path) -> None:
    test = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True)
    assert test.returncode == 0 and "to start at" in test.stderr, test.stderr


def test_accelerate_launcher_is_one_task_per_node_with_the_users_config_file(tmp_path, capsys):
    config = tmp_path / "accelerate.yaml"
    config.write_text("distributed_type: MULTI_GPU\nmixed_precision: 'no'\nmain_process_port: 1\n")
    text = render_train(
        "--nodes=2", "--gpus-per-node=8", "--partition=p", "--launcher=accelerate",
        f"--accelerate-config={config}", capsys=capsys,
    )  # fmt: skip
    assert "#SBATCH --ntasks-per-node=1\n" in text and "#SBATCH --cpus-per-task=24\n" in text
    assert f"-m launch.accelerate_launch --config_file {config} --multi_gpu" in text
    assert "--num_processes $((SLURM_NNODES * 8))" in text


@pytest.mark.parametrize(
    ("contents", "options", "message"),
    [
        ("mixed_precision: fp16\n", [], "mixed_precision=fp16 differs from train.precision="),
        ("distributed_type: DEEPSPEED\n", [], "distributed_type DEEPSPEED: UMT runs its own"),
        ("- a list\n", [], "not an accelerate config"),
        ("mixed_precision: 'no'\n", ["--launcher=srun"], "goes with --launcher accelerate"),
    ],
)
def test_an_accelerate_config_umt_would_not_follow_is_refused_before_sbatch(
    tmp_path, contents, options, message
):
    config = tmp_path / "accelerate.yaml"
    config.write_text(contents)
    argv = [
        "--config", str(REPO / "configs" / "demo_cpu.yaml"), "--gpus-per-node=8",
        "--launcher=accelerate", *options, f"--accelerate-config={config}", "--dry-run",
    ]  # fmt: skip
    with pytest.raises(submit_module.SubmitError, match=message):
        submit_module.submit_train(argv)


@pytest.mark.parametrize("launcher", ["srun", "torchrun", "accelerate"])
def test_dry_run_script_passes_sbatch_test_only(tmp_path, partition, launcher, capsys):
    argv = [
        "train",
        "--gpus-per-node=0",
        "--tasks-per-node=2",
        f"--launcher={launcher}",
        "--time=00:10:00",
        f"--partition={partition}",
        "--dry-run",
        "--",
        f"output_dir={tmp_path / 'run'}",
        *TRAIN,
    ]
    assert submit_module.main(argv) == 0
    script = tmp_path / "train.sbatch"
    script.write_text(capsys.readouterr().out)
    assert_sbatch_accepts(script)
    assert not (tmp_path / "run").exists()  # a dry run writes and queues nothing


def test_shard_and_eval_dry_runs_pass_sbatch_test_only(tmp_path, partition, capsys):
    common = ["--time=00:10:00", f"--partition={partition}", "--cpus-per-task=1", "--dry-run"]
    shard = ["shard", "in.csv", f"--out={tmp_path / 's'}", "--parts=2", *common]
    assert submit_module.main([*shard, "--", "--maxcount=2"]) == 0
    array_text, merge_text = capsys.readouterr().out.split("# ---- then, after every array task")
    assert "#SBATCH --array=0-1\n" in array_text and "--maxcount=2" in array_text
    (tmp_path / "array.sbatch").write_text(array_text)
    assert_sbatch_accepts(tmp_path / "array.sbatch")
    assert "shard merge" in merge_text
    evaluate = ["eval", "--model=m", "--shards=s", f"--out={tmp_path / 'r.json'}"]
    assert (
        submit_module.main([*evaluate, "--gpus-per-node=0", *common, "--", "--itm-rerank=8"]) == 0
    )
    (tmp_path / "eval.sbatch").write_text(eval_text := capsys.readouterr().out)
    assert "--itm-rerank=8" in eval_text and "--gres" not in eval_text
    assert_sbatch_accepts(tmp_path / "eval.sbatch")


def test_requests_the_partition_can_never_give_are_refused_before_sbatch(
    tmp_path, partition, capsys
):
    """A job asking for more than a node has pends forever without a word from Slurm."""
    nodes = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True)
    node_cpus = int(re.sub(r"\D.*", "", nodes.stdout.split()[0]))
    base = [
        "train",
        "--config",
        str(REPO / "configs" / "demo_cpu.yaml"),
        f"--partition={partition}",
    ]
    out = [f"output_dir={tmp_path / 'run'}"]
    # Default CPUs (workers + 2 per rank) are capped to what the node has, with a line saying so.
    argv = [*base, "--gpus-per-node=0", "--tasks-per-node=2", "--dry-run", "--", *out]
    assert submit_module.main(argv) == 0
    captured = capsys.readouterr()
    fitting = max(1, node_cpus // 2)
    if 3 > fitting:
        assert f"#SBATCH --cpus-per-task={fitting}\n" in captured.out
        assert f"{fitting} fit partition {partition}" in captured.err
    # A GPU job on a partition without GPUs, and more CPUs than a node has: refused, one line.
    for bad, message in (
        (["--gpus-per-node=1"], "has no GPUs"),
        (["--gpus-per-node=0", f"--cpus-per-task={node_cpus + 1}"], f"nodes have {node_cpus}"),
        (["--gpus-per-node=0", "--nodes=99"], "--nodes 99"),
    ):
        assert submit_module.main([*base, *bad, "--", *out]) == 2
        err = capsys.readouterr().err
        assert "this job could never start" in err and message in err, err
        assert len(err.strip().splitlines()) == 1
    assert submit_module.main([*base, "--partition=nope", "--gpus-per-node=0", "--", *out]) == 2
    assert "partition nope does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_chain_links_jobs_with_afterany(tmp_path, partition, jobs):
    out = tmp_path / "run"
    proc = umt_submit(
        "train",
        "--config",
        str(REPO / "configs" / "demo_cpu.yaml"),
        "--gpus-per-node=0",
        "--time=00:05:00",
        f"--partition={partition}",
        "--chain=3",
        "--sbatch-arg=--hold",  # queued, never started: the links are what is tested
        "--",
        f"output_dir={out}",
        "data.train.synthetic=true",  # the demo's shards are not there: the job would refuse
        cwd=tmp_path,
    )
    ids = submitted_ids(proc.stdout)
    jobs += ids
    assert len(ids) == 3 and len(set(ids)) == 3, proc.stdout
    script = out / "slurm" / "train.sbatch"
    assert script.is_file() and (script.parent / "logs").is_dir()
    infos = [job_info(job_id) for job_id in ids]
    for info in infos:
        assert info["Command"] == str(script), info
        assert (info["JobState"], info["Reason"]) == ("PENDING", "JobHeldUser"), info
    # Each job waits for the end (any end) of the one queued before it; the first for none.
    assert [info["Dependency"] for info in infos] == [
        "(null)",
        f"afterany:{ids[0]}(unfulfilled)",
        f"afterany:{ids[1]}(unfulfilled)",
    ]


# Calls the real requeue_slurm_job in a job (as rank 0 does after a signal's checkpoint); the
# requeued run, SLURM_RESTART_COUNT=1, only says that it ran. TERM is ignored as training
# handles it: `scontrol requeue` TERMs the running job, which must not cut the report short.
REQUEUE_JOB = """\
#!/bin/bash
#SBATCH --job-name=umt-requeue-test
#SBATCH --partition={partition}
#SBATCH --time=00:05:00
#SBATCH --cpus-per-task=1
#SBATCH --chdir={folder}
#SBATCH --output={folder}/slurm/logs/%j.out
#SBATCH --open-mode=append
echo "run restart ${{SLURM_RESTART_COUNT:-0}}"
[ "${{SLURM_RESTART_COUNT:-0}}" = 0 ] || exit 0
export PYTHONPATH={repo}
exec {python} -c '
import logging, os, signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
from launch.train import requeue_slurm_job
requeue_slurm_job(os.environ)
'
"""


@pytest.mark.parametrize("requeueable", [1, 0])
def test_rank0_requeues_only_a_requeueable_job(tmp_path, partition, jobs, requeueable):
    (tmp_path / "slurm" / "logs").mkdir(parents=True)
    script = tmp_path / "slurm" / "requeue.sbatch"
    script.write_text(
        REQUEUE_JOB.format(partition=partition, folder=tmp_path, repo=REPO, python=sys.executable)
    )
    flag = "--requeue" if requeueable else "--no-requeue"
    proc = subprocess.run(
        ["sbatch", "--parsable", flag, str(script)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    jobs.append(job_id)
    # A requeued job starts again after cred_expire (10 s on the local cluster).
    info = wait_for_job(job_id, tmp_path, timeout_s=120)
    log = logs(tmp_path)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert info["Requeue"] == str(requeueable), info
    assert info["Restarts"] == str(requeueable), log
    runs = [line for line in log.splitlines() if line.startswith("run restart")]
    assert runs == (["run restart 0", "run restart 1"] if requeueable else ["run restart 0"]), log
    if requeueable:
        assert f"umt.launch: requeued Slurm job {job_id};" in log, log
    else:
        assert f"umt.launch: Slurm job {job_id} is not requeueable" in log, log
    assert "scontrol requeue" not in log, log  # the function's warning that requeue failed


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, partition) -> Path:
    out = tmp_path_factory.mktemp("slurm") / "uninterrupted"
    ids: list[str] = []
    job_id = submit_training(out, partition, ids)
    try:
        info = wait_for_job(job_id, out)
    finally:
        subprocess.run(["scancel", *ids], capture_output=True)  # a no-op once it finished
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs(out)[-6000:]
    return out


def test_sbatch_trains_the_demo_config_with_2_ranks(uninterrupted):
    ckpt = uninterrupted / "checkpoints"
    assert (ckpt / "latest").read_text() == f"step{STEPS}"
    meta = json.loads((ckpt / f"step{STEPS}" / "umt_meta.json").read_text())
    assert meta["world_size"] == 2
    assert {p.name for p in (ckpt / f"step{STEPS}").glob("rank*.pt")} == {"rank0.pt", "rank1.pt"}
    assert sorted(scalars(uninterrupted, "loss/total")) == list(range(10, STEPS + 1, 10))
    assert (uninterrupted / "slurm" / "train.sbatch").is_file()


@pytest.mark.parametrize("launcher", ["srun", "accelerate"])
def test_usr1_checkpoints_requeues_and_resumes_to_the_same_weights(
    tmp_path, partition, jobs, uninterrupted, launcher
):
    """The srun launcher (a task per rank) and `accelerate launch` (a task per node whose agent
    starts the ranks) both checkpoint, requeue and resume to the uninterrupted run's weights."""
    out = tmp_path / "preempted"
    job_id = submit_training(out, partition, jobs, f"--launcher={launcher}")
    latest = out / "checkpoints" / "latest"
    wait_until(
        lambda: latest.is_file() and latest.read_text() == f"step{EVERY}",
        f"job {job_id} to write its step-{EVERY} checkpoint",
        out,
    )
    # As Slurm does before the time limit (--signal=B:USR1@S): USR1 to the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    info = wait_for_job(job_id, out)
    log = logs(out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-6000:]
    assert info["Restarts"] == "1", log[-6000:]
    stopped = re.search(r"\[rank 0\] umt.train: stopping at step (\d+) after a signal", log)
    assert stopped, log[-6000:]
    step = int(stopped.group(1))
    assert EVERY < step < STEPS
    assert f"requeued Slurm job {job_id}" in log
    # No step lost: the requeued run starts from the signal's checkpoint.
    assert f"resumed from {out / 'checkpoints' / f'step{step}'} at step {step}" in log
    assert "restart 1" in log  # the same log file, appended to
    assert_same_weights(
        consolidated(out, f"step{STEPS}"), consolidated(uninterrupted, f"step{STEPS}")
    )
    assert scalars(out, "loss/total") == scalars(uninterrupted, "loss/total")


def test_a_hang_then_a_dead_rank_each_end_the_step_and_requeue_to_the_same_weights(
    tmp_path, partition, jobs, uninterrupted
):
    """Run 0: rank 1 blocks in step 30; the watchdog (train.hang_timeout_min 0.5) ends every rank
    with stacks and a summary, and the job requeues. Run 1 (from the step-20 checkpoint): rank 1
    is SIGKILLed after step 50; srun --kill-on-bad-exit ends every rank within a minute, and the
    job requeues. Run 2 (from step 40) finishes with the uninterrupted job's weights. Checkpoints
    are written in the background throughout."""
    out = tmp_path / "faulty"
    overrides = ("train.hang_timeout_min=0.5", "train.collective_timeout_min=10",
                 "checkpoint.async_save=true")  # fmt: skip
    env = {"UMT_FAULT_HANG_AT_STEP": "30:1", "UMT_FAULT_KILL_AT_STEP": "50:1@1"}
    job_id = submit_training(out, partition, jobs, overrides=overrides, env=env)
    wait_until(lambda: "fault: SIGKILL after step 50" in logs(out), "rank 1's kill in run 1", out)
    wait_until(
        lambda: logs(out).count("training exited with") == 2,
        "every rank of run 1 to be gone after the kill",
        out,
        timeout_s=60,
    )
    info = wait_for_job(job_id, out)
    log = logs(out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-6000:]
    assert info["Restarts"] == "2", log[-6000:]
    summary = (out / "hangs" / "step30" / "summary.txt").read_text()
    assert "look first at rank(s) 1: not in a collective" in summary
    decisions = [json.loads(line) for line in (out / "slurm" / "requeues.jsonl").open()]
    assert [d["requeued"] for d in decisions] == [True, True], decisions
    assert decisions[0]["reason"].startswith("hang (exit ")
    assert decisions[1]["reason"].startswith("a rank died of signal"), decisions  # 9 or srun's 15
    ckpt = out / "checkpoints"
    assert f"resumed from {ckpt / 'step20'} at step 20" in log
    assert f"resumed from {ckpt / 'step40'} at step 40" in log
    assert_same_weights(
        consolidated(out, f"step{STEPS}"), consolidated(uninterrupted, f"step{STEPS}")
    )
    assert scalars(out, "loss/total") == scalars(uninterrupted, "loss/total")


def write_pairs(folder: Path, n: int) -> Path:
    """`n` small PNGs and a CSV pairing each with a caption."""
    folder.mkdir(parents=True)
    table = folder / "pairs.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for i in range(n):
            Image.new("RGB", (20 + i, 16), (i * 20 % 256, 90, 200)).save(folder / f"{i}.png")
            writer.writerow([f"{i}.png", f"picture number {i}"])
    return table


def test_shard_array_and_merge_equal_a_single_process_run(tmp_path, partition, jobs):
    table = write_pairs(tmp_path / "in", n=10)
    options = ["--maxcount=2", "--image-size=16", "--seed=0"]
    single = tmp_path / "single"
    subprocess.run(
        [sys.executable, "-m", "launch.cli", "shard", str(table), "--out", str(single), *options],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
        capture_output=True,
    )
    parts = tmp_path / "parts"
    proc = umt_submit(
        "shard",
        str(table),
        f"--out={parts}",
        "--parts=2",
        "--cpus-per-task=1",
        "--time=00:10:00",
        f"--partition={partition}",
        "--",
        *options,
        cwd=tmp_path,
    )
    array_id, merge_id = submitted_ids(proc.stdout)
    jobs += [array_id, merge_id]
    info = wait_for_job(merge_id, parts)
    assert info["JobState"] == "COMPLETED", logs(parts)[-6000:]
    assert (
        len(list(parts.glob("manifest-part-*-of-00002.json"))) == 2
    )  # each array task wrote a part
    for name in ("manifest.json", "sizes.json", "errors.jsonl"):
        assert (parts / name).read_bytes() == (single / name).read_bytes(), name
    tars = sorted(p.name for p in single.glob("*.tar"))
    assert tars and tars == sorted(p.name for p in parts.glob("*.tar"))
    for name in tars:
        assert (parts / name).read_bytes() == (single / name).read_bytes(), name


@pytest.fixture(scope="module")
def own_data(tmp_path_factory) -> Path:
    """A new user's working folder: shards of their own and a tokenizer trained on them."""
    from data_pipeline.builtin import write_split
    from data_pipeline.shard import ShardOptions, shard_dataset
    from data_pipeline.tokenizer_training import shard_captions, train_wordpiece

    folder = tmp_path_factory.mktemp("own")
    table = write_split(folder / "data", "test", 16, 32)
    options = ShardOptions(image_col="image", caption_col="captions", resize="none", maxcount=8)
    shard_dataset(table, folder / "shards", options)
    train_wordpiece(shard_captions(str(folder / "shards")), 64, folder / "tokenizer")
    return folder


# As README's own-data command, relative to the working folder, made small.
OWN = [
    "output_dir=run", "data.train.shards=shards", "data.tokenizer=tokenizer",
    "model.image.image_size=32", "train.micro_batch_size=4", "train.steps=2",
    "data.train.num_workers=0", "data.train.max_text_len=12", "train.warmup_steps=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def own_run(own_data, partition) -> Path:
    """A training job submitted with a shipped config's name (it once died at its start: the
    script named a file under the submitting folder)."""
    ids: list[str] = []
    proc = umt_submit(
        "train", "--config", "tiny_cpu", "--gpus-per-node=0", "--tasks-per-node=1",
        "--cpus-per-task=1", "--time=00:10:00", f"--partition={partition}", "--", *OWN,
        cwd=own_data,
    )  # fmt: skip
    [job_id] = submitted_ids(proc.stdout)
    ids.append(job_id)
    run = own_data / "run"
    try:
        info = wait_for_job(job_id, run)
    finally:
        subprocess.run(["scancel", *ids], capture_output=True)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs(run)[-6000:]
    return run


def test_a_job_with_a_shipped_config_name_trains(own_run):
    script = (own_run / "slurm" / "train.sbatch").read_text()
    assert "TRAIN_ARGS=(--resume auto --config tiny_cpu output_dir=run" in script
    assert (own_run / "checkpoints" / "latest").read_text() == "step2"


def test_what_the_job_would_refuse_is_refused_before_sbatch(
    own_data, partition, capsys, monkeypatch
):
    """The job's inputs are checked as its `umt train` will check them: not after hours in the
    queue. A dry run still prints the script, with a warning."""
    monkeypatch.chdir(own_data)  # the job's folder: relative paths as the job reads them
    common = ["train", "--config", "tiny_cpu", "--gpus-per-node=0", f"--partition={partition}"]
    for bad, said in (
        ("data.train.shards=shards-typo", "data.train.shards: "),
        ("data.tokenizer=tokenizers/mien", "data.tokenizer: "),
    ):
        overrides = [*OWN, bad, "output_dir=refused"]
        assert submit_module.main([*common, "--", *overrides]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("umt submit train: error: the job would stop at its start: " + said)
        assert len(err.splitlines()) == 1
        assert submit_module.main([*common, "--dry-run", "--", *overrides]) == 0
        dry = capsys.readouterr()
        assert "warning: the job would stop at its start" in dry.err and "#SBATCH" in dry.out
    assert not (own_data / "refused").exists()


def test_eval_job_writes_the_report_a_local_eval_writes(own_data, own_run, partition, jobs):
    """`umt submit eval` runs `umt eval` in the job (it once ran a module with no entry point and
    ended COMPLETED with no report): the job's report equals one made locally, of the run folder."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    shards = own_data / "shards"
    subprocess.run(
        [sys.executable, "-m", "launch.cli", "eval", f"--model={own_run}", f"--shards={shards}",
         f"--out={own_data / 'local.json'}"],
        cwd=own_data, env=env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    report = own_data / "job" / "report.json"
    proc = umt_submit(
        "eval",
        f"--model={own_run / 'checkpoints'}",
        f"--shards={shards}",
        f"--out={report}",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=00:10:00",
        f"--partition={partition}",
        cwd=own_data,
    )
    [job_id] = submitted_ids(proc.stdout)
    jobs.append(job_id)
    info = wait_for_job(job_id, report.parent)
    assert info["JobState"] == "COMPLETED", logs(report.parent)[-6000:]
    assert report.is_file(), logs(report.parent)[-6000:]
    local = json.loads((own_data / "local.json").read_text())
    assert json.loads(report.read_text())["itc"] == local["itc"]


def test_curate_job_writes_the_subset_a_local_run_writes(tmp_path, partition, jobs, capsys):
    """`umt submit curate`: 2 tasks split the shards and the last one writes the subset; its
    bytes equal a one-process run's. The options after -- are checked before sbatch."""
    from tests.data_pipeline.curate_cases import plant

    planted = plant(tmp_path / "planted", scene_count=8, eval_scene_count=4)
    options = ["--dedup", "exact,near", "--decontaminate", str(planted.eval)]
    local = tmp_path / "local"
    subprocess.run(
        [sys.executable, "-m", "launch.cli", "data", "curate", str(planted.train), "--out",
         str(local), *options],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True, capture_output=True,
    )  # fmt: skip
    job_dir = tmp_path / "job"
    common = [
        "curate", str(planted.train), f"--out={job_dir}", "--tasks-per-node=2",
        "--cpus-per-task=1", "--time=00:10:00", f"--partition={partition}",
    ]  # fmt: skip
    assert submit_module.main([*common, "--dry-run", "--", "--keep-top=2"]) == 2
    assert "--keep-top must be in (0, 1]" in capsys.readouterr().err
    assert submit_module.main([*common, "--dry-run", "--", *options]) == 0
    (tmp_path / "curate.sbatch").write_text(capsys.readouterr().out)
    assert_sbatch_accepts(tmp_path / "curate.sbatch")
    proc = umt_submit(*common, "--", *options, cwd=tmp_path)
    [job_id] = submitted_ids(proc.stdout)
    jobs.append(job_id)
    info = wait_for_job(job_id, job_dir)
    assert info["JobState"] == "COMPLETED", logs(job_dir)[-6000:]
    assert "the last rank to finish writes the subset" in logs(job_dir)
    for name in ("subset.json", "removed.jsonl"):
        assert (job_dir / name).read_bytes() == (local / name).read_bytes(), name
