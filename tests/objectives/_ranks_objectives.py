"""Run under torchrun (gloo): multi-rank objective checks; each rank saves its results to argv[1]."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.objectives.objective_cases import (  # noqa: E402
    KEYS_SHARED,
    global_batch,
    itc_loss_and_grads,
    tiny_model,
)
from umt.distributed import fetch_rows, gather_with_grad  # noqa: E402
from umt.objectives import (  # noqa: E402
    contrastive_outputs,
    key_ids,
    mix_seed,
    sample_hard_negatives,
)


def averaged(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict = {}
    model = tiny_model()
    pixels, ids, mask = global_batch()
    b = pixels.shape[0] // world
    rows = slice(rank * b, (rank + 1) * b)

    # 1. ITC loss and gradients, averaged over ranks as DeepSpeed does.
    for name, keys in (("distinct", None), ("shared", KEYS_SHARED)):
        local_keys = None if keys is None else keys[rows]
        loss, grads = itc_loss_and_grads(model, pixels[rows], ids[rows], mask[rows], local_keys)
        results[f"itc_{name}_loss"] = averaged(loss)
        results[f"itc_{name}_grads"] = {n: averaged(g) for n, g in grads.items()}

    # 2. Hard negatives over many draws with shared keys: never a positive, other ranks drawn.
    with torch.no_grad():
        img = model.encode_image(pixels[rows])
        txt = model.encode_text(ids[rows], mask[rows])
        out = contrastive_outputs(img, txt, model.scale(), KEYS_SHARED[rows])
    all_ids = key_ids(KEYS_SHARED)
    positions = torch.arange(b) + rank * b
    text_draws, image_draws = [], []
    for seed in range(300):
        neg = sample_hard_negatives(out.logits_i2t, out.logits_t2i, out.positives, seed, positions)
        assert neg.text_valid.all() and neg.image_valid.all()
        text_draws.append(neg.text_index)
        image_draws.append(neg.image_index)
    results["text_draws"] = torch.stack(text_draws)  # (draws, b) global indices
    results["image_draws"] = torch.stack(image_draws)
    results["local_key_ids"] = key_ids(KEYS_SHARED[rows])
    results["global_key_ids"] = all_ids
    results["positives"] = out.positives

    # 3. Every sample of the global batch shares one key: no valid negative, documented fallback.
    same = ["x"] * b
    out_same = contrastive_outputs(img, txt, model.scale(), same)
    neg = sample_hard_negatives(
        out_same.logits_i2t, out_same.logits_t2i, out_same.positives, 0, positions
    )
    results["same_key_loss"] = out_same.loss
    results["same_key_valid"] = torch.stack([neg.text_valid, neg.image_valid])

    # 4. fetch_rows: values and gradients equal indexing the concatenated batch.
    g = torch.Generator().manual_seed(7)
    full = torch.randn(world * 3, 4, 5, generator=g, dtype=torch.float64)
    local = full[rank * 3 : (rank + 1) * 3].clone().requires_grad_(True)
    index = torch.randint(0, world * 3, (4 + rank,), generator=torch.Generator().manual_seed(rank))
    weights = torch.randn(
        len(index), 4, 5, generator=torch.Generator().manual_seed(10 + rank), dtype=torch.float64
    )
    fetched = fetch_rows(local, index)
    (fetched * weights).sum().backward()
    results["fetch_index"] = index
    results["fetch_weights"] = weights
    results["fetched"] = fetched.detach()
    results["fetch_grad"] = local.grad.clone()
    results["fetch_full"] = full

    # 5. Non-contiguous inputs to the gather (a transposed view) give the same rows.
    base = torch.arange(12, dtype=torch.float64).view(3, 4) + 100 * rank
    results["gather_noncontiguous"] = gather_with_grad(base.T)  # (4, 3) view per rank

    # 6. The whole pretraining objective (ITC + ITM with fetched hard negatives): loss, averaged
    # gradients, and the negatives each rank drew (re-drawn from the same seed for the reference).
    model.zero_grad(set_to_none=True)
    local_ids = key_ids(KEYS_SHARED[rows])
    step = model(pixels[rows], ids[rows], mask[rows], local_ids, seed=123)
    step.loss.backward()
    results["step_loss"] = averaged(step.loss.detach())
    results["step_grads"] = {
        n: averaged(p.grad) for n, p in model.named_parameters() if p.grad is not None
    }
    with torch.no_grad():
        out = contrastive_outputs(
            model.encode_image(pixels[rows]),
            model.encode_text(ids[rows], mask[rows]),
            model.scale(),
            local_ids,
        )
        neg = sample_hard_negatives(  # the seed of the step's negatives, the same on every rank
            out.logits_i2t, out.logits_t2i, out.positives, mix_seed(123, 0x1F), positions
        )
    results["step_text_index"] = neg.text_index
    results["step_image_index"] = neg.image_index

    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
