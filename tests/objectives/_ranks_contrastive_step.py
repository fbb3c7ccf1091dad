"""Under torchrun (gloo, W ranks): one contrastive batch per optimizer step, A micro-batches per
rank, on the global batch of `contrastive_step_cases`, in float64. For each objective variant
each rank saves the step's loss (averaged over ranks as DeepSpeed does), every parameter's
gradient (averaged likewise) and, per step position, the ITM negatives drawn; plus, with dropout
on, the embeddings of pass 1 and pass 3. Usage: script OUT_DIR A. Writes OUT_DIR/rank{R}.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.objectives.contrastive_step_cases import (  # noqa: E402
    VARIANTS,
    N,
    averaged,
    global_step_batch,
    step_model,
)
from umt.cached_step import ContrastiveStep, MicroBatchInputs  # noqa: E402
from umt.objectives.step import StepLayout  # noqa: E402

SEED = 17


def run_step(model, objectives, layout: StepLayout, record: dict | None = None) -> dict:
    """One optimizer step in step mode on this rank's micro-batches; gradients land in .grad."""
    _, raw, ids, mask, image_ids = global_step_batch()
    step = ContrastiveStep(model, layout, objectives, lambda p: p.double() / 255 * 2 - 1)
    for micro in range(layout.micro_batches):
        rows = layout.positions(micro)
        step.embed(MicroBatchInputs(raw[rows], ids[rows], mask[rows], image_ids[rows]))
    cache = step.contrast(SEED)
    total = objectives.itc_weight * cache.loss
    for micro in range(layout.micro_batches):
        out = step.micro_losses(micro, SEED + micro)
        out.loss.backward()
        total = total + objectives.itm_weight * out.logs.get("loss/itm", 0)
    if record is not None:
        record["pass1"] = torch.cat([e.text for e in step.embeddings])
    negatives = torch.full((2, N), -1, dtype=torch.long)
    positions = layout.all_positions()
    if cache.negatives is not None:
        negatives[0, positions] = cache.negatives.text_index
        negatives[1, positions] = cache.negatives.image_index
    dist.all_reduce(negatives, op=dist.ReduceOp.MAX)  # every position is one rank's
    return {
        "loss": averaged(total.detach()),
        "grads": {n: averaged(p.grad) for n, p in model.named_parameters() if p.grad is not None},
        "negatives": negatives,
    }


def main(out_dir: str, accum: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = StepLayout(world, rank, accum, N // (world * accum))
    results: dict = {}
    for name, objectives in VARIANTS.items():
        model = step_model(objectives)
        results[name] = run_step(model, objectives, layout)
    # With dropout: pass 3's tower passes replay pass 1's RNG, so their embeddings are equal.
    model = step_model(VARIANTS["gather_softmax"], dropout=0.2)
    seen: list[torch.Tensor] = []
    handle = model.text_proj.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    record: dict = {}
    run_step(model, VARIANTS["gather_softmax"], layout, record)
    handle.remove()
    b = layout.micro_batch
    pass1 = torch.cat(seen[: layout.micro_batches])  # one projection per micro-batch in pass 1
    # Pass 3, micro-batch m: its own texts first, then its re-encoded negative texts.
    pass3 = torch.cat([seen[layout.micro_batches + 2 * m] for m in range(layout.micro_batches)])
    results["dropout"] = {"pass1": pass1, "pass3": pass3, "rows": b * layout.micro_batches}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
