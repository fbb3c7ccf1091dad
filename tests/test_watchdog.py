"""The hang watchdog and the straggler monitor on 2 gloo ranks under `umt train`'s torchrun, and
the pieces they are made of: the default timeout, the summary's verdict, the straggler's reason,
the launcher's exit code, the fault hooks and the Slurm job's requeue decision."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from data_pipeline.faults import TrainingFaults
from launch.requeue import decide
from launch.torchrun import launcher_exit_code
from tests.conftest import run_timed, umt_train_ranks
from tests.test_train import TINY, scalars
from umt import hang_report
from umt.stragglers import straggler_reason
from umt.watchdog import AUTO_FLOOR_S, HANG_EXIT_CODE, hang_timeout_s

# --- one hung run: rank 1 sleeps 0.5 s in every step (a slow node), then blocks in step 5 -------


@pytest.fixture(scope="module")
def hung(tmp_path_factory):
    out = tmp_path_factory.mktemp("hang") / "run"
    cmd = umt_train_ranks(
        out, "--resume", "none", *TINY, "train.steps=8", "checkpoint.every_steps=2",
        "train.hang_timeout_min=0.5", "train.collective_timeout_min=10",
    )  # fmt: skip
    env = {"UMT_FAULT_HANG_AT_STEP": "5:1", "UMT_FAULT_SLOW_RANK": "1:0.5"}
    return out, run_timed(cmd, env=env, timeout_s=600)


@pytest.mark.slow
def test_a_hang_ends_the_run_within_two_minutes_with_its_own_exit_code(hung):
    out, run = hung
    assert run.returncode == HANG_EXIT_CODE, run.output[-6000:]
    # train.hang_timeout_min=0.5 after the last step, then the reports: well within 2 minutes
    assert run.seconds_after("fault: blocking forever in step 5") < 120
    assert (out / "checkpoints" / "latest").read_text() == "step4"


@pytest.mark.slow
def test_every_rank_reports_its_phase_its_collective_and_its_stacks(hung):
    out, _ = hung
    folder = out / "hangs" / "step5"
    waiting, blocked = (folder / f"rank{r}.txt" for r in (0, 1))
    header = hang_report.read_header(waiting)
    assert (header["phase"], header["in_collective"]) == ("forward", "yes")
    assert header["collective"].startswith("waiting in all_gather #")
    text = waiting.read_text()
    main_stack = text.split('Thread "MainThread"')[1].split("Thread ")[0]
    assert "in gather_with_grad" in main_stack and "distributed_c10d.py" in main_stack
    header = hang_report.read_header(blocked)
    assert (header["phase"], header["in_collective"]) == ("forward", "no")
    text = blocked.read_text()
    assert "in hang_in" in text and "in block_forever" in text  # the injected block
    assert "--- flight recorder" in text and "gloo:all_gather" in text


@pytest.mark.slow
def test_the_summary_names_the_rank_that_is_not_in_a_collective(hung):
    out, run = hung
    summary = (out / "hangs" / "step5" / "summary.txt").read_text()
    assert "look first at rank(s) 1: not in a collective while rank(s) 0 wait in one" in summary
    assert re.match(
        r"step 5: no optimizer step completed for \d+ s \(train.hang_timeout_min: 30 s\)", summary
    )
    assert "summary (" in run.output  # also in the log, on one screen


@pytest.mark.slow
def test_a_slow_rank_is_named_with_its_host_and_why(hung):
    out, run = hung
    named = re.findall(r"straggler: rank (\d) on host \S+ .*the excess is (\w[\w ]*)", run.output)
    assert named and all(found == ("1", "compute") for found in named), run.output[-6000:]
    slowest = scalars(out, "stragglers/slowest_rank")  # flushed before the hang's exit
    assert [slowest[s] for s in (2, 3, 4)] == [1.0, 1.0, 1.0]
    assert all(v > 1.25 for s, v in scalars(out, "stragglers/max_over_median").items() if s > 1)


# --- the pieces -----------------------------------------------------------------------------------


def test_the_default_timeout_scales_with_the_median_step_and_stays_under_the_collective_one():
    assert hang_timeout_s(0.5, [100.0], 30) == 30  # configured: as given
    assert hang_timeout_s(None, [], 30) == AUTO_FLOOR_S  # before any step was timed
    assert hang_timeout_s(None, [0.5, 9.0, 9.0], 30) == 900  # 100 median steps
    assert hang_timeout_s(None, [20.0] * 3, 30) == 0.8 * 30 * 60  # under the collective timeout


def write_reports(folder: Path, headers: dict[int, dict]) -> None:
    for rank, header in headers.items():
        lines = "".join(f"{k}: {v}\n" for k, v in header.items())
        hang_report.write_atomic(folder / f"rank{rank}.txt", lines + "\nstacks\n")


@pytest.mark.parametrize(
    ("in_collective", "seqs", "missing", "verdict"),
    [
        ("yyn", (9, 9, 8), (), "look first at rank(s) 2: not in a collective while rank(s) 0, 1"),
        ("yyy", (9, 8, 9), (), "look first at rank(s) 1: behind the others (collective #8 "),
        ("yyy", (9, 9, 9), (), "every rank waits in the same collective"),
        ("yy", (9, 9), (2,), "look first at rank(s) 2: no report (dead?)"),
    ],
)
def test_the_summary_says_which_rank_to_look_at_first(
    tmp_path, in_collective, seqs, missing, verdict
):
    headers = {
        r: {"step": 7, "reason": "no optimizer step completed for 60 s", "host": f"node{r}",
            "phase": "forward", "collective": "...", "collective_seq": seq,
            "in_collective": "yes" if flag == "y" else "no"}
        for r, (flag, seq) in enumerate(zip(in_collective, seqs))
    }  # fmt: skip
    write_reports(tmp_path, headers)
    summary = hang_report.summarize(tmp_path, world=3, writer=0)
    assert summary.startswith("step 7: no optimizer step completed for 60 s")
    assert verdict in summary
    for r in missing:
        assert f"{r}  ?" in summary and "no report: dead" in summary


def test_the_first_rank_to_claim_the_summary_writes_it_once(tmp_path):
    write_reports(tmp_path, {0: {"step": 3, "in_collective": "no"}})
    assert hang_report.settle_summary(tmp_path, rank=0, world=1, wait_s=0) is not None
    assert hang_report.settle_summary(tmp_path, rank=0, world=1, wait_s=0) is None  # claimed


def test_a_folder_per_incident_even_at_the_same_step(tmp_path):
    assert hang_report.incident_folder(tmp_path, 5, set()).name == "step5"
    assert hang_report.incident_folder(tmp_path, 5, {"step5", "step5-2"}).name == "step5-3"


def test_a_straggler_is_slow_in_the_part_further_over_its_median():
    median = (0.30, 0.05)
    assert straggler_reason((0.31, 0.40), median) == "data wait"
    assert straggler_reason((0.90, 0.06), median) == "compute"


def test_the_launcher_exit_code_says_hang_or_signal():
    assert launcher_exit_code([HANG_EXIT_CODE, -9]) == HANG_EXIT_CODE
    assert launcher_exit_code([-9, 1]) == 128 + 9
    assert launcher_exit_code([2]) == 2 and launcher_exit_code([1, 2]) == 1


def test_fault_hooks_name_a_step_a_rank_and_a_run():
    env = {"UMT_FAULT_HANG_AT_STEP": "5:1", "UMT_FAULT_KILL_AT_STEP": "7@1",
           "UMT_FAULT_SLOW_RANK": "1:0.5", "UMT_FAULT_KILL_IN_CHECKPOINT_WRITE": "4:0",
           "UMT_FAULT_SLOW_START": "0:2"}  # fmt: skip
    rank0, rank1 = (TrainingFaults.from_env(env, rank=r) for r in (0, 1))
    assert (rank0.hang_at_step, rank1.hang_at_step) == (-1, 5)
    assert (rank0.slow_s, rank1.slow_s) == (0.0, 0.5)
    assert (rank0.slow_start_s, rank1.slow_start_s) == (2.0, 0.0)
    assert (rank0.kill_in_checkpoint_write, rank1.kill_in_checkpoint_write) == (4, -1)
    assert rank1.kill_at_step == -1  # run 1 of a Slurm job only
    requeued = TrainingFaults.from_env({**env, "SLURM_RESTART_COUNT": "1"}, rank=1)
    assert (requeued.kill_at_step, requeued.hang_at_step) == (7, -1)


def test_a_hang_or_a_dead_rank_requeues_up_to_the_limit_and_errors_never(tmp_path, caplog):
    env = {"SLURM_RESTART_COUNT": "0"}  # not a job: requeue_slurm_job only says so
    hang = decide(HANG_EXIT_CODE, tmp_path, limit=2, env=env)
    dead = decide(128 + 9, tmp_path, limit=2, env=env)
    again = decide(128 + 9, tmp_path, limit=2, env=env)
    error = decide(1, tmp_path, limit=2, env=env)
    assert hang.endswith("requeued (1 of 2), resuming from the last checkpoint")
    assert dead.startswith("[umt] a rank died of signal 9 (exit 137): requeued (2 of 2)")
    assert "not requeued, 2 requeues after failures already (train.requeue_limit 2)" in again
    assert "not requeued (the error would repeat" in error
    assert decide(0, tmp_path, limit=2, env=env) == ""
    record = [json.loads(line) for line in (tmp_path / "slurm" / "requeues.jsonl").open()]
    assert [r["requeued"] for r in record] == [True, True, False, False]


@pytest.mark.parametrize("handler_first", [True, False])
def test_a_handled_stop_signal_is_not_taken_for_a_stuck_rank_whichever_is_seen_first(
    tmp_path, handler_first
):
    """The Python handler may run before the watchdog reads the signal from its pipe (a loaded
    node): counted, the signal is handled either way. An unhandled one fires after the grace."""
    import os
    import signal
    import time

    from umt.watchdog import STOP_GRACE_S, HangWatchdog

    dog = HangWatchdog(tmp_path, 0, 1, None, 30.0, set())
    read, write = os.pipe()
    dog._signal_pipe = read
    dog.enter("forward")
    if handler_first:
        dog.signal_handled()
    os.write(write, bytes([signal.SIGTERM]))
    dog._wait(0)
    if not handler_first:
        dog.signal_handled()
    later = time.monotonic() + 2 * STOP_GRACE_S
    assert not dog._stuck_after_signal(time.monotonic()) and not dog._stuck_after_signal(later)
    os.write(write, bytes([signal.SIGTERM]))  # one the handler never ran for
    dog._wait(0)
    assert not dog._stuck_after_signal(time.monotonic())  # the grace starts now
    assert dog._stuck_after_signal(time.monotonic() + 2 * STOP_GRACE_S)
    os.close(read), os.close(write)
