"""Hard-negative sampling as training draws it (Gumbel noise hashed from the seed and global
positions): the softmax law, positives excluded, seeds, fallback, underflow, any tiling."""

from __future__ import annotations

import torch

from umt.objectives import positive_mask, sample_hard_negatives

DRAWS = 40_000


def rows(n: int) -> torch.Tensor:
    return torch.arange(n)


def draw_many(logits_row: torch.Tensor, positives_row: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """DRAWS independent draws for one row: the row repeated at DRAWS global positions (the
    noise of each position is its own)."""
    logits = logits_row.expand(DRAWS, -1)
    pos = positives_row.expand(DRAWS, -1)
    neg = sample_hard_negatives(logits, logits, pos, seed, rows(DRAWS))
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
    pos = positive_mask(torch.arange(8), torch.arange(32), rows(8), rows(32))

    def run(seed):
        return sample_hard_negatives(logits, logits_t2i, pos, seed, rows(8))

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a.text_index, b.text_index) and torch.equal(a.image_index, b.image_index)
    assert not torch.equal(a.text_index, c.text_index)


def test_positives_are_never_drawn():
    ids = torch.tensor([0, 1, 1, 2, 2, 2, 3, 4])
    pos = positive_mask(ids, ids, rows(8), rows(8))
    logits = torch.where(pos, 50.0, 0.0)  # positives are by far the most similar
    for seed in range(200):
        neg = sample_hard_negatives(logits, logits, pos, seed, rows(8))
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
    neg = sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1), pos, 0, rows(1))
    assert not neg.text_valid.any() and not neg.image_valid.any()
    assert neg.text_index.tolist() == [0]  # points at itself; ITM leaves it out


def test_the_draw_is_the_same_for_any_tiling_and_column_order():
    """What the ring and one contrastive batch per step rely on: the noise belongs to (row,
    column) by global position, so tiles and the order columns arrive in change nothing."""
    g = torch.Generator().manual_seed(3)
    logits, logits_t2i = torch.randn(5, 24, generator=g), torch.randn(5, 24, generator=g)
    pos = positive_mask(torch.arange(5), torch.arange(24), rows(5) + 7, rows(24))
    whole = sample_hard_negatives(logits, logits_t2i, pos, 11, rows(5) + 7)
    for tile in (1, 5, 24):
        tiled = sample_hard_negatives(logits, logits_t2i, pos, 11, rows(5) + 7, tile=tile)
        assert all(torch.equal(a, b) for a, b in zip(tiled, whole))
    order = torch.randperm(24, generator=g)
    shuffled = sample_hard_negatives(
        logits[:, order], logits_t2i[:, order], pos[:, order], 11, rows(5) + 7, order, tile=7
    )
    assert torch.equal(shuffled.text_index, whole.text_index)
    assert torch.equal(shuffled.image_index, whole.image_index)
