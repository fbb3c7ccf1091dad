"""Under torchrun (2 gloo ranks): the `tiny` model's steps through DeepSpeed at ZeRO 2 and 3, eager
and with `model.compile` (inductor), from the same weights on the same batches. After 2 steps
each run saves a checkpoint and takes step 3, then goes back to step 2 from the other's
checkpoint (compiled <-> eager) and takes step 3 again.

Rank 0 writes, per stage, to argv[2]: each run's losses, the largest gradient difference
(compiled against eager, relative to the largest gradient), whether each run's weights after the
load equal the other's at its save (and whether step 3 had moved them, so that a load that did
nothing would show), each run's compiled blocks and whether the state dicts have the same keys. argv[1]: a checkpoint folder.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from umt.config import load_config  # noqa: E402
from umt.engine import build_engine, deepspeed_config, init_distributed, seed_everything  # noqa: E402
from umt.model import build_model  # noqa: E402
from umt.model.training import transformer_blocks  # noqa: E402

OVERRIDES = [
    "model.preset=tiny",
    "model.text.vocab_size=512",
    "data.train.synthetic=true",
    "train.lr=1e-3",
    "train.warmup_steps=1",
]


def engine_for(stage: int, compiled: bool):
    cfg = load_config(None, [*OVERRIDES, f"zero.stage={stage}", f"model.compile={compiled}"])
    seed_everything(cfg.train.seed)  # the same initial weights in every run, as the trainer
    model = build_model(cfg.model, log_table=False)
    world = torch.distributed.get_world_size()
    ds_config = deepspeed_config(cfg, world, torch.device("cpu"), load_universal=False)
    return build_engine(model, cfg, ds_config), cfg


def batch(step: int, b: int = 4, length: int = 12) -> tuple[torch.Tensor, ...]:
    """This rank's micro-batch of `step`: captions of different lengths (padding in the mask)."""
    rank = torch.distributed.get_rank()
    g = torch.Generator().manual_seed(100 * step + rank)
    pixels = torch.randn(b, 3, 32, 32, generator=g)
    lengths = torch.randint(4, length + 1, (b,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = torch.randint(5, 512, (b, length), generator=g) * mask
    return pixels, ids, mask, torch.arange(b) + rank * b


def full_values(engine, grads: bool) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 gradient (after backward) or value (every rank calls)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    get = safe_get_full_grad if grads else safe_get_full_fp32_param
    return {name: get(p).detach().clone() for name, p in engine.module.named_parameters()}


def step(engine, cfg, n: int) -> tuple[float, dict[str, torch.Tensor]]:
    out = engine(*batch(n), seed=n, objectives=cfg.objectives)
    engine.backward(out.loss)
    grads = full_values(engine, grads=True)
    engine.step()
    return float(out.loss.detach()), grads


def max_relative_difference(a: dict, b: dict) -> float:
    scale = max(float(v.abs().max()) for v in a.values())
    return max(float((a[k] - b[k]).abs().max()) for k in a) / scale


def run_stage(stage: int, root: Path) -> dict:
    runs = {"eager": engine_for(stage, False), "compiled": engine_for(stage, True)}
    losses: dict[str, list[float]] = {name: [] for name in runs}
    grads: dict[str, list[dict]] = {name: [] for name in runs}
    started = time.perf_counter()
    for n in (1, 2):
        for name, (engine, cfg) in runs.items():
            loss, g = step(engine, cfg, n)
            losses[name].append(loss)
            grads[name].append(g)
    steps_s = time.perf_counter() - started
    saved, moved = {}, {}
    for name, (engine, cfg) in runs.items():
        saved[name] = full_values(engine, grads=False)
        engine.save_checkpoint(str(root), tag=f"zero{stage}-{name}")
        losses[name].append(step(engine, cfg, 3)[0])
        now = full_values(engine, grads=False)
        moved[name] = any(not torch.equal(now[k], saved[name][k]) for k in now)
    # Each run goes back to step 2 from the other's checkpoint and takes step 3 again
    # (DeepSpeed loads the module strictly: a key of one that the other lacks, e.g. an
    # `_orig_mod.` prefix, fails the load).
    loaded_equal = {}
    for name, other in (("eager", "compiled"), ("compiled", "eager")):
        engine, cfg = runs[name]
        engine.load_checkpoint(str(root), tag=f"zero{stage}-{other}")
        after = full_values(engine, grads=False)
        loaded_equal[name] = all(torch.equal(after[k], saved[other][k]) for k in after)
        losses[name].append(step(engine, cfg, 3)[0])
    compiled, eager = runs["compiled"][0].module, runs["eager"][0].module
    return {
        "losses": losses,
        "grad_difference": [max_relative_difference(e, c) for e, c in zip(*grads.values())],
        "loaded_equal": loaded_equal,
        "moved": moved,
        "compiled_blocks": {name: compiled_blocks(run[0].module) for name, run in runs.items()},
        "state_dict_keys_equal": list(compiled.state_dict()) == list(eager.state_dict()),
        "steps_s": steps_s,
    }


def compiled_blocks(model) -> list[str]:
    return [
        name
        for name, block in transformer_blocks(model)
        if hasattr(block.forward, "_torchdynamo_orig_callable")
    ]


def main(root: str, out: str) -> None:
    init_distributed(timeout_s=300)
    torch.set_num_threads(1)
    # ZeRO-3 first: DeepSpeed's ZeRO-3 keeps its own `F.linear` for the rest of the process, so
    # the ZeRO-2 runs reuse most of what inductor compiled (the test compiles about once).
    results = {str(stage): run_stage(stage, Path(root)) for stage in (3, 2)}
    if torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
