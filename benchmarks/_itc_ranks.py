"""One torchrun rank of `objective_scaling.py --itc`: the contrastive loss alone, forward +
backward, for each contender and local batch, on random L2-normalised embeddings (b, D).

Per contender it records the seconds of forward + backward (median of `--repeats`, after a
warm-up; the repeats interleave the contenders) and, in calls of their own made first, the peak
RSS above the RSS before the call. The memory calls pin glibc's mmap threshold at 64 KiB, so
every tensor is mapped when allocated and unmapped when freed, and the peak RSS is the peak of
live tensors (/proc/self/clear_refs resets it). The timed calls run with glibc's heap as a
training process has it (threshold 32 MiB, the top of glibc's own dynamic one: freed blocks are
reused). Timing under the pinned threshold would charge each
allocation its page faults: a loss made of many tile-sized temporaries (the ring) would pay for
the measurement. Contenders:
- gather: UMT's all-gathered ITC (`objectives.itc_impl: gather`);
- gather_again: the same, a second time: the noise floor of the comparison with ClipLoss;
- ring: UMT's ring ITC (`itc_impl: ring`, `itc_tile`);
- sigmoid: UMT's sigmoid loss (neighbour exchange through the ring);
- sigmoid_again: the same, a second time: the noise floor of the comparison;
- sigmoid_logged: the same on a step that logs (its accuracies computed too);
UMT's contenders run as a training step that does not log runs (no accuracies; the trainer asks
for them on log steps only), as open_clip's losses compute none.
- open_clip / open_clip_siglip: `ClipLoss(local_loss=True, gather_with_grad=True)` and
  `SigLipLoss` (bidirectional neighbour exchange) from open_clip's own `loss.py`, given by
  `--open-clip-loss`, when it could be had.
Rank 0 writes every rank's records to `--out` as json.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _objective_ranks import _status_bytes as status_bytes  # noqa: E402
from _objective_ranks import reset_peak_rss  # noqa: E402

from umt.objectives import contrastive_outputs  # noqa: E402

M_MMAP_THRESHOLD = -3
try:
    LIBC = ctypes.CDLL("libc.so.6")
except OSError:
    LIBC = None


def heap(measure_memory: bool) -> None:
    """glibc's mmap threshold: 64 KiB for the memory calls, else 32 MiB."""
    if LIBC is not None:
        with contextlib.suppress(AttributeError):
            LIBC.mallopt(M_MMAP_THRESHOLD, 64 * 1024 if measure_memory else 32 * 1024 * 1024)


def contenders(open_clip_path: str | None, tile: int):
    def umt(impl: str, loss: str, metrics: bool = False):
        def run(images, texts, scale, bias):
            return contrastive_outputs(
                images, texts, scale, None, impl=impl, tile=tile, loss=loss, logit_bias=bias,
                metrics=metrics,
            ).loss  # fmt: skip

        return run

    found = {
        "gather": umt("gather", "softmax"),
        "gather_again": umt("gather", "softmax"),
        "ring": umt("ring", "softmax"),
        "sigmoid": umt("ring", "sigmoid"),
        "sigmoid_again": umt("ring", "sigmoid"),
        "sigmoid_logged": umt("ring", "sigmoid", metrics=True),
    }
    if open_clip_path:
        spec = importlib.util.spec_from_file_location("open_clip_loss", open_clip_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        rank, world = dist.get_rank(), dist.get_world_size()
        clip = module.ClipLoss(
            local_loss=True, gather_with_grad=True, cache_labels=False, rank=rank, world_size=world
        )
        siglip = module.SigLipLoss(rank=rank, world_size=world)
        found["open_clip"] = lambda i, t, s, b: clip(i, t, s)
        found["open_clip_siglip"] = lambda i, t, s, b: siglip(i, t, s, b)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1024,2048,4096,8192", help="local batches")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated contenders (default: all)")
    parser.add_argument(
        "--gather-up-to",
        type=int,
        default=1 << 30,
        help="local batches above this leave out the contenders holding (b, W*b) logits",
    )
    parser.add_argument("--open-clip-loss")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    found = contenders(args.open_clip_loss, args.tile)
    only = [c for c in args.only.split(",") if c] or list(found)
    batches = [int(x) for x in args.batches.split(",")]
    held = ("gather", "gather_again", "open_clip")  # hold (b, W*b) logits
    # (larger batches leave them out: their logits would not fit in memory)
    names = {b: [n for n in only if b <= args.gather_up_to or n not in held] for b in batches}
    peaks, times, losses = {}, {}, {}

    def call(b: int, name: str) -> float:
        """Seconds of one forward + backward on every rank; the loss and peak RSS recorded."""
        g = torch.Generator().manual_seed(rank)
        img = F.normalize(torch.randn(b, args.dim, generator=g), dim=-1).requires_grad_(True)
        txt = F.normalize(torch.randn(b, args.dim, generator=g), dim=-1).requires_grad_(True)
        scale = torch.tensor(10.0, requires_grad=True)
        bias = torch.tensor(-10.0, requires_grad=True)
        dist.barrier()
        before = reset_peak_rss()
        start = time.perf_counter()
        out = found[name](img, txt, scale, bias)
        out.backward()
        dist.barrier()
        seconds = time.perf_counter() - start
        peaks[b, name] = status_bytes("VmHWM") - before
        losses[b, name] = float(out)
        return seconds

    # Memory first, with the threshold pinned from the start (a warm-up call, then the measured
    # one), while no freed block can sit resident in the heap. Then time, the repeats
    # interleaving the contenders (order rotated, reversed every other repeat) so load from
    # other processes hits all alike; repeat 0 warms each up.
    heap(measure_memory=True)
    for b in batches:
        for name in names[b]:
            call(b, name)
            call(b, name)
    memory = dict(peaks)
    heap(measure_memory=False)
    for b in batches:
        for repeat in range(args.repeats + 1):
            order = names[b][repeat % len(names[b]) :] + names[b][: repeat % len(names[b])]
            for name in order[::-1] if repeat % 2 else order:
                seconds = call(b, name)
                if repeat:
                    times.setdefault((b, name), []).append(seconds)
    records = [
        {
            "rank": rank,
            "contender": name,
            "local": b,
            "seconds": statistics.median(times[b, name]),
            "peak_bytes": memory[b, name],
            "loss": losses[b, name],
        }
        for b in batches
        for name in names[b]
    ]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    if rank == 0:
        Path(args.out).write_text(json.dumps([r for part in gathered for r in part]))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
