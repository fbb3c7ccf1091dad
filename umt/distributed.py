"""Rank/world discovery (torchrun, the DeepSpeed launcher, Slurm `srun`), process-group set-up, and
every collective UMT calls.

Nothing else in `umt/`, `data_pipeline/` or `launch/` calls a `torch.distributed` collective (a
test greps for it): the helpers here put each tensor on the device its process group needs (CUDA
for NCCL, which rejects CPU tensors; CPU for gloo) and bring the result back, so a caller can
reduce a CPU metric or a GPU flag alike. They degrade to local operations when no process group
is initialised, so the objectives and evaluation run unchanged in a single process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

from umt import collective_tracker

# torch 2.10+ flags the autograd collectives as deprecated in favour of private functional ones;
# they remain the public, documented way to gather with gradients, so keep user logs clean.
warnings.filterwarnings(
    "ignore", message=r".*torch\.distributed\.nn\.functional", category=FutureWarning
)
warnings.filterwarnings(
    "ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning
)

T = TypeVar("T")


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


# --- set-up ----------------------------------------------------------------------------------


def device_index(local_rank: int, device_count: int) -> int:
    """The GPU of a rank. Sites that bind one GPU per task show each task a single device, so
    LOCAL_RANK (or SLURM_LOCALID) can exceed the visible count: wrap around."""
    if device_count < 1:
        raise ValueError("no CUDA device visible")
    return local_rank % device_count


def rank_device(local_rank: int) -> torch.device:
    """cuda:(local_rank mod visible GPUs) where CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", device_index(local_rank, torch.cuda.device_count()))
    return torch.device("cpu")


def collective_device(backend: str, cuda_index: Callable[[], int] | None = None) -> torch.device:
    """The device a collective's tensors must live on for `backend`: CUDA for NCCL, else CPU.

    `cuda_index` is called only for NCCL (default: the current CUDA device, which
    `init_distributed` set to this rank's GPU); nothing is allocated.
    """
    if "nccl" in backend.lower():
        index = cuda_index() if cuda_index is not None else torch.cuda.current_device()
        return torch.device("cuda", index)
    return torch.device("cpu")


def group_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """`collective_device` of an initialised group's backend."""
    return collective_device(str(dist.get_backend(group)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master_addr() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return "127.0.0.1"
    out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True)
    return out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else "127.0.0.1"


def export_world_env(world: WorldInfo) -> None:
    """Give torch.distributed the env:// variables whichever launcher started us."""
    env = os.environ
    if world.launcher == "single":
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    elif world.launcher == "slurm":
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", str(10000 + int(env.get("SLURM_JOB_ID", "0")) % 50000))
    env["RANK"], env["LOCAL_RANK"] = str(world.rank), str(world.local_rank)
    env["WORLD_SIZE"] = str(world.world_size)


def init_distributed(
    timeout_s: float = 1800.0, always: bool = True
) -> tuple[WorldInfo, torch.device]:
    """Bind this rank to its GPU, then start the process group: NCCL on GPUs, gloo on CPU.

    `always`: start a group of one for a process without a launcher too (DeepSpeed needs one);
    otherwise only under a launcher (torchrun with one rank included, so evaluation takes the
    same collective path as on many ranks). `timeout_s` bounds every collective of the group.
    """
    world = discover_world()
    device = rank_device(world.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the group: NCCL binds to the current device
    if dist.is_initialized() or not (always or world.launcher != "single"):
        return world, device
    export_world_env(world)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s)
    )
    return world, device


def shutdown() -> None:
    """Leave the process group together: a barrier (queued after any collective still in flight,
    such as a ZeRO-3 prefetch) then destroy it. A rank that exits while a peer's asynchronous
    collective still talks to it makes that peer abort."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


# --- queries ---------------------------------------------------------------------------------


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if is_distributed(group) else 0


# --- collectives on any tensor ---------------------------------------------------------------

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(
    tensor: torch.Tensor, op: str = "sum", group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """A reduced copy of `tensor` over the group, on `tensor`'s device (the input is untouched)."""
    if not is_distributed(group):
        return tensor.clone()
    with collective_tracker.waiting("all_reduce"):  # with the copy back (a host read on GPUs)
        work = tensor.detach().to(group_device(group), copy=True)
        dist.all_reduce(work, op=getattr(dist.ReduceOp, _OPS[op]), group=group)
        return work.to(tensor.device)


