"""Hard-negative sampling: the softmax law, positives excluded, seeds, fallback, underflow."""

from __future__ import annotations

import torch

from umt.objectives import negatives_generator, positive_mask, sample_hard_negatives

DRAWS = 40_000


def draw_many(logits_row: torch.Tensor, positives_row: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """DRAWS independent draws for one row (the row repeated DRAWS times)."""
    logits = logits_row.expand(DRAWS, -1)
    pos = positives_row.expand(DRAWS, -1)
    neg = sample_hard_negatives(logits, logits, pos, 0, negatives_generator(seed, logits.device))
    return neg.text_index


def test_draws_follow_softmax_over_the_non_positives():
    logits = torch.tensor([[3.0, 1.0, 0.0, 2.0, -1.0, 1.5]])
    positives = torch.tensor([[True, False, False, False, False, False]])
    draws = draw_many(logits, positives)
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[0] == 0
    expected = logits[0, 1:].double().softmax(0) * DRAWS
    chi2 = ((counts[1:] - expected) ** 2 / expected).sum().item()
    # 4 degrees of freedom: P(chi2 > 18.47) = 0.001 under the softmax law.
    assert chi2 < 18.47, f"chi2={chi2:.2f}, counts={counts.tolist()}, expected={expected.tolist()}"


def test_same_seed_same_draws_and_other_seed_other_draws():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 32, generator=g)
    logits_t2i = torch.randn(8, 32, generator=g)
    pos = positive_mask(torch.arange(8), torch.arange(32), 0)

    def run(seed):
        return sample_hard_negatives(
            logits, logits_t2i, pos, 0, negatives_generator(seed, logits.device)
        )

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a.text_index, b.text_index) and torch.equal(a.image_index, b.image_index)
    assert not torch.equal(a.text_index, c.text_index)


def test_positives_are_never_drawn():
    ids = torch.tensor([0, 1, 1, 2, 2, 2, 3, 4])
    pos = positive_mask(ids, ids, 0)
    logits = torch.where(pos, 50.0, 0.0)  # positives are by far the most similar
    for seed in range(200):
        neg = sample_hard_negatives(
            logits, logits, pos, 0, negatives_generator(seed, logits.device)
        )
        assert not pos.gather(1, neg.text_index[:, None]).any()
        assert not pos.gather(1, neg.image_index[:, None]).any()
        assert neg.text_valid.all()


def test_large_logit_scale_does_not_underflow_the_negatives():
    # exp(-(100 - -100)) underflows float32: a softmax over all columns would give the negatives
    # weight 0 and no draw; sampling on masked logits still ranks them.
    logits = torch.tensor([[100.0, -100.0, -99.0, -100.0]])
    pos = torch.tensor([[True, False, False, False]])
    draws = draw_many(logits, pos)
    counts = torch.bincount(draws, minlength=4)
    assert counts[0] == 0 and counts[2] > counts[1] and counts[2] > counts[3]


def test_a_global_batch_of_one_falls_back_to_no_negative():
    pos = torch.tensor([[True]])
    neg = sample_hard_negatives(
        torch.zeros(1, 1), torch.zeros(1, 1), pos, 0, negatives_generator(0, torch.device("cpu"))
    )
    assert not neg.text_valid.any() and not neg.image_valid.any()
    assert neg.text_index.tolist() == [0]  # points at itself; ITM leaves it out
