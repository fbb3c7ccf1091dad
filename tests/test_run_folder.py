"""A run folder is resumed or refused, never silently started over (issue #26): what `--resume`,
`--model` and `umt export` accept and what they say about anything else, pruning that deletes
only the run's own checkpoints, `--restart` moving a run aside, the global batch kept on another
number of ranks, and the per-rank CPU threads. Checkpoint folders here carry the files the
trainer writes (umt_meta.json, latest, config.yaml); the training runs are in test_daily_jobs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from umt import checkpoint
from umt.config import Config, ConfigError, load_config, to_dict
from umt.run_config import (
    absolute_paths,
    check_resume,
    keep_global_batch,
    record_config_change,
    resume_plan,
    set_aside_run,
)

SYNTHETIC = ["data.train.synthetic=true", "model.preset=tiny"]


def make_run(run: Path, steps: list[int], run_id: str = "run-a", world_size: int = 2) -> Path:
    """A run folder as the trainer leaves it: config.yaml and complete step folders."""
    cfg = absolute_paths(load_config(None, [f"output_dir={run}", *SYNTHETIC]))
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    root = run / "checkpoints"
    for step in steps:
        write_step(root, step, run_id, world_size, to_dict(cfg))
    return run


def write_step(root: Path, step: int, run_id: str | None, world_size: int, config: dict) -> None:
    folder = root / f"step{step}"
    folder.mkdir(parents=True)
    meta = {"step": step, "world_size": world_size, "zero_stage": 2, "config": config}
    if run_id is not None:
        meta["run_id"] = run_id
    (folder / "umt_meta.json").write_text(json.dumps(meta))
    (root / "latest").write_text(f"step{step}")


# --- what a folder is ----------------------------------------------------------------------------


def test_a_run_folder_its_checkpoints_or_a_step_folder_name_a_checkpoint(tmp_path):
    run = make_run(tmp_path / "run", [4, 5])
    for given, step in ((run, 5), (run / "checkpoints", 5), (run / "checkpoints" / "step4", 4)):
        assert checkpoint.locate(given, "--resume").step == step


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda p: None, "no such file or folder"),
        (lambda p: p.mkdir(), "the folder is empty: not a run, checkpoint or step folder"),
        (
            lambda p: (p.mkdir(), (p / "manifest.json").write_text("{}")),
            "a shard folder, not a run: give the run's output_dir (or its checkpoints/)",
        ),
        (
            lambda p: (p.mkdir(), (p / "umt_export.json").write_text("{}")),
            "an export (umt export): exports are evaluated and loaded (umt eval --model, "
            "umt.load), not resumed or exported again",
        ),
        (
            lambda p: (p.mkdir(), (p / "step3").mkdir()),
            "step folders (step3) but no `latest` and no umt_meta.json: no complete checkpoint "
            "(a run killed while saving?)",
        ),
        (
            lambda p: (p.mkdir(), (p / "notes.txt").write_text("")),
            "not a run, checkpoint or step folder (no config.yaml, latest or umt_meta.json in it)",
        ),
    ],
)
def test_anything_else_is_named_for_what_it_is(tmp_path, make, said):
    folder = tmp_path / "x"
    make(folder)
    with pytest.raises(checkpoint.CheckpointError) as refused:
        checkpoint.locate(folder, "--resume")
    assert str(refused.value) == f"--resume {folder}: {said}"


def test_a_run_folder_without_a_checkpoint_says_so(tmp_path):
    run = make_run(tmp_path / "run", [])
    with pytest.raises(
        checkpoint.CheckpointError, match="a run folder with no complete checkpoint"
    ):
        checkpoint.locate(run, "--model")


# --- resuming ------------------------------------------------------------------------------------


def test_resume_takes_the_run_config_from_its_checkpoints_folder_too(tmp_path):
    run = make_run(tmp_path / "run", [4, 5])
    for given in (run, run / "checkpoints", run / "checkpoints" / "step5"):
        config, overrides, resume, base = resume_plan(str(given), None, ["train.steps=9"])
        assert config == str(run / "config.yaml") and base == run and resume == "auto"
        assert overrides == ["train.steps=9", f"output_dir={run.resolve()}"]


def test_a_step_folder_resumes_with_the_config_it_was_trained_with(tmp_path):
    run = make_run(tmp_path / "run", [4, 5])
    step = run / "checkpoints" / "step5"
    (step / "config.yaml").write_text((run / "config.yaml").read_text())  # as checkpoint.save does
    config, _, resume, base = resume_plan(str(step), None, [])
    assert config == str(step / "config.yaml") and base == run and resume == "auto"


def test_resuming_an_older_step_in_its_own_run_is_refused_and_branching_off_is_allowed(tmp_path):
    run = make_run(tmp_path / "run", [4, 5])
    older = run / "checkpoints" / "step4"
    with pytest.raises(checkpoint.CheckpointError) as refused:
        resume_plan(str(older), None, [])
    assert "not the newest checkpoint of its run (step5 is)" in str(refused.value)
    assert "would write over later steps" in str(refused.value) and "output_dir=" in str(
        refused.value
    )
    branch = tmp_path / "branch"
    config, overrides, resume, _ = resume_plan(str(older), None, [f"output_dir={branch}"])
    assert resume == str(older.resolve()) and overrides == [f"output_dir={branch}"]
    assert config == str(run / "config.yaml")


def test_a_folder_with_a_run_is_not_started_over_without_restart(tmp_path):
    run = make_run(tmp_path / "run", [4, 5])
    cfg = absolute_paths(load_config(None, [f"output_dir={run}", *SYNTHETIC]))
    with pytest.raises(ConfigError) as refused:
        check_resume(cfg, "none")
    message = str(refused.value)
    assert f"output_dir {run} holds a run (newest checkpoint step5)" in message
    assert "--restart" in message and "nothing is deleted" in message
    check_resume(cfg, "none", restart=True)  # asked for: allowed
    check_resume(cfg, "auto")  # the same run: resumed
    changed = absolute_paths(load_config(None, [f"output_dir={run}", *SYNTHETIC, "train.seed=3"]))
    with pytest.raises(ConfigError, match=r"train.seed \(0 -> 3\).*--restart to start over"):
        check_resume(changed, "auto")


def test_shard_paths_are_made_absolute_through_the_shards_parser(tmp_path, monkeypatch):
    """Named sources, mix suffixes, mappings and brace lists keep their meaning (each comma-split
    part was made absolute before: `i2d=/abs/dir` became `CWD/i2d=/abs/dir`)."""
    monkeypatch.chdir(tmp_path)
    given = "i2d=/abs/i2d,wds=rel/wds-{a,b}.tar:x2,s3://bucket/cc:30%"
    cfg = absolute_paths(load_config(None, [*SYNTHETIC, f"data.train.shards={given}"]))
    assert (
        cfg.data.train.shards
        == f"i2d=/abs/i2d,wds={tmp_path}/rel/wds-{{a,b}}.tar:x2,s3://bucket/cc:30%"
    )
    listed = "[{path: rel/a, name: a, repeat: 2}, 'b=rel/b:4']"
    cfg = absolute_paths(load_config(None, [*SYNTHETIC, f"data.eval.shards={listed}"]))
    assert cfg.data.eval.shards == [
        {"path": f"{tmp_path}/rel/a", "name": "a", "repeat": 2},
        f"b={tmp_path}/rel/b:4",
    ]


def test_a_changed_mixture_is_refused_naming_its_sources_unless_new_mixture(tmp_path):
    from tests.data_pipeline.loader_fixtures import write_dataset

    for name in ("a", "b"):
        write_dataset(tmp_path / name, [3], name=name)
    run = tmp_path / "run"
    first = [f"output_dir={run}", *SYNTHETIC, f"data.train.shards={tmp_path / 'a'}"]
    cfg = absolute_paths(load_config(None, first))
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    write_step(run / "checkpoints", 4, "run-a", 2, to_dict(cfg))
    mixture = f"data.train.shards={tmp_path / 'a'}:x2,{tmp_path / 'b'}"
    changed = absolute_paths(load_config(None, [*first, mixture]))
    with pytest.raises(ConfigError) as refused:
        check_resume(changed, "auto")
    message = str(refused.value)
    assert "data.train.shards: source b added; source a: x1 -> x2 (" in message
    assert f"umt train --resume {run} --new-mixture" in message and "\n" not in message
    check_resume(changed, "auto", new_mixture=True)  # asked for: a new phase of the stream
    seed = absolute_paths(load_config(None, [*first, mixture, "train.seed=3"]))
    with pytest.raises(ConfigError, match=r"train.seed \(0 -> 3\)"):
        check_resume(seed, "auto", new_mixture=True)  # the rest of the order stays fixed
    record_config_change(changed, "auto", new_mixture=True)
    (line,) = (run / "config_history.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["step"] == 4 and record["new_mixture"] is True
    assert record["changed"] == {
        "data.train.shards": [str(tmp_path / "a"), changed.data.train.shards]
    }


def test_restart_moves_the_run_aside_and_deletes_nothing(tmp_path):
    run = make_run(tmp_path / "run", [4, 5])
    (run / "slurm" / "logs").mkdir(parents=True)
    (run / "slurm" / "logs" / "job.out").write_text("a job's log")
    (run / "tensorboard").mkdir()
    outside = tmp_path / "scratch" / "ckpt"
    write_step(outside, 7, "run-a", 2, {})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    aside = set_aside_run(run, outside)
    assert aside.parent == run and aside.name.startswith("replaced-")
    assert sorted(p.name for p in run.iterdir()) == sorted(["slurm", aside.name])
    assert (aside / "checkpoints" / "step5" / "umt_meta.json").is_file()
    assert (aside / "config.yaml").is_file() and (aside / "tensorboard").is_dir()
    assert not outside.exists()
    [moved] = list(outside.parent.glob("ckpt.replaced-*"))
    assert (moved / "step7" / "umt_meta.json").is_file()
    after = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(after) == len(before)  # every file is still somewhere


def test_pruning_deletes_only_this_runs_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    write_step(root, 1, None, 2, {})  # written before runs had ids
    write_step(root, 2, "other-run", 2, {})
    for step in (3, 4, 5, 6):
        write_step(root, step, "this-run", 2, {})
    checkpoint.prune(root, keep=2, run_id="this-run")
    assert sorted(p.name for p in root.glob("step*")) == ["step1", "step2", "step5", "step6"]


def test_another_runs_step_folder_is_never_written_over(tmp_path):
    root = tmp_path / "checkpoints"
    write_step(root, 3, "other-run", 2, {})
    with pytest.raises(checkpoint.CheckpointError, match="holds a checkpoint of another run"):
        checkpoint.save(None, root, 3, {}, {}, keep=2, run_id="this-run")


# --- the global batch on another number of ranks -------------------------------------------------


def test_fewer_ranks_keep_the_global_batch_through_grad_accum(tmp_path, caplog):
    run = make_run(tmp_path / "run", [5], world_size=2)
    ref = checkpoint.find_latest(run / "checkpoints")
    cfg = load_config(None, [*SYNTHETIC, f"output_dir={run}"])
    with caplog.at_level(logging.WARNING, "umt.train"):
        kept = keep_global_batch(cfg, ref, world_size=1, rank=0)
    assert kept.train.grad_accum == 2 * cfg.train.grad_accum
    assert "train.grad_accum 1 -> 2 keeps the global batch at 64 samples per step" in caplog.text
    # 3 ranks cannot split 64 samples into micro-batches of 32: unchanged, and said loudly.
    caplog.clear()
    with caplog.at_level(logging.WARNING, "umt.train"):
        same = keep_global_batch(cfg, ref, world_size=3, rank=0)
    assert same.train.grad_accum == cfg.train.grad_accum
    assert "the global batch changes from 64 to 96 samples per step" in caplog.text
    assert keep_global_batch(cfg, ref, world_size=2, rank=0) is cfg


# --- CPU threads ---------------------------------------------------------------------------------


def test_threads_are_the_ranks_share_of_its_cpus_minus_its_loader_workers(monkeypatch):
    from umt.threads import choose_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    single = choose_threads(0, workers=2, env={})
    assert (single.count, single.sharing) == (14, 1)
    torchrun = choose_threads(
        0, workers=2, env={"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "4"}
    )
    assert (torchrun.count, torchrun.sharing) == (2, 4)
    deepspeed = choose_threads(0, workers=0, env={"LOCAL_SIZE": "8", "LOCAL_RANK": "3"})
    assert (deepspeed.count, deepspeed.sharing) == (2, 8)  # the deepspeed launcher's ranks
    srun = choose_threads(0, workers=1, env={"SLURM_CPUS_PER_TASK": "6", "SLURM_PROCID": "3"})
    assert (srun.count, srun.cpus) == (5, 6)
    assert choose_threads(0, workers=8, env={}).count == 8
    assert choose_threads(0, workers=40, env={}).count == 1  # at least one
    assert choose_threads(3, workers=40, env={}).count == 3  # train.cpu_threads decides
    assert "16 CPUs / 4 local ranks, minus 2 loader workers" in torchrun.describe()
    with pytest.raises(ConfigError, match="train.cpu_threads must be >= 0"):
        load_config(None, [*SYNTHETIC, "train.cpu_threads=-1"])


# --- small things a new user hit ---------------------------------------------------------------


def test_a_mistyped_tokenizer_folder_is_named_and_an_offline_hub_name_fails_at_once(tmp_path):
    from umt.preflight import check_hub_name

    (tmp_path / "tokenizers" / "mine").mkdir(parents=True)
    with pytest.raises(ConfigError) as typo:
        check_hub_name("data.tokenizer", str(tmp_path / "tokenizers" / "mien"))
    assert "does not exist" in str(typo.value) and "holds: mine" in str(typo.value)
    # conftest sets HF_HUB_OFFLINE=1, as an offline cluster node does
    with pytest.raises(ConfigError, match="the Hugging Face Hub is offline"):
        check_hub_name("data.tokenizer", "some-org/some-tokenizer")


def test_config_list_shows_whole_first_sentences():
    from launch.config import first_sentence
    from umt.shipped import configs_dir

    for path in configs_dir().glob("*.yaml"):
        sentence = first_sentence(path.read_text())
        assert sentence.endswith(".") and len(sentence) > 20, path.name
    assert first_sentence("# One, e.g. two.\n# Next line.\nkey: 1\n") == "One, e.g. two."


def test_torchrun_keeps_only_hangup_and_quit_for_itself():
    from launch.torchrun import torchrun_args

    assert torchrun_args(["--nproc_per_node=2", "-m", "launch.train", "x=1"]) == [
        "--nproc_per_node=2", "--signals_to_handle=SIGHUP,SIGQUIT", "-m", "launch.train", "x=1",
    ]  # fmt: skip
    given = ["--signals_to_handle", "SIGTERM,SIGINT,SIGHUP,SIGUSR1,SIGUSR2", "-m", "m"]
    assert torchrun_args(given) == ["--signals_to_handle=SIGHUP,SIGUSR2", "-m", "m"]


def test_saved_checkpoints_record_their_run(tmp_path):
    assert Config().train.cpu_threads == 0
    run = make_run(tmp_path / "run", [1], run_id="abc")
    assert checkpoint.run_of(run / "checkpoints" / "step1") == "abc"
    assert checkpoint.run_of(tmp_path / "nothing") is None
