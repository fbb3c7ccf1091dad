"""`umt train` on real DeepSpeed ZeRO with 2 gloo ranks: stages, exact and elastic resume, faults, logs."""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TimedRun, free_port, run_timed, run_torchrun, umt_train_ranks

pytestmark = pytest.mark.slow
TRAIN = REPO / "launch" / "train.py"

TINY = [
    "model.preset=tiny",
    "model.text.vocab_size=512",
    "data.train.synthetic=true",
    "data.train.max_text_len=12",
    "train.micro_batch_size=4",
    "train.lr=1e-3",
    "train.warmup_steps=2",
    "log.every_steps=1",
]
MULTIWAY = (
    "model.fusion.type=multiway",
    "model.fusion.vl_expert_layers=1",
    "model.itc_from=fusion",
)


def train(
    out: Path, *overrides: str, nproc: int = 2, resume: str = "none", env=None, check=True, flags=()
):
    return run_torchrun(
        TRAIN,
        "--resume",
        resume,
        *flags,
        f"output_dir={out}",
        *TINY,
        *overrides,
        nproc=nproc,
        env=env,
        check=check,
    )


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of a TensorBoard scalar (a later event file overrides an earlier one)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values |= {e.step: e.value for e in acc.Scalars(tag)}
    return values


def consolidated(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_and_loss_goes_down_on_a_fixed_batch(tmp_path, stage):
    """Each ZeRO stage trains, its loss falls and its export equals DeepSpeed's consolidation.
    The ZeRO-2 run has modality experts (multiway fusion; ZeRO-3 with experts: the kill -9 test
    below): every expert is partitioned, trained and exported."""
    out = tmp_path / f"zero{stage}"
    fusion = MULTIWAY if stage == 2 else ()
    train(out, f"zero.stage={stage}", *fusion, "data.train.synthetic_distinct=1", "train.steps=8")
    loss = scalars(out, "loss/total")
    assert sorted(loss) == list(range(1, 9))
    assert loss[8] < 0.8 * loss[1], loss
    assert (out / "checkpoints" / "latest").read_text() == "step8"
    assert_export_round_trip(out)
    if fusion:
        weights = consolidated(out, "step8")
        assert any(".experts.vl." in k for k in weights)
        assert any(".experts.text." in k for k in weights)


def assert_export_round_trip(run_dir: Path) -> None:
    """`umt export`'s function + `umt.load` give DeepSpeed's own zero_to_fp32 consolidation, and a
    working model (in this process: the command and the checkpoint's zero_to_fp32.py script run as
    processes in test_hf_export and test_daily_jobs)."""
    import umt
    from umt.export import export_checkpoint

    export = export_checkpoint(run_dir / "checkpoints", run_dir / "export")
    latest = (run_dir / "checkpoints" / "latest").read_text()
    reference = consolidated(run_dir, latest)
    model, processor = umt.load(export)
    ours = model.state_dict()
    assert reference and set(reference) <= set(ours)
    assert all(torch.equal(ours[k], v) for k, v in reference.items())
    with torch.no_grad():
        from PIL import Image

        pixels = processor(images=[Image.new("RGB", (50, 40), (200, 30, 30))])["pixel_values"]
        assert model.encode_image(pixels).shape == (1, 32)


SAVED_EVERY_2 = ("zero.stage=2", "train.steps=8", "checkpoint.every_steps=2", "checkpoint.keep=10")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    train(out, *SAVED_EVERY_2)
    return out


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory) -> tuple[Path, Path]:
    """Real webdataset shards of the built-in dataset (made by the sharder) and their tokenizer."""
    from data_pipeline.builtin import write_split, write_tokenizer
    from data_pipeline.shard import ShardOptions, shard_dataset

    root = tmp_path_factory.mktemp("demo_data")
    table = write_split(root / "data", "train", 96, 32)
    options = ShardOptions(image_col="image", caption_col="captions", resize="none", maxcount=12)
    shard_dataset(table, root / "shards", options)
    return root / "shards", write_tokenizer(root / "tokenizer")


ASYNC = (*SAVED_EVERY_2, "checkpoint.async_save=true")


