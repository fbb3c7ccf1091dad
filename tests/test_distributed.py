"""`umt.distributed`: devices for collectives, the helpers on 2 gloo ranks, and the rule that no
other module calls a torch.distributed collective."""

from __future__ import annotations

import ast
import json

import pytest
import torch

from tests.conftest import REPO, run_torchrun
from umt import distributed

COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "all_to_all",
    "all_to_all_single", "barrier", "monitored_barrier", "broadcast", "broadcast_object_list",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "gather_object", "scatter",
    "scatter_object_list", "send", "recv", "isend", "irecv", "init_process_group", "new_group",
}  # fmt: skip


def test_an_nccl_group_gets_cuda_tensors_and_gloo_cpu_ones(monkeypatch):
    """NCCL rejects CPU tensors: the helpers pick the current CUDA device for it (nothing allocated)."""
    assert distributed.collective_device("nccl", lambda: 3) == torch.device("cuda", 3)
    assert distributed.collective_device("gloo", lambda: 3) == torch.device("cpu")
    # The path every helper takes: the group's backend, then the rank's current CUDA device.
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    assert distributed.group_device() == torch.device("cuda", 5)


def test_a_rank_binds_local_rank_modulo_the_visible_gpus():
    # Sites that bind one GPU per task show each task one device whatever its LOCAL_RANK.
    assert distributed.device_index(local_rank=5, device_count=1) == 0
    assert distributed.device_index(local_rank=9, device_count=8) == 1
    assert distributed.device_index(local_rank=3, device_count=8) == 3
    with pytest.raises(ValueError):
        distributed.device_index(0, 0)


def _collective_calls(path) -> list[str]:
    """`dist.X(...)` / `torch.distributed.X(...)` calls of collectives in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            if node.func.attr in COLLECTIVES and owner in ("dist", "torch.distributed"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {owner}.{node.func.attr}")
    return found


def test_no_module_but_umt_distributed_calls_a_collective():
    files = [p for d in ("umt", "data_pipeline", "launch") for p in (REPO / d).rglob("*.py")]
    assert REPO / "umt" / "distributed.py" in files
    calls = [c for p in files if p.name != "distributed.py" for c in _collective_calls(p)]
    assert calls == [], "collectives outside umt/distributed.py:\n" + "\n".join(calls)
    assert _collective_calls(REPO / "umt" / "distributed.py")  # the check sees real calls


@pytest.mark.slow
def test_helpers_on_two_ranks(tmp_path):
    run_torchrun(REPO / "tests" / "_ranks_distributed.py", str(tmp_path), nproc=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # lockstep: both ranks take 3 turns; rank 1 fills the two it has no item for.
    assert r0["steps"] == [[10, True], [11, True], [12, True]]
    assert r1["steps"] == [[20, True], [-1, False], [-1, False]]
    for r in (r0, r1):
        assert r["sum"] == [3.0] and r["max"] == [1] and r["any"] == [True, False, True]
        assert r["objects"] == [{"rank": 0}, {"rank": 1}] and r["broadcast"] == "from 0"
        # rank 0's work and its failure reach every rank; nobody hangs on the failure.
        assert r["rank0_result"] == {"converted_by": 0} and r["rank0_error"] is None
        assert r["rank0_failure"] == "RuntimeError: conversion broke on rank 0"
