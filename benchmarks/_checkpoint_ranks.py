"""One rank of benchmarks/checkpoint_blocking.py (under torchrun): one Trainer, its saves timed
synchronously and asynchronously on the same state, interleaved round by round."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.loader.config import LoaderDataError  # noqa: E402,F401 - the trainer's imports first
from umt import distributed  # noqa: E402
from umt.config import load_config  # noqa: E402
from umt.data_wait import DataWaiter  # noqa: E402
from umt.logs import setup_logging  # noqa: E402
from umt.train import Trainer  # noqa: E402


def folder_mib(path: Path, rank: int) -> float:
    """This rank's files of one checkpoint (rank 0 also writes the model's weights)."""
    mine = [p for p in path.iterdir() if f"rank_{rank}_" in p.name or p.name == f"rank{rank}.pt"]
    if rank == 0:
        mine += list(path.glob("mp_rank_*_model_states.pt"))
    return sum(p.stat().st_size for p in mine) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    cfg = load_config(
        None,
        [
            f"model.preset={args.preset}", "data.train.synthetic=true",
            "train.micro_batch_size=2", "data.train.max_text_len=16", "train.steps=1000",
            "zero.stage=2", "log.tensorboard=false", "checkpoint.keep=2",
            "checkpoint.async_save=true", f"output_dir={out / 'run'}",
        ],
    )  # fmt: skip
    rank = distributed.discover_world().rank
    setup_logging(rank, level=30)  # warnings only: the saves' own lines would be noise here
    trainer = Trainer(cfg, resume="none")
    writer = trainer.background
    background_engine = trainer.engine.checkpoint_engine
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    torch_engine = TorchCheckpointEngine(trainer.engine._config)
    batches = DataWaiter(trainer.data)
    for _ in range(2):  # Adam's moments exist after the first step: the state has its full size
        trainer.train_step(batches)

    def save(mode: str) -> dict:
        trainer.state.step += 1  # a new tag per save
        if mode == "sync":
            trainer.background, trainer.engine.checkpoint_engine = None, torch_engine
        else:
            trainer.background, trainer.engine.checkpoint_engine = writer, background_engine
        distributed.barrier()
        started = time.perf_counter()
        path = trainer.save_checkpoint()
        blocked = time.perf_counter() - started
        waited_before = writer.copy_wait_s
        step_s = trainer.train_step(batches).elapsed_s  # training goes on (during the write)
        copy_wait = writer.copy_wait_s - waited_before if mode == "async" else 0.0
        started = time.perf_counter()
        if mode == "async":
            writer.wait()
        return {"blocked_s": blocked + copy_wait, "copy_wait_s": copy_wait, "next_step_s": step_s,
                "then_waited_s": time.perf_counter() - started, "mib": folder_mib(path, rank)}  # fmt: skip

    results: dict[str, list[dict]] = {"sync": [], "async": []}
    for r in range(args.rounds):
        for mode in ("sync", "async") if r % 2 == 0 else ("async", "sync"):
            results[mode].append(save(mode))
    plain_steps = [trainer.train_step(batches).elapsed_s for _ in range(3)]
    record = {
        "rank": rank,
        "sync": results["sync"],
        "async": results["async"],
        "plain_step_s": statistics.median(plain_steps),
        "host_buffers_mib": writer.copies.bytes_held / 2**20,
        "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    everyone = distributed.all_gather_object(record)
    if rank == 0:
        (out / "ranks.json").write_text(json.dumps(everyone))
    batches.close()
    distributed.shutdown()
    os._exit(0)  # the trainer's threads (watchdog, writer) need no orderly end here


if __name__ == "__main__":
    main()
