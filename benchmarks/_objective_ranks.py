"""One rank of `benchmarks/objective_scaling.py` (started by torchrun with gloo).

Runs forward + backward of the objectives of a `tiny` model twice per contender, ITC alone
(itm_weight=0) and ITC + ITM, and records per phase the bytes this rank received through
torch.distributed (collectives wrapped in this process only) and the phase's peak RSS above the
RSS before it. ITM's share is the difference of the two phases. Rank 0 writes all ranks' records
as JSON to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import re
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _baseline import reference_losses  # noqa: E402

from umt.model import build_model, preset_config  # noqa: E402
from umt.objectives import ObjectiveConfig, pretraining_losses  # noqa: E402

RECEIVED = {"bytes": 0}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _received(name: str, args: tuple, kwargs: dict) -> int:
    """Bytes this rank receives from other ranks in one call (ring algorithms for reductions)."""
    w, me = dist.get_world_size(), dist.get_rank()
    if name in ("all_gather", "all_gather_into_tensor"):
        return (w - 1) * _nbytes(args[1])
    if name == "all_to_all_single":
        out = args[0]
        splits = kwargs.get("output_split_sizes", args[2] if len(args) > 2 else None)
        rows = out.shape[0] if out.dim() else 1
        own = splits[me] if splits else rows // w
        return (rows - own) * (_nbytes(out) // max(rows, 1))
    if name == "scatter":
        src = kwargs.get("src", args[2] if len(args) > 2 else 0)
        return 0 if me == src else _nbytes(args[0])
    if name == "broadcast":
        src = kwargs.get("src", args[1] if len(args) > 1 else 0)
        return 0 if me == src else _nbytes(args[0])
    if name == "all_reduce":
        return 2 * (w - 1) * _nbytes(args[0]) // w
    return 0


def install_byte_counter() -> None:
    """Wrap the torch.distributed collectives the objectives use (attribute lookups at call time,
    so `umt.distributed` and `torch.distributed.nn` both go through the wrappers)."""
    names = ["all_gather", "all_gather_into_tensor", "all_to_all_single", "scatter", "broadcast"]
    for name in [*names, "all_reduce"]:
        original = getattr(dist, name)

        @functools.wraps(original)
        def counted(*args, _name=name, _original=original, **kwargs):
            RECEIVED["bytes"] += _received(_name, args, kwargs)
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def _status_bytes(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) * 1024 if match else 0


def reset_peak_rss() -> int:
    gc.collect()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    w, me, b = dist.get_world_size(), dist.get_rank(), args.batch

    cfg = preset_config("tiny")
    cfg.image.image_size = args.image_size
    torch.manual_seed(0)
    model = build_model(cfg, log_table=False)
    g = torch.Generator().manual_seed(1000 + me)
    pixels = torch.randn(b, 3, args.image_size, args.image_size, generator=g)
    ids = torch.randint(5, cfg.text.vocab_size, (b, args.text_len), generator=g)
    mask = torch.ones_like(ids)
    image_ids = torch.arange(b) + me * b

    def ours(objectives):
        return pretraining_losses(model, pixels, ids, mask, image_ids, objectives, seed=7)

    def blip(objectives):  # same model and stacked fusion: only the negatives' transport differs
        return reference_losses(
            model, pixels, ids, mask, image_ids, objectives, 7, all_gather=True, stacked=True
        )

    phases = {"itc": ObjectiveConfig(itm_weight=0.0), "full": ObjectiveConfig(itm_weight=1.0)}
    install_byte_counter()
    records = []
    for warm in (True, False):
        for name, loss_fn in (("ours", ours), ("blip", blip)):
            for phase, objectives in phases.items():
                model.zero_grad(set_to_none=True)
                rss = reset_peak_rss()
                RECEIVED["bytes"] = 0
                out = loss_fn(objectives)
                out.loss.backward()
                if not warm:
                    records.append(
                        {
                            "rank": me,
                            "contender": name,
                            "phase": phase,
                            "received_bytes": RECEIVED["bytes"],
                            "peak_bytes": _status_bytes("VmHWM") - rss,
                            "loss": float(out.loss),
                        }
                    )
    gathered: list = [None] * w
    dist.all_gather_object(gathered, records)
    if me == 0:
        flat = [r for part in gathered for r in part]
        Path(args.out).write_text(json.dumps({"world_size": w, "records": flat}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
