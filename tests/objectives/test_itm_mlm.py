"""ITM loss with invalid negatives left out; MLM masking rules."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from umt.objectives import itm_loss, mask_tokens
from umt.objectives.mlm import IGNORE


def test_itm_labels_are_one_zero_zero():
    logits = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(2, dtype=torch.bool)
    out = itm_loss(logits, valid, valid)
    want = F.cross_entropy(logits, torch.tensor([1, 1, 0, 0, 0, 0]))
    torch.testing.assert_close(out.loss, want)


def test_itm_leaves_out_invalid_negatives():
    logits = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    out = itm_loss(logits, torch.tensor([True, False]), torch.tensor([False, False]))
    kept = logits[[0, 1, 2]]
    want = F.cross_entropy(kept, torch.tensor([1, 1, 0]))
    torch.testing.assert_close(out.loss, want)
    none = itm_loss(logits, torch.tensor([False, False]), torch.tensor([False, False]))
    assert torch.isfinite(none.loss) and none.accuracy_negatives == 0


def test_mlm_masks_only_real_inner_tokens_in_80_10_10():
    n, t = 400, 32
    ids = torch.randint(1000, 2000, (n, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(n, t, dtype=torch.long)
    mask[:, 20:] = 0
    masked, labels = mask_tokens(ids, mask, 103, 3000, torch.Generator().manual_seed(1), 0.15)
    chosen = labels != IGNORE
    assert not chosen[:, 0].any() and not chosen[:, 19].any() and not chosen[:, 20:].any()
    assert torch.equal(labels[chosen], ids[chosen])
    frac = chosen.sum().item() / (n * 18)
    assert 0.13 < frac < 0.17
    as_mask = (masked[chosen] == 103).float().mean().item()
    unchanged = (masked[chosen] == ids[chosen]).float().mean().item()
    assert 0.77 < as_mask < 0.83 and 0.07 < unchanged < 0.13
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_itm_takes_any_number_of_negative_groups():
    logits = torch.randn(8, 2, generator=torch.Generator().manual_seed(2))
    yes, no = torch.tensor([True, True]), torch.tensor([True, False])
    out = itm_loss(logits, yes, yes, no)
    kept = logits[[0, 1, 2, 3, 4, 5, 6]]
    want = F.cross_entropy(kept, torch.tensor([1, 1, 0, 0, 0, 0, 0]))
    torch.testing.assert_close(out.loss, want)


def test_class_balance_weighs_positives_as_much_as_all_negatives():
    logits = torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    yes, no = torch.tensor([True, True]), torch.tensor([True, False])
    out = itm_loss(logits, yes, yes, no, class_balance=True)
    positives = F.cross_entropy(logits[:2], torch.tensor([1, 1]))
    negatives = F.cross_entropy(logits[[2, 3, 4, 5, 6]], torch.zeros(5).long())
    torch.testing.assert_close(out.loss, 0.5 * positives + 0.5 * negatives)
    # Every negative invalid: only the positives' half remains, finite.
    none = itm_loss(logits[:4], no & False, class_balance=True)
    torch.testing.assert_close(none.loss, 0.5 * positives)


def test_a_nan_or_inf_in_a_pair_left_out_does_not_reach_the_loss_or_its_gradient():
    torch.manual_seed(0)
    b = 4
    logits = torch.randn(3 * b, 2)
    valid = [torch.tensor([True, False, True, True]), torch.tensor([True, True, True, False])]
    for balance in (False, True):
        clean = itm_loss(logits, *valid, class_balance=balance)
        poisoned = logits.clone()
        poisoned[b + 1] = float("nan")  # the negative text of row 1, left out
        poisoned[2 * b + 3, 0] = float("inf")  # the negative image of row 3, left out
        poisoned.requires_grad_(True)
        out = itm_loss(poisoned, *valid, class_balance=balance)
        assert torch.equal(out.loss, clean.loss) and torch.equal(out.accuracy, clean.accuracy)
        out.loss.backward()
        assert torch.isfinite(poisoned.grad).all()
        assert not poisoned.grad[b + 1].any() and not poisoned.grad[2 * b + 3].any()