@pytest.fixture(scope="module")
def killed_in_background_write(tmp_path_factory) -> tuple[Path, TimedRun]:
    """checkpoint.async_save: rank 1 is SIGKILLed in the middle of its background write of step
    4; rank 0 goes on into step 5 and blocks there in a native call that no collective error
    wakes (as a rank waiting in NCCL for a dead peer would)."""
    out = tmp_path_factory.mktemp("async") / "killed"
    cmd = umt_train_ranks(out, "--resume", "none", *TINY, *ASYNC, "train.collective_timeout_min=10")
    env = {"UMT_FAULT_KILL_IN_CHECKPOINT_WRITE": "4:1", "UMT_FAULT_HANG_AT_STEP": "5:0"}
    return out, run_timed(cmd, env=env)


def test_a_dead_rank_ends_every_rank_within_a_minute_with_the_survivors_report(
    killed_in_background_write,
):
    out, run = killed_in_background_write
    assert run.seconds_after("fault: SIGKILL in the background write of step 4") < 60
    # torchrun SIGTERMs rank 0, whose handler cannot run: its watchdog reports and exits
    assert run.returncode == 75, run.output[-6000:]
    report = (out / "hangs" / "step5" / "rank0.txt").read_text()
    assert "reason: a stop signal came" in report and "in block_forever" in report
    summary = (out / "hangs" / "step5" / "summary.txt").read_text()
    assert "look first at rank(s) 1: no report (dead?)" in summary


def test_a_kill_in_a_background_write_leaves_latest_on_the_previous_checkpoint(
    killed_in_background_write, uninterrupted
):
    out, _ = killed_in_background_write
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step2"  # rank 0 wrote all of step 4, rank 1 not
    assert (ckpt / "step4" / "rank0.pt").is_file() and not (ckpt / "step4" / "rank1.pt").exists()
    resumed = train(out, *ASYNC, resume="auto")
    assert f"resumed from {ckpt / 'step2'}" in resumed.stderr
    # asynchronous saves resume to the synchronous run's weights and losses, bit for bit
    assert_same_weights(consolidated(out, "step8"), consolidated(uninterrupted, "step8"))
    assert scalars(out, "loss/total") == scalars(uninterrupted, "loss/total")


def test_tensorboard_has_the_documented_scalars(uninterrupted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((uninterrupted / "tensorboard").glob("events.*"))))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {
        "loss/total",
        "loss/itc",
        "loss/itm",
        "itm/accuracy",
        "itc/accuracy_i2t",
        "itc/accuracy_t2i",
        "lr",
        "logit_scale",
        "grad_norm",
        "throughput/samples_per_s",
        "throughput/samples_per_s_per_rank",
        "time/data_wait_fraction",
        "memory/rss_peak_gib",
        "stragglers/max_over_median",
        "stragglers/slowest_rank",
        "stragglers/median_step_s",
    }
    assert expected <= tags, expected - tags


def test_a_one_process_cpu_run_starts_fresh_with_torch_adamw_and_builds_no_deepspeed_op(tmp_path):
    """One run, three checks: `--resume auto` without a checkpoint starts fresh and says so;
    train.optimizer=auto is torch's AdamW on a CPU-only run; DeepSpeed's inference-only
    shared-memory all-reduce is not JIT-built (~50 s) on CPU."""
    out, extensions = tmp_path / "fresh", tmp_path / "torch_extensions"
    proc = train(
        out, "train.steps=1", nproc=1, resume="auto", env={"TORCH_EXTENSIONS_DIR": str(extensions)}
    )
    assert "no complete checkpoint" in proc.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step1"
    assert "optimizer AdamW (train.optimizer=auto)" in proc.stderr
    assert not extensions.exists() or not any(extensions.iterdir())


def test_resume_from_a_path_that_does_not_load_fails_loudly(tmp_path):
    proc = train(
        tmp_path / "x", "train.steps=1", nproc=1, resume=str(tmp_path / "nowhere"), check=False
    )
    assert proc.returncode != 0  # torchrun's own exit code
    assert f"umt train: --resume {tmp_path / 'nowhere'}: no such file or folder" in proc.stderr


def test_a_non_finite_loss_is_skipped_and_counted(tmp_path):
    out = tmp_path / "nan"
    train(out, "train.steps=4", env={"UMT_FAULT_NAN_AT_STEP": "2"})
    skipped = scalars(out, "train/nonfinite_skipped")
    assert skipped[1] == 0 and skipped[2] == 1 and skipped[4] == 1
    assert all(torch.isfinite(torch.tensor(v)) for v in scalars(out, "loss/total").values())


