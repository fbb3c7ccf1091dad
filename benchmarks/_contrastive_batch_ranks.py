"""One rank of `benchmarks/contrastive_batch.py` (torchrun, gloo): optimizer steps of ITC + ITM
on synthetic batches, one contrastive batch per micro-batch (`micro`) or per step (`step`), and
this rank's peak RSS above the RSS before the measured steps and its median step time.

The step is the model's objective, its backward, the gradients averaged over ranks (as DDP or
DeepSpeed ZeRO-0 does) and AdamW: the same in both modes, DeepSpeed's own engine left out so
that the difference is the contrastive batch's alone. Rank 0 writes every rank's record (JSON)
to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from umt.cached_step import ContrastiveStep, MicroBatchInputs  # noqa: E402
from umt.model import build_model, preset_config  # noqa: E402
from umt.objectives import ObjectiveConfig, mix_seed  # noqa: E402
from umt.objectives.step import StepLayout  # noqa: E402

IMAGE_SIZE, PATCH, TEXT_LEN = 64, 8, 32  # 65 image tokens, 32 text tokens: the towers weigh


def model_config():
    cfg = preset_config("tiny")
    cfg.image.image_size, cfg.image.patch_size = IMAGE_SIZE, PATCH
    cfg.text.vocab_size = 1000
    return cfg


def status_bytes(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) * 1024


def reset_peak() -> int:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return status_bytes("VmRSS")


def micro_batch(step: int, positions: torch.Tensor):
    """Deterministic inputs of the samples at these positions of step `step`."""
    g = torch.Generator().manual_seed(step * 1_000_003 + int(positions[0]))
    b = len(positions)
    raw = torch.randint(0, 256, (b, 3, IMAGE_SIZE, IMAGE_SIZE), generator=g, dtype=torch.uint8)
    ids = torch.randint(5, 1000, (b, TEXT_LEN), generator=g)
    mask = torch.ones_like(ids)
    return raw, ids, mask, positions.clone()


def normalize(raw: torch.Tensor) -> torch.Tensor:
    return raw.float() / 127.5 - 1


def one_step(model, optimizer, args, layout: StepLayout, step: int, objectives) -> None:
    world = dist.get_world_size()
    if args.mode == "micro":  # one micro-batch of the whole contrastive batch per rank
        positions = torch.arange(args.contrastive // world) + layout.rank * (
            args.contrastive // world
        )
        raw, ids, mask, keys = micro_batch(step, positions)
        out = model(normalize(raw), ids, mask, keys, seed=mix_seed(0, step), objectives=objectives)
        out.loss.backward()
    else:
        cached = ContrastiveStep(model, layout, objectives, normalize)
        for m in range(layout.micro_batches):
            raw, ids, mask, keys = micro_batch(step, layout.positions(m))
            cached.embed(MicroBatchInputs(raw, ids, mask, keys))
        cached.contrast(mix_seed(0, step))
        for m in range(layout.micro_batches):
            cached.micro_losses(m, mix_seed(0, step, m)).loss.backward()
        del cached
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["micro", "step"], required=True)
    parser.add_argument(
        "--contrastive", type=int, required=True, help="samples per step, all ranks"
    )
    parser.add_argument("--micro", type=int, default=128, help="step mode: micro-batch per rank")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--itc-impl", choices=["gather", "ring"], default="gather")
    parser.add_argument("--tile", type=int, default=4096, help="ring: columns scored at a time")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    accum = args.contrastive // (world * args.micro) if args.mode == "step" else 1
    micro = args.micro if args.mode == "step" else args.contrastive // world
    layout = StepLayout(world, rank, accum, micro)
    objectives = ObjectiveConfig(
        itm_weight=1.0, mlm_weight=0.0, contrastive_batch=args.mode, itc_impl=args.itc_impl,
        itc_tile=args.tile,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(model_config(), log_table=False).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    one_step(model, optimizer, args, layout, 0, objectives)  # warm-up: allocator, optimizer state
    before = reset_peak()
    times = []
    for step in range(1, args.steps + 1):
        dist.barrier()
        tic = time.perf_counter()
        one_step(model, optimizer, args, layout, step, objectives)
        dist.barrier()
        times.append(time.perf_counter() - tic)
    record = {
        "rank": rank,
        "peak_above_mib": (status_bytes("VmHWM") - before) / 2**20,
        "peak_mib": status_bytes("VmHWM") / 2**20,
        "step_s": statistics.median(times),
    }
    records = [None] * world
    dist.all_gather_object(records, record)
    if rank == 0:
        Path(args.out).write_text(json.dumps(records))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
