"""Under torchrun (2 gloo ranks): the collective helpers of `umt.distributed`; writes
`{out}/rank{r}.json` for tests/test_distributed.py to check."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from umt import distributed  # noqa: E402


def fail_on_rank0() -> None:
    raise RuntimeError("conversion broke on rank 0")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    world, device = distributed.init_distributed(timeout_s=120, always=False)
    me = world.rank
    items = [10, 11, 12] if me == 0 else [20]  # uneven work: rank 1 runs out first
    steps = [(item, real) for item, real in distributed.lockstep(items, lambda: -1)]
    result, error = distributed.run_on_rank0(lambda: {"converted_by": distributed.rank()}, 60)
    _, failure = distributed.run_on_rank0(fail_on_rank0, 60)
    record = {
        "steps": steps,
        "sum": distributed.all_reduce(torch.tensor([me + 1.0])).tolist(),
        "max": distributed.all_reduce(torch.tensor([me]), "max").tolist(),
        "any": distributed.any_rank([me == 1, False, torch.tensor(me == 0)]),
        "objects": distributed.all_gather_object({"rank": me}),
        "broadcast": distributed.broadcast_object(f"from {me}"),
        "rank0_result": result,
        "rank0_error": error,
        "rank0_failure": failure,
    }
    (out / f"rank{me}.json").write_text(json.dumps(record))
    # Leave the group together, as the entry points do: a process that exits with gloo's threads
    # still up can abort ("terminate called without an active exception"), seen once under load.
    distributed.shutdown()