def test_consecutive_non_finite_losses_stop_with_a_clear_message(tmp_path):
    out = tmp_path / "nan_stop"
    proc = train(
        out,
        "train.steps=4",
        "train.max_nonfinite=1",
        "checkpoint.every_steps=1",
        env={"UMT_FAULT_NAN_AT_STEP": "3"},
        check=False,
    )
    assert proc.returncode != 0
    assert "non-finite losses at step 3" in proc.stderr
    assert "last checkpoint:" in proc.stderr and "step2" in proc.stderr


@pytest.fixture(scope="module")
def itc_only_run(tmp_path_factory) -> Path:
    """2 ranks x 4 samples, ITC only: the global gradient does not depend on the rank split."""
    out = tmp_path_factory.mktemp("itc_only")
    train(out, *ELASTIC, "train.steps=6", "checkpoint.every_steps=1", "checkpoint.keep=10")
    return out


ELASTIC = ("zero.stage=2", "objectives.itm_weight=0")


def assert_close_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        err = (a[k] - b[k]).abs().max().item()
        assert err <= atol, f"{k}: {err:.2e}"


def test_elastic_resume_2_to_1_to_2_ranks_continues_the_same_run(tmp_path, itc_only_run):
    ref = itc_only_run
    one = tmp_path / "one_rank"
    proc = train(
        one,
        *ELASTIC,
        "train.steps=6",
        "checkpoint.every_steps=1",
        "train.micro_batch_size=8",  # the same global batch on 1 rank
        nproc=1,
        resume=str(ref / "checkpoints" / "step4"),
    )
    assert "converted from 2 to 1 ranks" in proc.stderr
    # Same weights, optimizer moments and schedule: the run matches the 2-rank one up to the
    # order of float additions (a lost Adam state would move weights by ~lr = 1e-3).
    assert_close_weights(consolidated(one, "step6"), consolidated(ref, "step6"), atol=5e-6)
    lr_one, lr_ref = scalars(one, "lr"), scalars(ref, "lr")
    assert sorted(lr_one) == [5, 6]
    assert [lr_one[s] for s in (5, 6)] == pytest.approx([lr_ref[s] for s in (5, 6)], rel=1e-9)

    two = tmp_path / "two_ranks"
    proc = train(two, *ELASTIC, "train.steps=6", nproc=2, resume=str(one / "checkpoints" / "step5"))
    assert "converted from 1 to 2 ranks" in proc.stderr
    assert_close_weights(consolidated(two, "step6"), consolidated(ref, "step6"), atol=5e-6)
    # The flag is off again: the new checkpoint is an ordinary 2-rank ZeRO checkpoint.
    resumed = train(two, *ELASTIC, "train.steps=7", nproc=2, resume="auto")
    assert "converted" not in resumed.stderr and "resumed from" in resumed.stderr


