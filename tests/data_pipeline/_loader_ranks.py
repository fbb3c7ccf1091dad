"""One rank of the loader contract tests (run under torchrun, 2 ranks x 2 workers): writes what it saw as JSON.

Each scenario iterates the real loader as the trainer would, with a collective per batch (so a
rank with fewer batches would fail the run rather than pass), and records batch keys, epochs,
indices, shapes and error counters in `{out}/{scenario}-rank{r}.json` for the test to check.
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
        "epoch": batch.epoch,
        "index": batch.index,
        "keys": batch.keys,
        "image_keys": batch.image_keys,
        "pixels": list(batch.pixel_values.shape),
        "pixel_range": [batch.pixel_values.min().item(), batch.pixel_values.max().item()]
        if batch.pixel_values.numel()
        else [],
        "ids": list(batch.input_ids.shape),
        "mask_sum": int(batch.attention_mask.sum()),
    }


def take(loader, n: int) -> list[dict]:
    out = []
    for batch in islice(iter(loader), n):
        collective_step()
        out.append(describe(batch))
    return out


def two_epochs(cfg: LoaderConfig, rank: int, world: int) -> dict:
    loader = build_loader(cfg, rank, world)
    per_epoch = loader.batches_per_epoch
    batches = take(loader, 2 * per_epoch)
    return {"batches_per_epoch": per_epoch, "batches": batches, "errors": loader.error_counts()}


def resumed(cfg: LoaderConfig, rank: int, world: int, stop_after: int) -> dict:
    """Uninterrupted run vs stop after `stop_after` batches, JSON round-trip of the state, resume."""
    loader = build_loader(cfg, rank, world)
    total = loader.batches_per_epoch + stop_after + 1  # the resumed part crosses an epoch boundary
    uninterrupted = take(loader, total)
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
    for name in ("out", "clean", "uniform", "dirty", "mix_a", "mix_b", "tokenizer"):
        parser.add_argument(f"--{name.replace('_', '-')}", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    common = dict(batch_size=3, num_workers=2, seed=7, image_size=8, shuffle_buffer=4)
    clean = LoaderConfig(shards=args.clean, tokenizer=args.tokenizer, **common)
    dirty = LoaderConfig(shards=args.dirty, tokenizer=None, **common)
    keys_only = dict(tokenizer=None, decode_images=False)
    mixed = LoaderConfig(
        shards=f"a={args.mix_a}:1,b={args.mix_b}:3",
        resampled=True,
        **{**common, "batch_size": 16, "shuffle_buffer": 64},
        **keys_only,
    )
    results = {
        "pad": two_epochs(clean, rank, world),
        "drop": two_epochs(replace(clean, on_uneven="drop", persistent_workers=False), rank, world),
        "even": two_epochs(LoaderConfig(shards=args.uniform, **common, **keys_only), rank, world),
        "resume_clean": resumed(clean, rank, world, stop_after=5),
        "resume_resampled": resumed(mixed, rank, world, stop_after=5),
        "resume_dirty": resumed(dirty, rank, world, stop_after=4),
        "dirty": two_epochs(dirty, rank, world),
        "mixed": {"batches": take(build_loader(mixed, rank, world), 100)},
    }
    out = Path(args.out)
    for name, result in results.items():
        (out / f"{name}-rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
