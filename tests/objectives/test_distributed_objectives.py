"""Multi-rank contracts of the objectives, on 2 real ranks (torchrun + gloo) against one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_torchrun
from tests.objectives.objective_cases import (
    KEYS_SHARED,
    global_batch,
    itc_loss_and_grads,
    tiny_model,
)
from umt.objectives import contrastive_outputs, itm_loss, key_ids

pytestmark = pytest.mark.slow
WORLD = 2
SCRIPT = Path(__file__).with_name("_ranks_objectives.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("objectives")
    run_torchrun(SCRIPT, str(out), nproc=WORLD)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_grads_equal(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        err = (got[name] - want[name]).abs().max().item()
        assert err <= atol, f"{name}: max |grad diff| {err:.3e} > {atol}"


@pytest.mark.parametrize("keys_name, keys", [("distinct", None), ("shared", KEYS_SHARED)])
def test_gathered_itc_equals_single_process_on_global_batch(ranks, keys_name, keys):
    model = tiny_model()
    pixels, ids, mask = global_batch()
    loss, grads = itc_loss_and_grads(model, pixels, ids, mask, keys)
    assert abs(ranks[0][f"itc_{keys_name}_loss"].item() - loss.item()) <= 1e-10
    assert_grads_equal(ranks[0][f"itc_{keys_name}_grads"], grads, atol=1e-10)
    assert len(grads) > 20  # every tower, projection and the logit scale took part


def test_shared_keys_across_ranks_are_itc_positives(ranks):
    ids = key_ids(KEYS_SHARED)
    for r, res in enumerate(ranks):
        local = ids[r * 3 : (r + 1) * 3]
        assert torch.equal(res["positives"], local[:, None] == ids[None, :])
    # row 0 of rank 0 ("a") has a positive on rank 1 (global row 4)
    assert ranks[0]["positives"][0, 4]


def test_hard_negatives_never_share_the_image_key(ranks):
    for res in ranks:
        local, everyone = res["local_key_ids"], res["global_key_ids"]
        for draws in (res["text_draws"], res["image_draws"]):
            assert (everyone[draws] != local[None, :]).all()


def test_hard_negatives_come_from_every_rank(ranks):
    for r, res in enumerate(ranks):
        owners = torch.cat([res["text_draws"], res["image_draws"]]).flatten() // 3
        assert set(owners.tolist()) == {0, 1}, f"rank {r} drew only from {set(owners.tolist())}"


def test_one_key_for_the_whole_global_batch_falls_back_without_nan(ranks):
    for res in ranks:
        assert torch.isfinite(res["same_key_loss"])
        assert not res["same_key_valid"].any()  # no valid negative: left out of ITM


def test_fetch_rows_equals_indexing_the_global_batch_with_grads_to_owners(ranks):
    full = ranks[0]["fetch_full"]
    want_grad = torch.zeros_like(full)
    for res in ranks:
        assert torch.equal(res["fetched"], full[res["fetch_index"]])
        want_grad.index_add_(0, res["fetch_index"], res["fetch_weights"])
    got_grad = torch.cat([res["fetch_grad"] for res in ranks])
    assert torch.equal(got_grad, want_grad)


def test_gather_accepts_non_contiguous_inputs(ranks):
    want = torch.cat([(torch.arange(12.0).view(3, 4) + 100 * r).T for r in range(WORLD)]).double()
    for res in ranks:
        assert torch.equal(res["gather_noncontiguous"], want)


def test_pretraining_step_with_fetched_negatives_equals_single_process(ranks):
    """ITC + ITM on 2 ranks (negatives fetched from their owners) = one process on the global batch
    with the same negatives: loss and every gradient to 1e-10."""
    model = tiny_model()
    pixels, ids, mask = global_batch()
    keys = key_ids(KEYS_SHARED)
    text = model.embed_text(ids, mask)
    image = model.embed_image(pixels)
    itc = contrastive_outputs(image.embeds, text.embeds, model.scale(), keys)
    itm_losses = []
    for r, res in enumerate(ranks):
        rows = slice(r * 3, (r + 1) * 3)
        t, m, v = text.tokens[rows], mask[rows], image.tokens[rows]
        ti, ii = res["step_text_index"], res["step_image_index"]
        logits = model.itm_logits(
            torch.cat([t, text.tokens[ti], t]),
            torch.cat([m, mask[ti], m]),
            torch.cat([v, v, image.tokens[ii]]),
        )
        valid = torch.ones(3, dtype=torch.bool)
        itm_losses.append(itm_loss(logits, valid, valid).loss)
    loss = itc.loss + torch.stack(itm_losses).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert abs(ranks[0]["step_loss"].item() - loss.item()) <= 1e-10
    assert_grads_equal(ranks[0]["step_grads"], grads, atol=1e-10)
    assert any(n.startswith("fusion.") for n in grads) and "itm_head.weight" in grads