def test_the_deepspeed_launcher_runs_the_same_entry_point(tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "ds_launcher"
    cmd = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
        "--master_port", str(free_port()),
        str(TRAIN), f"output_dir={out}", *TINY, "train.steps=2",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # its 2 ranks share the CPUs (it once gave each all of them: 2x oversubscribed)
    assert re.search(r"torch CPU threads per rank: \d+ \(\d+ CPUs / 2 local ranks", proc.stderr)
    meta = (out / "checkpoints" / "step2" / "umt_meta.json").read_text()
    assert '"world_size": 2' in meta


def test_train_augmentation_options_reach_the_loader(demo_shards):
    """`data.train.crop_scale` / `hflip` and `data.jpeg_draft` configure the loader; a bad value
    fails with its key."""
    from umt.config import load_config
    from umt.train_data import build_train_data

    shards, tokenizer = demo_shards
    base = [
        f"data.train.shards={shards}",
        f"data.tokenizer={tokenizer}",
        "data.train.num_workers=0",
    ]
    options = ["data.train.crop_scale=[1.0,1.0]", "data.train.hflip=true", "data.jpeg_draft=false"]
    cfg = load_config(None, [*base, *options])
    loader = build_train_data(cfg, rank=0, world_size=1)
    assert (loader.cfg.crop_scale, loader.cfg.hflip, loader.cfg.jpeg_draft) == (
        (1.0, 1.0),
        True,
        False,
    )
    with pytest.raises(ValueError, match="data.train.crop_scale"):  # at config time now
        load_config(None, [*base, "data.train.crop_scale=[0.9,0.5]"])
    with pytest.raises(ValueError, match="data.jpeg_draft"):
        load_config(None, [*base, "data.jpeg_draft=sometimes"])


def test_a_step_reads_device_values_back_twice_at_most(tmp_path):
    """Steps that do not log read two values from the device (each a host-device sync on a GPU):
    the ITM fetch plan and the fused (non-finite, stop) flags. Counted on 2 ranks by intercepting
    every torch call that would read back (`.item()`, truth tests, boolean indexing ...)."""
    import json

    out = tmp_path / "reads.json"
    run_torchrun(
        REPO / "tests" / "_ranks_host_syncs.py", str(out), f"output_dir={tmp_path / 'run'}",
        *TINY, "log.every_steps=1000", "train.steps=100",
    )  # fmt: skip
    for rank in (0, 1):
        result = json.loads((tmp_path / f"reads-rank{rank}.json").read_text())
        # data_pipeline/: the synthetic batches are built on the host, never on the device
        ours = {k: v for k, v in result["ours"].items() if k.startswith("umt/")}
        sites = sorted(k.split(":")[0] for k in ours)
        assert sites == ["umt/objectives/pretrain.py", "umt/train.py"], ours
        assert sum(ours.values()) == 2 * result["steps"], ours
        # The text tower gets a 4-D mask: HF's check whether the mask can be dropped is gone.
        assert not [k for k in result["others"] if k.startswith("transformers/")], result


def test_offloaded_optimizer_states_get_deepspeeds_cpu_adam(tmp_path):
    """train.optimizer=auto with zero.offload_optimizer=cpu: DeepSpeed builds its vectorised CPU
    Adam (its op is compiled on first use, ~1 min once per machine)."""
    proc = train(tmp_path / "offload", "train.steps=2", "zero.offload_optimizer=cpu", nproc=1)
    assert "optimizer DeepSpeedCPUAdam (train.optimizer=auto)" in proc.stderr
    loss = scalars(tmp_path / "offload", "loss/total")
    assert sorted(loss) == [1, 2]


def test_a_failing_evaluation_comes_after_that_steps_checkpoint(tmp_path):
    """Evaluation runs after the checkpoint of its step: when it fails, the steps before it are
    saved (it ran first, so a run whose evaluation fails resumed from the previous checkpoint and
    failed again, forever)."""
    out = tmp_path / "eval_fails"
    proc = train(
        out, "train.steps=4", "checkpoint.every_steps=2", "eval.every_steps=2",
        f"data.eval.shards={tmp_path / 'no_such_shards'}", nproc=1, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert (out / "checkpoints" / "latest").read_text() == "step2"


def sample_log(run_dir: Path) -> dict[int, list[str]]:
    """step -> the sorted keys every rank trained on in that step (data.log_sample_keys)."""
    steps: dict[int, list[str]] = {}
    for path in sorted((run_dir / "sample_keys").glob("rank*.txt")):
        for line in path.read_text().splitlines():
            step, *keys = line.split()
            steps.setdefault(int(step), []).extend(keys)
    return {step: sorted(keys) for step, keys in steps.items()}


def test_resume_on_another_topology_continues_the_same_global_steps(tmp_path, demo_shards):
    """A mixture of three sources (x1, x0.5, x1.5: 48 + 12 + 36 = 96 samples an epoch, keys
    `source/key`): 2 ranks x 2 workers stopped mid-epoch, resumed on 1 rank x 3 workers with
    grad_accum 2 (the same global batch of 8): every step trains on the samples of the
    uninterrupted run's step. Resumed on 3 ranks with a global batch of 6 instead: epoch 0 still
    gives each sample its count. Then a new mixture, refused naming its sources without
    --new-mixture: with it, steps <= 14 stay as they were and the next epoch has the new counts."""
    shards, tokenizer = demo_shards
    part = str(shards / "data-{{{}..{}}}.tar")
    mixture = (
        f"a={part.format('000000', '000003')},b={part.format('000004', '000005')}:x0.5,"
        f"c={part.format('000006', '000007')}:x1.5"
    )
    common = (
        f"data.tokenizer={tokenizer}", "data.train.synthetic=false",
        "data.log_sample_keys=true", "data.train.shuffle_window=24", "model.text.vocab_size=25",
        "model.image.image_size=32", "zero.stage=2", "checkpoint.every_steps=4",
        "checkpoint.keep=5",
    )  # fmt: skip
    common_m1 = (*common, f"data.train.shards={mixture}")
    two_ranks = ("data.train.num_workers=2", "train.micro_batch_size=4")
    reference = tmp_path / "reference"
    train(reference, *common_m1, *two_ranks, "train.steps=14")  # 12 steps an epoch
    want = sample_log(reference)
    assert sorted(want) == list(range(1, 15)) and all(len(k) == 8 for k in want.values())
    epoch0 = Counter(k for step in range(1, 13) for k in want[step])
    assert Counter(k.split("/")[0] for k in epoch0.elements()) == {"a": 48, "b": 12, "c": 36}
    assert Counter(n for k, n in epoch0.items() if k.startswith("c/")) == {1: 12, 2: 12}
    assert max(n for k, n in epoch0.items() if not k.startswith("c/")) == 1

    run = tmp_path / "run"
    killed = train(run, *common_m1, *two_ranks, "train.steps=14", env={"UMT_FAULT_KILL_AT_STEP": "6"}, check=False)  # fmt: skip
    assert killed.returncode != 0 and (run / "checkpoints" / "latest").read_text() == "step4"
    one_rank = ("data.train.num_workers=3", "train.micro_batch_size=4", "train.grad_accum=2")
    resumed = train(run, *common_m1, *one_rank, "train.steps=14", nproc=1, resume="auto")
    assert "converted from 2 to 1 ranks" in resumed.stderr
    assert sample_log(run) == want  # steps 5 and 6 of the killed run were dropped and redone

    three = tmp_path / "three_ranks"
    resume = str(run / "checkpoints" / "step4")
    train(three, *common_m1, "train.micro_batch_size=2", "train.steps=15", nproc=3, resume=resume)
    later = sample_log(three)
    assert sorted(later) == list(range(5, 16))  # (96 - 32) / 6: 11 steps to finish epoch 0
    seen = Counter([k for step in range(1, 5) for k in want[step]])
    seen.update(k for keys in later.values() for k in keys)
    assert not epoch0 - seen and seen.total() == 32 + 11 * 6  # epoch 1 opens the last step

    new = f"a={part.format('000000', '000003')}:x0.5,c={part.format('000006', '000007')}"
    changed = (*common, f"data.train.shards={new}", *one_rank, "train.steps=20")
    refused = train(run, *changed, nproc=1, resume="auto", check=False)
    assert refused.returncode != 0, refused.stderr[-2000:]
    assert "source b removed; source a: x1 -> x0.5; source c: x1.5 -> x1" in refused.stderr
    assert "--new-mixture" in refused.stderr
    train(run, *changed, nproc=1, resume="auto", flags=("--new-mixture",))
    steps = sample_log(run)
    assert {s: steps[s] for s in range(1, 15)} == want  # the steps before the change are kept
    phase = Counter(k.split("/")[0] for s in range(15, 21) for k in steps[s])
    assert phase == {"a": 24, "c": 24}  # 6 steps of 8: one whole epoch of the new mixture
    assert len({k for s in range(15, 21) for k in steps[s]}) == 48  # x0.5 and x1: none twice
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["new_mixture"] is True and history[-1]["step"] == 14
    meta = json.loads((run / "checkpoints" / "step20" / "umt_meta.json").read_text())
    assert [p["start"] for p in meta["data"]["phases"]] == [0, 112]
    b_seen = sum(k.startswith("b/") for s in range(1, 15) for k in want[s])
    assert meta["data"]["seen"]["b"] == b_seen and sum(meta["data"]["seen"].values()) == 160
    samples = {n: scalars(run, f"data/samples/{n}")[20] for n in ("a", "b", "c")}
    assert samples == meta["data"]["seen"]  # TensorBoard's data/samples/<source>


def test_one_contrastive_batch_per_step_trains_as_one_micro_batch_and_resumes(
    tmp_path, demo_shards
):
    """2 ranks x 2 loader workers on real shards (random caption, shuffle window), fp32, ZeRO-2:
    `contrastive_batch: step` with 4 micro-batches of 4 logs the ITC and ITM losses of `micro`
    mode with one micro-batch of 16 at every step (same samples per step). A kill -9 after step
    9, between checkpoints (work is lost), and `--resume auto` reach the same weights and every
    step's logged loss, bit for bit; the resumed part (steps 7-14) crosses an epoch's end (96
    samples: 6 steps each)."""
    shards, tokenizer = demo_shards
    common = (
        f"data.train.shards={shards}", f"data.tokenizer={tokenizer}", "data.train.synthetic=false",
        "model.text.vocab_size=25", "model.image.image_size=32", "data.train.num_workers=2",
        "data.train.shuffle_window=16", "data.train.caption=random", "zero.stage=2",
        "train.steps=14", "checkpoint.every_steps=3",
    )  # fmt: skip
    step = ("objectives.contrastive_batch=step", "train.micro_batch_size=4", "train.grad_accum=4")
    train(tmp_path / "micro", *common, "train.micro_batch_size=16")
    train(tmp_path / "step", *common, *step)
    for tag in ("loss/itc", "loss/itm"):
        want, got = scalars(tmp_path / "micro", tag), scalars(tmp_path / "step", tag)
        assert sorted(got) == list(range(1, 15))
        for s in want:
            assert got[s] == pytest.approx(want[s], rel=1e-5), f"{tag} at step {s}"
    killed = tmp_path / "killed"
    crash = train(killed, *common, *step, env={"UMT_FAULT_KILL_AT_STEP": "9"}, check=False)
    assert crash.returncode != 0 and (killed / "checkpoints" / "latest").read_text() == "step6"
    resumed = train(killed, *common, *step, resume="auto")
    assert f"resumed from {killed / 'checkpoints' / 'step6'}" in resumed.stderr
    assert_same_weights(consolidated(killed, "step14"), consolidated(tmp_path / "step", "step14"))
    assert scalars(killed, "loss/total") == scalars(tmp_path / "step", "loss/total")


def test_data_with_no_decodable_image_ends_training_in_one_line(tmp_path):
    import tarfile

    from tests.data_pipeline.loader_fixtures import write_dataset, write_tar

    write_dataset(tmp_path / "bad", [8])
    path = tmp_path / "bad" / "data-000000.tar"
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    write_tar(path, [(n, b"not an image" if n.endswith(".jpg") else d) for n, d in members])
    proc = train(
        tmp_path / "run", f"data.train.shards={tmp_path / 'bad'}", "data.train.synthetic=false",
        "data.tokenizer=" + str(write_demo_tokenizer(tmp_path)), "model.text.vocab_size=25",
        "train.steps=2", "data.train.num_workers=1", nproc=1, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    message = [line for line in proc.stderr.splitlines() if line.startswith("umt train:")]
    assert len(message) == 1 and "data-000000.tar" in message[0]
    assert "corrupt_image" in message[0]
    # torchrun reports a rank's non-zero exit with its own traceback; none comes from our code
    assert not re.search(r'File ".*/(umt|data_pipeline|launch)/', proc.stderr), proc.stderr


def write_demo_tokenizer(folder: Path) -> Path:
    from data_pipeline.builtin import write_tokenizer

    return write_tokenizer(folder / "tokenizer")


def run_until_stalled(tmp_path: Path, stall_s: int) -> tuple[subprocess.Popen, Path]:
    """`umt train` (one process) whose data stalls before step 3; returns once the stall began."""
    import os
    import sys

    out = tmp_path / "stall"
    cmd = [sys.executable, str(TRAIN), f"output_dir={out}", *TINY, "train.steps=6",
           "checkpoint.every_steps=1", "log.every_steps=1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "UMT_FAULT_DATA_STALL": f"3:{stall_s}"}  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # blocks until the trainer reports the stall
        if "fault: data stall" in line:
            return proc, out
    raise AssertionError(f"the trainer never stalled (rc={proc.wait()})")


def test_a_signal_during_a_data_stall_that_ends_checkpoints_that_step(tmp_path):
    import signal

    proc, out = run_until_stalled(tmp_path, stall_s=3)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, rest[-3000:]
    assert "stop requested while waiting for data" in rest
    assert (out / "checkpoints" / "latest").read_text() == "step3"  # the batch came: saved


def test_a_signal_during_a_data_stall_that_lasts_ends_the_run_in_one_line(tmp_path):
    import signal

    proc, out = run_until_stalled(tmp_path, stall_s=3600)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 1, rest[-3000:]
    assert "umt train: stopped by SIGTERM while waiting for data for step 3" in rest
    assert f"last checkpoint: {out / 'checkpoints' / 'step2'}" in rest
    assert "Traceback" not in rest


def test_training_from_s3_and_http_equals_local_and_ranks_share_one_cache(tmp_path, demo_shards):
    """2 ranks x 2 workers from moto's S3 endpoint and from nginx: the same weights, bit for bit,
    as from local disk; one node cache shared by both ranks fetches each shard once."""
    from tests.storage_servers import moto_s3, nginx

    shards, tokenizer = demo_shards
    common = (
        f"data.tokenizer={tokenizer}", "data.train.synthetic=false", "data.train.num_workers=2",
        "data.train.shuffle_window=24", "model.text.vocab_size=25", "model.image.image_size=32",
        "zero.stage=2", "train.steps=4", "checkpoint.every_steps=4",
    )  # fmt: skip
    train(tmp_path / "local", *common, f"data.train.shards={shards}")
    want = consolidated(tmp_path / "local", "step4")
    with moto_s3() as s3:
        url = s3.upload_folder(shards, "demo/shards")
        train(
            tmp_path / "s3", *common, f"data.train.shards={url}",
            f"data.cache_dir={tmp_path / 's3_cache'}",
        )  # fmt: skip
    assert_same_weights(consolidated(tmp_path / "s3", "step4"), want)
    with nginx(shards.parent, tmp_path / "nginx") as http:
        train(
            tmp_path / "http", *common, f"data.train.shards={http.base}/{shards.name}/",
            f"data.cache_dir={tmp_path / 'http_cache'}",
        )  # fmt: skip
        # Whole-shard downloads answer 200 (range reads while a copy is on its way, 206)
        fetched = {
            tar.name: http.requests(f"/{shards.name}/{tar.name}").count(200)
            for tar in shards.glob("*.tar")
        }
    assert_same_weights(consolidated(tmp_path / "http", "step4"), want)
    assert set(fetched.values()) == {1}, fetched  # 2 ranks x 2 workers, one download per shard


def test_ranks_that_skip_different_samples_log_together(tmp_path):
    """Bad samples fall on some ranks only: the data counters every rank logs have the same
    names (a key only one rank had broke the logging all-reduce), summed over ranks."""
    from tests.data_pipeline.loader_fixtures import write_dirty_dataset

    valid, bad = write_dirty_dataset(tmp_path / "dirty", [6, 6, 6, 6, 6])  # 30 samples
    out = tmp_path / "run"
    train(
        out, f"data.train.shards={tmp_path / 'dirty'}", "data.train.synthetic=false",
        "data.tokenizer=" + str(write_demo_tokenizer(tmp_path)), "model.text.vocab_size=25",
        "train.micro_batch_size=3", "train.steps=5", "data.train.num_workers=1",
    )  # fmt: skip
    logged = {r: scalars(out, f"data/errors_{r}").get(5, 0) for r in set(bad.values())}
    assert logged == Counter(bad.values())  # 5 steps of 2 x 3: epoch 0 exactly
    records = [json.loads(line) for p in (out / "data_errors").glob("rank*.jsonl") for line in p.read_text().splitlines()]  # fmt: skip
    assert len(records) == len(bad) and {r["reason"] for r in records} == set(bad.values())


# One contrastive batch per step, with MLM: under ZeRO-3 every pass goes through the engine.
STEP_MODE = (
    "objectives.contrastive_batch=step", "train.grad_accum=2", "model.mlm=true",
    "objectives.mlm_weight=1.0",
)  # fmt: skip


def test_multiway_training_resumes_bit_identical_after_kill_9(tmp_path):
    """Modality experts under ZeRO-3 (every expert partitioned and trained, the one-modality
    passes included) with one contrastive batch per step and MLM: killed between checkpoints,
    resumed, equal to the bit. (ZeRO-2 with experts: the ZeRO stage test.)"""
    common = (
        *MULTIWAY, *STEP_MODE, "zero.stage=3", "train.steps=5", "checkpoint.every_steps=2",
    )  # fmt: skip
    train(tmp_path / "whole", *common)
    killed = train(tmp_path / "killed", *common, env={"UMT_FAULT_KILL_AT_STEP": "4"}, check=False)
    assert killed.returncode != 0
    train(tmp_path / "killed", *common, resume="auto")
    whole, resumed = (
        consolidated(tmp_path / "whole", "step5"),
        consolidated(tmp_path / "killed", "step5"),
    )
    assert any(".experts.vl." in k for k in whole) and any(".experts.text." in k for k in whole)
    assert_same_weights(resumed, whole)
    assert scalars(tmp_path / "killed", "loss/total") == scalars(tmp_path / "whole", "loss/total")
