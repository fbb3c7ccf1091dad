"""One `umt train` process against torchrun with one process, on the README's own-data command.

The same run (`configs/tiny_cpu.yaml` on a few hundred shard samples, 2 loader workers, a
tokenizer trained on the captions) under each contender:
- ours: `umt train` as a user types it, one process; each rank picks its CPU threads (umt/threads.py);
- torchrun: `python -m torch.distributed.run --nproc_per_node 1 -m launch.train` (torchrun sets
  OMP_NUM_THREADS=1 for its ranks);
- torch_default: one process with torch's own default, a thread per core
  (`train.cpu_threads` = that count): how `umt train` ran before issue #26;
- ours_again: a second copy of ours, the noise floor.
Runs are interleaved round by round with the order rotated; a run's rate is the median of its
TensorBoard throughput windows after the first (loader start-up and first steps left out).

    python benchmarks/launchers.py [--quick] [--rounds R] [--steps S]

Ends with one line `SUMMARY key=value ...`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONTENDERS = ("ours", "torchrun", "torch_default", "ours_again")


def make_data(root: Path, samples: int) -> tuple[Path, Path]:
    """Shards of the built-in scenes at tiny_cpu's 64 px, and a WordPiece tokenizer on them."""
    from data_pipeline.builtin import write_split
    from data_pipeline.shard import ShardOptions, shard_dataset
    from data_pipeline.tokenizer_training import shard_captions, train_wordpiece

    table = write_split(root / "data", "train", samples, 64)
    options = ShardOptions(image_col="image", caption_col="captions", resize="none", maxcount=64)
    shard_dataset(table, root / "shards", options)
    train_wordpiece(shard_captions(str(root / "shards")), 512, root / "tokenizer")
    return root / "shards", root / "tokenizer"


def command(name: str, out: Path, overrides: list[str], default_threads: int) -> list[str]:
    train = ["--config", "tiny_cpu", f"output_dir={out}", *overrides]
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=1", "-m", "launch.train", *train]  # fmt: skip
    if name == "torch_default":
        train.append(f"train.cpu_threads={default_threads}")
    return [sys.executable, "-m", "launch.cli", "train", *train]


def window_rates(run: Path) -> list[float]:
    """`throughput/samples_per_s` of each TensorBoard window, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        values |= {e.step: e.value for e in acc.Scalars("throughput/samples_per_s")}
    return [values[step] for step in sorted(values)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 40 steps (~4 min)")
    parser.add_argument("--rounds", type=int, help="rounds of all contenders (default 3)")
    parser.add_argument("--steps", type=int, help="steps per run (default 80)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    steps = args.steps or (40 if args.quick else 80)
    default_threads = len(os.sched_getaffinity(0))  # torch's default: a thread per core
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)  # as a user's shell has it
    rates: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    with tempfile.TemporaryDirectory(prefix="umt-launchers-") as tmp:
        root = Path(tmp)
        shards, tokenizer = make_data(root, 512)
        overrides = [
            f"data.train.shards={shards}", f"data.tokenizer={tokenizer}",
            "model.text.vocab_size=512", "data.train.num_workers=2",
            f"train.steps={steps}", "log.every_steps=10", "checkpoint.every_steps=0",
            "train.warmup_steps=5",
        ]  # fmt: skip
        for r in range(rounds):
            order = CONTENDERS[r % len(CONTENDERS) :] + CONTENDERS[: r % len(CONTENDERS)]
            for name in order:
                out = root / f"{name}-{r}"
                proc = subprocess.run(
                    command(name, out, overrides, default_threads),
                    cwd=root, env=env, capture_output=True, text=True, timeout=1800,
                )  # fmt: skip
                if proc.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
                windows = window_rates(out)[1:]  # the first window holds the start-up
                rates[name].append(statistics.median(windows))
                print(
                    f"round {r + 1}/{rounds} {name:<14} {rates[name][-1]:8.1f} samples/s",
                    flush=True,
                )

    median = {name: statistics.median(v) for name, v in rates.items()}
    print(
        f"\n{'contender':<14} {'samples/s (median)':>19} {'min':>8} {'max':>8} {'vs torchrun':>12}"
    )
    for name in CONTENDERS:
        v = rates[name]
        ratio = median[name] / median["torchrun"]
        print(f"{name:<14} {median[name]:>19.1f} {min(v):>8.1f} {max(v):>8.1f} {ratio:>12.2f}")
    print(
        f"\n{default_threads} threads is torch's default here; {rounds} rounds of {steps} steps, "
        f"tiny_cpu, 2 loader workers, micro-batch 32."
    )
    print(
        "SUMMARY "
        f"one_process_vs_torchrun={median['ours'] / median['torchrun']:.2f} "
        f"torch_default_vs_torchrun={median['torch_default'] / median['torchrun']:.2f} "
        f"ours_again_vs_ours={median['ours_again'] / median['ours']:.2f} "
        f"ours_samples_per_s={median['ours']:.1f} rounds={rounds} steps={steps}"
    )


if __name__ == "__main__":
    main()
