"""`objectives.itc_impl: ring` equals `gather`: loss, every gradient and the ITM negatives, at
1, 2 and 4 real ranks (torchrun + gloo, float64), with image keys shared within and across ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import run_torchrun
from umt.objectives import Mining, contrastive_outputs, key_ids

SCRIPT = Path(__file__).with_name("_ranks_ring.py")


@pytest.fixture(scope="module", params=[1, 2, 4])
def ranks(request, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp(f"ring{request.param}")
    run_torchrun(SCRIPT, str(out), nproc=request.param)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(request.param)]


@pytest.mark.slow
def test_ring_loss_gradients_and_accuracies_equal_gather(ranks):
    for res in ranks:
        gather, ring = res["gather"], res["ring"]
        assert abs(gather["loss"].item() - ring["loss"].item()) <= 1e-12
        for name in ("grad_images", "grad_texts", "grad_scale"):
            err = (gather[name] - ring[name]).abs().max().item()
            assert err <= 1e-12, f"{name}: {err:.2e}"
        assert torch.equal(gather["accuracy"], ring["accuracy"])


@pytest.mark.slow
def test_ring_draws_the_same_negatives_as_gather(ranks):
    for res in ranks:
        assert torch.equal(res["gather"]["negatives"], res["ring"]["negatives"])
        text_valid = res["ring"]["negatives"][1]
        assert text_valid.all()  # every row has non-positive columns


@pytest.mark.slow
def test_a_training_step_with_itm_is_the_same_with_ring(ranks):
    for res in ranks:
        gather, ring = res["gather"], res["ring"]
        assert abs(gather["step_loss"].item() - ring["step_loss"].item()) <= 1e-12
        assert gather["step_grads"].keys() == ring["step_grads"].keys()
        for name, grad in gather["step_grads"].items():
            err = (grad - ring["step_grads"][name]).abs().max().item()
            assert err <= 1e-12, f"{name}: {err:.2e}"


@pytest.mark.slow
def test_sigmoid_loss_equals_one_process_on_the_global_batch(ranks):
    """SigLIP's loss with every same-key pair positive (not only the diagonal), by neighbour
    exchange on W ranks, averaged as DeepSpeed averages = one process on the global batch:
    -sum log sigmoid(z * (scale * x.y + bias)) / B, and every gradient, in float64."""
    from tests.objectives._ranks_ring import B, global_embeddings, keys

    world = len(ranks)
    images, texts = global_embeddings(world)
    images.requires_grad_(True)
    texts.requires_grad_(True)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    ids = key_ids(keys(world))
    signs = (ids[:, None] == ids[None, :]).double() * 2 - 1  # the diagonal is a positive too
    logits = scale * images @ texts.T + bias
    reference = -F.logsigmoid(signs * logits).sum() / (world * B)
    reference.backward()
    assert (signs > 0).sum() > world * B  # same-key pairs off the diagonal, across ranks too
    losses = torch.stack([res["sigmoid"]["loss"] for res in ranks])
    assert abs(losses.mean().item() - reference.item()) <= 1e-12
    for r, res in enumerate(ranks):
        grad_images, grad_texts, _, _ = res["sigmoid"]["grads"]
        rows = slice(r * B, (r + 1) * B)
        assert torch.allclose(grad_images / world, images.grad[rows], atol=1e-12, rtol=0)
        assert torch.allclose(grad_texts / world, texts.grad[rows], atol=1e-12, rtol=0)
    for i, want in ((2, scale.grad), (3, bias.grad)):
        got = torch.stack([res["sigmoid"]["grads"][i] for res in ranks]).mean()
        assert abs(got.item() - want.item()) <= 1e-12
    # ITM's negatives from the sigmoid path: never a same-key column, drawn for every row.
    for r, res in enumerate(ranks):
        text_index, text_valid, image_index, image_valid = res["sigmoid"]["negatives"]
        own = ids[r * B : (r + 1) * B]
        assert text_valid.all() and image_valid.all()
        assert not (ids[text_index] == own).any() and not (ids[image_index] == own).any()


def test_ring_in_one_process_with_any_tile_equals_gather():
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(9, 6, generator=g, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(9, 6, generator=g, dtype=torch.float64), dim=-1)
    ids = key_ids(["a", "a", "b", "c", "c", "c", "d", "e", "f"])
    outs = []
    for impl, tile in (("gather", 4096), ("ring", 1), ("ring", 4), ("ring", 9)):
        img, txt = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
        out = contrastive_outputs(img, txt, 3.0, ids, impl=impl, tile=tile, mining=Mining(2, 1.0))
        out.loss.backward()
        outs.append((out.loss.item(), img.grad, txt.grad, torch.stack(list(out.negatives))))
    for loss, gi, gt, neg in outs[1:]:
        assert loss == pytest.approx(outs[0][0], abs=1e-13)
        assert torch.allclose(gi, outs[0][1], atol=1e-13) and torch.allclose(
            gt, outs[0][2], atol=1e-13
        )
        assert torch.equal(neg, outs[0][3])


@pytest.mark.parametrize(("impl", "loss"), [("gather", "softmax"), ("ring", "softmax"),
                                           ("ring", "sigmoid")])  # fmt: skip
@pytest.mark.parametrize("mining", [None, Mining(2, 1.0)])
def test_steps_that_log_nothing_skip_the_accuracies_and_nothing_else(impl, loss, mining):
    """The trainer asks for the accuracies on log steps only (`metrics`): without them the loss,
    every gradient and the negatives are bit for bit the same, and the accuracies are None."""
    g = torch.Generator().manual_seed(1)
    images = F.normalize(torch.randn(9, 6, generator=g, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(9, 6, generator=g, dtype=torch.float64), dim=-1)
    ids = key_ids(["a", "a", "b", "c", "c", "c", "d", "e", "f"])
    runs = []
    for metrics in (True, False):
        img, txt = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
        scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
        out = contrastive_outputs(
            img, txt, scale, ids, impl=impl, tile=4, mining=mining, loss=loss,
            logit_bias=bias if loss == "sigmoid" else None, metrics=metrics,
        )  # fmt: skip
        out.loss.backward()
        grads = [img.grad, txt.grad, scale.grad] + ([bias.grad] if loss == "sigmoid" else [])
        runs.append((out, grads))
    (logged, logged_grads), (quiet, quiet_grads) = runs
    assert logged.accuracy_i2t is not None and logged.accuracy_t2i is not None
    assert quiet.accuracy_i2t is None and quiet.accuracy_t2i is None
    assert torch.equal(logged.loss, quiet.loss)
    for a, b in zip(logged_grads, quiet_grads, strict=True):
        assert torch.equal(a, b)
    assert (logged.negatives is None) == (mining is None) == (quiet.negatives is None)
    if mining is not None:
        for a, b in zip(logged.negatives, quiet.negatives, strict=True):
            assert torch.equal(a, b)


def test_hashed_noise_depends_only_on_seed_stream_row_and_column():
    from umt.objectives.noise import gumbel

    rows, cols = torch.arange(40, 50), torch.arange(1000, 1200)
    full = gumbel(5, 0, rows, cols)
    assert torch.equal(full[3:7, 50:90], gumbel(5, 0, rows[3:7], cols[50:90]))
    assert not torch.equal(full, gumbel(6, 0, rows, cols))
    assert not torch.equal(full, gumbel(5, 1, rows, cols))
    # Standard Gumbel: mean 0.5772 (Euler-Mascheroni), variance pi^2 / 6, over 2,000 draws.
    assert abs(full.mean().item() - 0.5772) < 0.1 and abs(full.var().item() - 1.6449) < 0.25


@pytest.mark.slow
def test_a_multiway_step_on_ranks_equals_one_process_on_the_global_batch(ranks):
    """The multiway model (experts, ITC from its one-modality passes), ITC + ITM with negatives
    fetched from their owners, on W ranks averaged = one process on the global batch (the
    hashed noise draws the same negatives from global indices): loss and every gradient, to
    float32 rounding (ITM's cross-entropy runs in float32: per-rank means against one global
    mean differ by ~6e-8; a wrong negative or expert would differ by ~1e-2)."""
    from tests.objectives.objective_cases import global_batch, tiny_model
    from umt.objectives import ObjectiveConfig

    world = len(ranks)
    model = tiny_model(multiway=True)
    pixels, input_ids, mask = global_batch(n=world * 3)
    ids = key_ids([f"k{i // 2}" for i in range(world * 3)])
    step = model(pixels, input_ids, mask, ids, 5, ObjectiveConfig())
    step.loss.backward()
    losses = torch.stack([res["multiway"]["step_loss"] for res in ranks])
    assert abs(losses.mean().item() - step.loss.item()) <= 1e-6
    for name, p in model.named_parameters():
        got = torch.stack([res["multiway"]["step_grads"][name] for res in ranks]).mean(0)
        err = (got - p.grad).abs().max().item()
        assert err <= 1e-6, f"{name}: {err:.2e}"
