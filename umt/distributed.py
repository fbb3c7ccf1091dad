"""Rank/world discovery (torchrun, the DeepSpeed launcher, Slurm `srun`) and autograd-aware collectives.

The collectives degrade to local operations when no process group is initialised, so the
objectives run unchanged in a single process.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

# torch 2.10+ flags the autograd collectives as deprecated in favour of private functional ones;
# they remain the public, documented way to gather with gradients, so keep user logs clean.
warnings.filterwarnings(
    "ignore", message=r".*torch\.distributed\.nn\.functional", category=FutureWarning
)
warnings.filterwarnings(
    "ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning
)


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int
    launcher: str  # "torchrun" | "slurm" | "single"


def discover_world(env: dict[str, str] | None = None) -> WorldInfo:
    """Read rank and world size from torchrun/DeepSpeed (`RANK`...) or Slurm (`SLURM_PROCID`...)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(
            int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "torchrun"
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return WorldInfo(
            int(env["SLURM_PROCID"]),
            int(env.get("SLURM_LOCALID", 0)),
            int(env["SLURM_NTASKS"]),
            "slurm",
        )
    return WorldInfo(0, 0, 1, "single")


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if is_distributed(group) else 0


def gather_with_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate `x` (b, ...) of every rank into (W*b, ...), rank order; gradients flow back to owners.

    The backward sums, over ranks, the gradient each rank computes for a slice, so a "local
    loss" per rank followed by DeepSpeed's gradient averaging equals the loss on the global batch.
    """
    if not is_distributed(group):
        return x
    return torch.cat(dist_nn.all_gather(x.contiguous(), group=group), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Like `gather_with_grad` without the autograd link (ids, metadata)."""
    if not is_distributed(group):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def all_reduce_max(value: int, device: torch.device, group: dist.ProcessGroup | None = None) -> int:
    if not is_distributed(group):
        return value
    t = torch.tensor([value], device=device, dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def fetch_rows(
    local: torch.Tensor, global_index: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Rows `global_index` (m,) of the rank-ordered concatenation of every rank's `local` (b, ...).

    Only the requested rows travel: each rank sends the owners the local indices it needs
    (all_to_all of counts, then of indices) and the owners send those rows back with an
    autograd-aware all_to_all, so gradients reach the owner and memory and traffic grow with m,
    not with the global batch W*b. Every rank must hold the same b and call this together.
    """
    if not is_distributed(group):
        return local.index_select(0, global_index)
    w, b = dist.get_world_size(group), local.shape[0]
    owner = torch.div(global_index, b, rounding_mode="floor")
    order = torch.argsort(owner, stable=True)  # group requests by owner rank
    wanted = (global_index % b)[order].contiguous()
    send_counts = torch.bincount(owner, minlength=w)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_split, recv_split = send_counts.tolist(), recv_counts.tolist()

    requested = wanted.new_empty(sum(recv_split))  # local indices other ranks asked us for
    dist.all_to_all_single(requested, wanted, recv_split, send_split, group=group)
    served = local.index_select(0, requested)
    received = served.new_empty((len(global_index), *local.shape[1:]))
    received = dist_nn.all_to_all_single(received, served, send_split, recv_split, group=group)
    return received.index_select(0, torch.argsort(order))  # back to the caller's order
