"""Under torchrun: count the reads of tensor values back to the host (each a host-device sync on
a GPU) in training steps that do not log, by the code that made them; writes JSON to argv[1].

On the CPU nothing synchronises, so this counts the operations that would: `.item()`,
`.tolist()`, truth tests, `int()`/`float()`, `nonzero` and boolean-mask indexing, whose result
size the host must know. Each is attributed to the innermost frame in UMT's own packages, or to
DeepSpeed or torch when none of ours is on the stack.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from umt.config import load_config  # noqa: E402
from umt.data_wait import DataWaiter  # noqa: E402
from umt.train import Trainer  # noqa: E402

READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero",
         "argwhere", "masked_select", "unique", "bincount"}  # fmt: skip


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _owner() -> str:
    """`package/file:line function` of the innermost frame outside torch itself."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        path = frame.filename
        if "/torch/" in path or path.endswith("_ranks_host_syncs.py"):
            continue
        for package in ("umt", "data_pipeline", "deepspeed", "transformers"):
            if f"/{package}/" in path:
                return f"{package}/{path.rsplit(f'/{package}/', 1)[1]}:{frame.lineno} {frame.name}"
        return f"{path}:{frame.lineno} {frame.name}"
    return "torch"


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = _name(func)
        if name in READS or (name in ("__getitem__", "__setitem__") and _bool_index(args)):
            self.counts[f"{_owner()} [{name}]"] += 1
        return func(*args, **(kwargs or {}))


if __name__ == "__main__":
    out, *overrides = sys.argv[1:]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg)
    batches = DataWaiter(trainer.data)  # batches come from a helper thread, as in training
    trainer.train_step(batches)  # warm-up: first-step set-up is not a step's cost
    steps = 3
    with HostReads() as reads:
        for _ in range(steps):
            trainer.train_step(batches)
    ours = {k: v for k, v in reads.counts.items() if k.startswith(("umt/", "data_pipeline/"))}
    result = {
        "steps": steps,
        "ours": ours,
        "others": {k: v for k, v in reads.counts.items() if k not in ours},
    }
    Path(out).with_name(f"{Path(out).stem}-rank{trainer.rank}.json").write_text(json.dumps(result))
