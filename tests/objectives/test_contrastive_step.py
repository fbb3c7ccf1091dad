"""`objectives.contrastive_batch: step` is exact: A micro-batches per rank on W ranks give the loss,
the ITM negatives and every parameter gradient of one micro-batch holding all the step's samples
(one process, the plain objective), in float64 with dropout 0, for gather-softmax, ring-softmax
and ring-sigmoid; and with dropout, pass 3's embeddings equal pass 1's bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_torchrun
from tests.objectives.contrastive_step_cases import (
    VARIANTS,
    N,
    global_step_batch,
    step_model,
)
from umt.objectives import Mining, contrastive_outputs, mix_seed
from umt.objectives.step import StepLayout

SCRIPT = Path(__file__).with_name("_ranks_contrastive_step.py")
SEED = 17  # the script's
TOPOLOGIES = [(2, 4), (1, 8), (4, 2)]  # (ranks, micro-batches per rank), 2 samples each


@pytest.fixture(scope="module")
def references() -> dict:
    """One process, one micro-batch of all N samples: the plain objective (micro mode)."""
    pixels, _, ids, mask, image_ids = global_step_batch()
    out = {}
    for name, objectives in VARIANTS.items():
        model = step_model(objectives)
        plain = objectives.__class__(**{**vars(objectives), "contrastive_batch": "micro"})
        step = model(pixels, ids, mask, image_ids, seed=SEED, objectives=plain)
        step.loss.backward()
        with torch.no_grad():  # the negatives the plain step drew
            text, image = model.embed_text(ids, mask), model.embed_image(pixels)
            itc = contrastive_outputs(
                image.embeds, text.embeds, model.scale(), image_ids, impl=plain.itc_impl,
                tile=plain.itc_tile, mining=Mining(mix_seed(SEED, 0x1F), 1.0),
                loss=plain.itc_loss, logit_bias=model.logit_bias(),
            )  # fmt: skip
        out[name] = {
            "loss": step.loss.detach(),
            "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            "negatives": torch.stack([itc.negatives.text_index, itc.negatives.image_index]),
        }
    return out


@pytest.fixture(scope="module", params=TOPOLOGIES, ids=lambda t: f"{t[0]}x{t[1]}")
def ranks(request, tmp_path_factory) -> list[dict]:
    world, accum = request.param
    out = tmp_path_factory.mktemp(f"step{world}x{accum}")
    run_torchrun(SCRIPT, str(out), str(accum), nproc=world)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_step_mode_equals_one_micro_batch_of_the_whole_step(ranks, references, variant):
    want = references[variant]
    for res in ranks:
        got = res[variant]
        assert abs(got["loss"].item() - want["loss"].item()) <= 1e-10
        assert torch.equal(got["negatives"], want["negatives"])  # the same draw, by position
        assert got["grads"].keys() == want["grads"].keys()
        for name, grad in want["grads"].items():
            err = (got["grads"][name] - grad).abs().max().item()
            assert err <= 1e-10, f"{variant} {name}: {err:.2e}"
    assert any(n.startswith("fusion.") for n in want["grads"])  # ITM's gradient is in it


@pytest.mark.slow
def test_pass_3_replays_the_dropout_of_pass_1(ranks):
    for res in ranks:
        dropout = res["dropout"]
        assert torch.equal(dropout["pass1"], dropout["pass3"])
        assert dropout["pass1"].shape[0] == dropout["rows"]


def test_the_layout_follows_the_loaders_dealing_and_indexes_every_rank_row():
    """Micro-batch m of rank r holds positions m*W*b + r*b + i; rank-major indices of all the
    step's positions are every rank's rows, each once."""
    layouts = [StepLayout(3, r, 4, 2) for r in range(3)]
    assert layouts[1].positions(2).tolist() == [14, 15]
    every = torch.cat([lay.all_positions() for lay in layouts])
    assert sorted(every.tolist()) == list(range(24))
    major = layouts[0].rank_major(every)
    assert major.tolist() == list(range(24))  # rank by rank, micro-batch after micro-batch
    assert N % (2 * 4) == 0  # every topology of the tests splits the step evenly