def any_rank(
    flags: Sequence[bool | torch.Tensor], group: dist.ProcessGroup | None = None
) -> list[bool]:
    """For each flag, whether it is set on any rank: one all-reduce and one host read for all.

    Flags may be Python bools or 0-dim tensors on any device (a tensor stays on its device until
    the single read at the end, so a GPU flag costs one host-device sync for the whole list).
    """
    device = next((f.device for f in flags if isinstance(f, torch.Tensor)), torch.device("cpu"))
    stacked = torch.stack(
        [f.reshape(()).to(device, torch.int32) if isinstance(f, torch.Tensor)
         else torch.tensor(int(f), dtype=torch.int32, device=device) for f in flags]
    )  # fmt: skip
    with collective_tracker.waiting("all_reduce"):  # the read below waits for the reduction
        return [bool(v) for v in all_reduce(stacked, "max", group).tolist()]


def barrier(group: dist.ProcessGroup | None = None) -> None:
    if not is_distributed(group):
        return
    device = group_device(group)
    if device.type == "cuda":  # NCCL guesses the device from the rank otherwise
        dist.barrier(group=group, device_ids=[device.index])
    else:
        dist.barrier(group=group)


def all_gather_object(obj: T, group: dist.ProcessGroup | None = None) -> list[T]:
    """Every rank's `obj`, in rank order (pickled; for small metadata, not for tensors of a step)."""
    if not is_distributed(group):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: T, src: int = 0, group: dist.ProcessGroup | None = None) -> T:
    """Rank `src`'s `obj` on every rank."""
    if not is_distributed(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def new_gloo_group(timeout_s: float) -> dist.ProcessGroup | None:
    """A gloo group of every rank with its own timeout (None without a process group). Every rank
    creates it together. For collectives off the training thread (a background checkpoint
    writer) or with a timeout other than the training group's."""
    if not is_distributed():
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def run_on_rank0(fn: Callable[[], T], timeout_s: float) -> tuple[T | None, str | None]:
    """Run `fn` on rank 0 while the other ranks wait up to `timeout_s`; every rank gets rank 0's
    (result, error message). The wait is on a gloo group of its own with that timeout, so a long
    job on rank 0 (a checkpoint conversion) neither trips the main group's collective timeout nor
    leaves the others hanging when it fails: they get its error instead."""
    if not is_distributed():
        try:
            return fn(), None
        except Exception as exc:  # noqa: BLE001 - handed to the caller as a message
            return None, f"{type(exc).__name__}: {exc}"
    waiting = new_gloo_group(timeout_s)
    outcome: tuple[Any, str | None] = (None, None)
    if dist.get_rank() == 0:
        try:
            outcome = (fn(), None)
        except Exception as exc:  # noqa: BLE001
            outcome = (None, f"{type(exc).__name__}: {exc}")
    result = broadcast_object(outcome, 0, waiting)
    dist.destroy_process_group(waiting)
    return result


def lockstep(
    items: Iterable[T], filler: Callable[[], T], group: dist.ProcessGroup | None = None
) -> Iterator[tuple[T, bool]]:
    """Yield (item, real) until every rank's `items` are exhausted; a rank that ran out yields
    (filler(), False) while others still have items.

    For loops whose body is a collective (every forward under ZeRO-3 gathers parameters): each
    rank then makes the same number of calls, whatever its share of the work. Costs one small
    all-reduce per item.
    """
    iterator = iter(items)
    while True:
        item = next(iterator, _DONE)
        (busy,) = any_rank([item is not _DONE], group)
        if not busy:
            return
        yield (item, True) if item is not _DONE else (filler(), False)


_DONE: Any = object()


# --- autograd-aware collectives of the objectives --------------------------------------------


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


@torch.no_grad()
def exchange(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-to-all of equal parts: `x` (W, ...) sends x[s] to rank s; returns (W, ...) whose row s
    came from rank s."""
    if not is_distributed(group):
        return x
    received = torch.empty_like(x)
    dist.all_to_all_single(received, x.contiguous(), group=group)
    return received


class FetchPlan(NamedTuple):
    """Who sends which rows to whom, for one set of requested global row indices."""

    index: torch.Tensor  # (m,) the requested global indices, in the caller's order
    inverse: torch.Tensor | None  # (m,) puts rows received in owner order back in caller order
    requested: torch.Tensor | None  # local indices other ranks asked this rank for
    receive_split: list[int]  # rows this rank receives from each owner
    serve_split: list[int]  # rows this rank sends to each requester


@torch.no_grad()
def plan_fetches(
    index_sets: Sequence[torch.Tensor],
    rows_per_rank: int,
    group: dist.ProcessGroup | None = None,
    shared_max: int = 0,
) -> tuple[list[FetchPlan], int]:
    """Plans for fetching rows `index_sets[k]` of the rank-ordered concatenation of every rank's
    `rows_per_rank` local rows, and the maximum of `shared_max` over ranks.

    One all-to-all of request counts serves every set and carries `shared_max` along (the
    padded text length, which must agree before token rows can travel); its result is the one
    host read (a host-device sync on GPUs) of the whole exchange. Then one all-to-all of
    indices per set. Every rank must call this together with the same number of sets.
    """
    if not is_distributed(group):
        plans = [FetchPlan(ix, None, None, [], []) for ix in index_sets]
        return plans, shared_max
    w, b = dist.get_world_size(group), rows_per_rank
    device = index_sets[0].device
    owners = [torch.div(ix, b, rounding_mode="floor") for ix in index_sets]
    # index_add_, not bincount: bincount on CUDA reads the maximum back to the host first.
    ones = torch.ones_like(owners[0])
    counts = torch.stack(
        [torch.zeros(w, dtype=torch.long, device=device).index_add_(0, o, ones) for o in owners],
        dim=1,
    )  # (W, k): my requests per owner rank
    shared = torch.full((w, 1), shared_max, dtype=counts.dtype, device=device)
    send = torch.cat([counts, shared], dim=1).contiguous()  # row r goes to rank r
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    k = len(index_sets)
    host = torch.cat([send[:, :k].T.flatten(), recv[:, :k].T.flatten(), recv[:, k]]).tolist()
    receive = [host[i * w : (i + 1) * w] for i in range(k)]  # what I asked each owner for
    serve = [host[(k + i) * w : (k + i + 1) * w] for i in range(k)]  # what each rank asked me
    plans = []
    for ix, owner, receive_split, serve_split in zip(index_sets, owners, receive, serve):
        order = torch.argsort(owner, stable=True)  # group my requests by owner rank
        wanted = (ix % b)[order].contiguous()
        requested = wanted.new_empty(sum(serve_split))
        dist.all_to_all_single(requested, wanted, serve_split, receive_split, group=group)
        plans.append(FetchPlan(ix, torch.argsort(order), requested, receive_split, serve_split))
    return plans, max(host[2 * k * w :])


def fetch(
    local: torch.Tensor, plan: FetchPlan, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Rows `plan.index` of every rank's `local` (b, ...); gradients reach the owners.

    Only the requested rows travel (an autograd-aware all_to_all), so memory and traffic grow
    with the number of rows fetched, not with the global batch.
    """
    if plan.requested is None:
        return local.index_select(0, plan.index)
    served = local.index_select(0, plan.requested)
    received = served.new_empty((len(plan.index), *local.shape[1:]))
    received = dist_nn.all_to_all_single(
        received, served, plan.receive_split, plan.serve_split, group=group
    )
    return received.index_select(0, plan.inverse)  # back to the caller's order


def fetch_rows(
    local: torch.Tensor, global_index: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Rows `global_index` (m,) of the rank-ordered concatenation of every rank's `local` (b, ...).

    A plan and a fetch in one call; use `plan_fetches` to share one plan among several tensors.
    Every rank must hold the same b and call this together.
    """
    (plan,), _ = plan_fetches([global_index], local.shape[0], group)
    return fetch(local, plan, group)
