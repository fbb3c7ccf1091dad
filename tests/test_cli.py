"""Every `umt` command answers --help, and the command list matches the modules that exist."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from launch.cli import COMMANDS
from tests.conftest import REPO


def umt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], cwd=REPO, capture_output=True, text=True
    )


@pytest.mark.slow
def test_top_level_help_lists_every_command():
    proc = umt("--help")
    assert proc.returncode == 0
    for name in COMMANDS:
        assert f"  {name} " in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name):
    importlib.import_module(COMMANDS[name][0])  # every listed command is built
    proc = umt(name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"umt {name}" in proc.stdout


@pytest.mark.slow
def test_unknown_command_is_a_clear_error():
    proc = umt("trian")
    assert proc.returncode == 2 and "unknown command 'trian'" in proc.stderr


@pytest.mark.slow
def test_model_command_prints_parameter_counts():
    proc = umt("model", "tiny")
    assert proc.returncode == 0 and "total" in proc.stdout and "fusion" in proc.stdout


@pytest.mark.slow
def test_train_config_error_is_one_line_naming_the_key():
    proc = umt("train", "data.train.synthetic=true", "train.stepz=3")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "umt train: unknown config key train.stepz; did you mean train.steps? "
        "(override 'train.stepz=3')"
    )


@pytest.mark.slow
def test_version_is_the_installed_packages():
    from importlib import metadata

    proc = umt("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"umt {metadata.version('umt')}"


@pytest.mark.slow
def test_exit_process_joins_threads_runs_atexit_and_flushes_before_it_exits(tmp_path):
    """`exit_process` skips only the module teardown: a non-daemon thread's work, atexit
    handlers and buffered output all come out, in the interpreter's order, with the exit code."""
    trail = tmp_path / "trail.txt"
    script = f"""
import atexit, sys, threading
from launch.cli import exit_process
trail = open({str(trail)!r}, "w")
def at_exit():
    trail.write("atexit\\n")
    trail.close()
atexit.register(at_exit)
threading.Thread(target=lambda: trail.write("thread " + str(sum(range(10**6))) + "\\n")).start()
sys.stdout.write("unflushed stdout")
sys.stderr.write("unflushed stderr")
exit_process(3)
print("not reached")
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "unflushed stdout"
    assert proc.stderr == "unflushed stderr"
    assert trail.read_text() == f"thread {sum(range(10**6))}\natexit\n"


def test_a_refusal_every_rank_shares_is_said_once_by_rank_0(monkeypatch, capsys):
    """Rank 0 says it at once; another rank waits for its launcher to end it (so that it cannot
    get rank 0 killed before its line) and only past the wait says it too, tagged."""
    import launch.train as train

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.said_by_rank0("the accelerate config asks for FSDP", 2) == 2
    assert capsys.readouterr().err == "umt train: the accelerate config asks for FSDP\n"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(train, "RANK0_SAYS_S", 0.0)
    assert train.said_by_rank0("the accelerate config asks for FSDP", 2) == 2
    assert capsys.readouterr().err == "umt train [rank 1]: the accelerate config asks for FSDP\n"


def test_the_garbage_collector_is_paused_for_start_up_and_restored_however_it_ends():
    import gc
    import os

    from launch.cli import gc_paused

    assert gc.isenabled()
    with gc_paused() as work_begins:
        assert not gc.isenabled()
        work_begins()  # the command's own work runs with the collector on
        assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("a start-up that fails")
    assert gc.isenabled()
    with gc_paused():  # a process forked meanwhile (a loader worker) has the collector on
        read, write = os.pipe()
        child = os.fork()
        if child == 0:
            os.write(write, b"1" if gc.isenabled() else b"0")
            os._exit(0)
        os.close(write)
        assert os.read(read, 1) == b"1" and not gc.isenabled()
        os.waitpid(child, 0)
        os.close(read)
    gc.disable()  # a caller that turned it off keeps it off
    try:
        with gc_paused() as work_begins:
            work_begins()
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_umt_train_starts_up_without_the_garbage_collector_and_gives_it_back(tmp_path, monkeypatch):
    """The checks before the process group run with the collector paused; a refusal there gives
    it back (in-process callers keep theirs)."""
    import gc

    import launch.train as train
    import umt.preflight
    from umt.config import ConfigError

    seen = []

    def refuse(cfg):
        seen.append(gc.isenabled())
        raise ConfigError("data.train.shards: no such folder")

    monkeypatch.setattr(umt.preflight, "check_training_inputs", refuse)
    argv = ["--resume", "none", f"output_dir={tmp_path / 'run'}", "data.train.synthetic=true"]
    code = train.main(argv)
    assert code == 2 and seen == [False]
    assert gc.isenabled()
    # `--nproc-per-node`: this process supervises its ranks for the whole run, collector on.
    monkeypatch.setattr(umt.preflight, "check_training_inputs", lambda cfg: seen.append("checked"))
    monkeypatch.setattr(train, "launch_ranks", lambda n, argv: seen.append(gc.isenabled()) or 0)
    assert train.main(["--nproc-per-node", "2", *argv]) == 0
    assert seen[1:] == ["checked", True]
