"""Under torchrun (gloo, any number of ranks): the ring ITC against the all-gathered one on the
same inputs, in float64, with image keys shared within and across ranks. Each rank saves, for
both implementations: its loss, accuracies, the gradients of its embeddings and of the scale,
the negatives drawn, and a whole pretraining step (ITC + ITM) with every parameter's gradient. Writes argv[1]/rank{R}.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.objectives.objective_cases import global_batch, tiny_model  # noqa: E402
from umt.objectives import Mining, ObjectiveConfig, contrastive_outputs, key_ids  # noqa: E402

B, D = 5, 16  # rows per rank, embedding width


def global_embeddings(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    images = F.normalize(torch.randn(world * B, D, generator=g, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(world * B, D, generator=g, dtype=torch.float64), dim=-1)
    return images, texts


def keys(world: int) -> list[str]:
    """Key k of row g: pairs of rows share one (g // 2), so a pair spans two ranks where the
    boundary cuts it; every fifth row is a caption of image "x" (on every rank)."""
    return ["x" if g % 5 == 3 else f"k{g // 2}" for g in range(world * B)]


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    images, texts = global_embeddings(world)
    rows = slice(rank * B, (rank + 1) * B)
    ids = key_ids(keys(world)[rows])
    results = {}
    for impl, tile in (("gather", 4096), ("ring", 2)):  # a tile that cuts every block
        img = images[rows].clone().requires_grad_(True)
        txt = texts[rows].clone().requires_grad_(True)
        scale = torch.tensor(7.5, dtype=torch.float64, requires_grad=True)
        out = contrastive_outputs(
            img, txt, scale, ids, impl=impl, tile=tile, mining=Mining(11, 0.7)
        )
        out.loss.backward()
        results[impl] = {
            "loss": out.loss.detach(),
            "accuracy": torch.stack([out.accuracy_i2t, out.accuracy_t2i]).double(),
            "grad_images": img.grad,
            "grad_texts": txt.grad,
            "grad_scale": scale.grad,
            "negatives": torch.stack([t.long() for t in out.negatives]),
        }
        # A whole pretraining step: ITC, and ITM on the mined negatives fetched from their owners.
        model = tiny_model()
        pixels, input_ids, mask = global_batch(n=world * 3)
        part = slice(rank * 3, (rank + 1) * 3)
        step_ids = key_ids([f"k{i // 2}" for i in range(world * 3)][part])  # pairs span ranks
        objectives = ObjectiveConfig(itc_impl=impl, itc_tile=tile)
        step = model(pixels[part], input_ids[part], mask[part], step_ids, 5, objectives)
        step.loss.backward()
        results[impl]["step_loss"] = step.loss.detach()
        results[impl]["step_grads"] = {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }
    # A step of the multiway model (modality experts, ITC from the fusion's one-modality passes).
    model = tiny_model(multiway=True)
    pixels, input_ids, mask = global_batch(n=world * 3)
    part = slice(rank * 3, (rank + 1) * 3)
    step_ids = key_ids([f"k{i // 2}" for i in range(world * 3)][part])
    step = model(pixels[part], input_ids[part], mask[part], step_ids, 5, ObjectiveConfig())
    step.loss.backward()
    results["multiway"] = {
        "step_loss": step.loss.detach(),
        "step_grads": {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        },
    }

    # The sigmoid loss (always by neighbour exchange) on the same embeddings.
    img = images[rows].clone().requires_grad_(True)
    txt = texts[rows].clone().requires_grad_(True)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    out = contrastive_outputs(
        img, txt, scale, ids, tile=3, mining=Mining(11, 0.7), loss="sigmoid", logit_bias=bias
    )
    out.loss.backward()
    results["sigmoid"] = {
        "loss": out.loss.detach(),
        "grads": [img.grad, txt.grad, scale.grad, bias.grad],
        "negatives": torch.stack([t.long() for t in out.negatives]),
    }
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
