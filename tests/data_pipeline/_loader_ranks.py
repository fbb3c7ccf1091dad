"""One rank of the loader contract tests (under torchrun, 2 ranks x 2 workers): writes what it saw.

Each scenario iterates the real loader as the trainer would, with a collective per batch (a rank
with fewer batches would fail the run rather than pass), and records each batch's keys, stream
position, round, epoch, shapes and errors in `{out}/{scenario}-rank{r}.json`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from datetime import timedelta
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.loader import LoaderConfig, build_loader


def collective_step() -> None:
    """Stand-in for a training step's all-reduce: ranks with unequal batch counts hang here."""
    dist.all_reduce(torch.ones(1))


def describe(batch) -> dict:
    return {
        "round": batch.round,
        "position": batch.position,
        "epoch": batch.epoch,
        "keys": batch.keys,
        "image_keys": batch.image_keys,
        "pixels": list(batch.pixel_values.shape),
        "pixel_range": [batch.pixel_values.min().item(), batch.pixel_values.max().item()]
        if batch.pixel_values.numel()
        else [],
        "ids": list(batch.input_ids.shape),
        "errors": batch.errors,
        "failures": batch.failures,
    }


def take(loader, n: int) -> list[dict]:
    out = []
    for batch in islice(iter(loader), n):
        collective_step()
        out.append(describe(batch))
    return out


def rounds(cfg: LoaderConfig, rank: int, world: int, n: int) -> dict:
    loader = build_loader(cfg, rank, world)
    batches = take(loader, n)
    return {"batches": batches, "errors": loader.error_counts(), "state": loader.state_dict()}


def resumed(cfg: LoaderConfig, rank: int, world: int, stop_after: int, total: int) -> dict:
    """Uninterrupted run vs stop after `stop_after` batches, JSON round-trip of the state, resume."""
    uninterrupted = take(build_loader(cfg, rank, world), total)
    first = build_loader(cfg, rank, world)
    head = take(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))
    del first
    second = build_loader(cfg, rank, world)
    second.load_state_dict(state)
    tail = take(second, total - stop_after)
    return {"uninterrupted": uninterrupted, "resumed": head + tail, "state": state}


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("out", "clean", "dirty", "mix_a", "mix_b", "tokenizer"):
        parser.add_argument(f"--{name.replace('_', '-')}", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    common = dict(batch_size=3, num_workers=2, seed=7, image_size=8, shuffle_window=12)
    clean = LoaderConfig(shards=args.clean, tokenizer=args.tokenizer, **common)
    keys_only = dict(tokenizer=None, decode_images=False)
    dirty = LoaderConfig(shards=args.dirty, tokenizer=None, **common)
    mixed = LoaderConfig(
        shards=f"a={args.mix_a}:1,b={args.mix_b}:3",
        resampled=True,
        **{**common, "batch_size": 16, "shuffle_window": 64},
        **keys_only,
    )
    results = {
        # 40 samples in rounds of 6: epoch 0 ends inside round 6, whose tail opens epoch 1
        "carry": rounds(clean, rank, world, 14),
        "drop": rounds(replace(clean, epoch_tail="drop", **keys_only), rank, world, 14),
        "resume_clean": resumed(clean, rank, world, stop_after=5, total=9),
        "resume_resampled": resumed(mixed, rank, world, stop_after=5, total=9),
        "resume_dirty": resumed(dirty, rank, world, stop_after=4, total=12),
        "dirty": rounds(dirty, rank, world, 5),  # 5 rounds of 2 x 3: epoch 0 exactly
        "mixed": rounds(mixed, rank, world, 100),
    }
    out = Path(args.out)
    for name, result in results.items():
        (out / f"{name}-rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
