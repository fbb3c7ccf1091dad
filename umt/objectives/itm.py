"""Image-text matching: a 2-way classifier on the fused CLS over positives and hard negatives."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class ItmOutput(NamedTuple):
    loss: torch.Tensor  # () mean cross-entropy over the counted pairs
    accuracy: torch.Tensor  # () fraction of counted pairs classified right
    accuracy_negatives: torch.Tensor  # () the same over the counted negatives only
    accuracy_per_group: torch.Tensor  # (k,) the same over each group of negatives


def itm_loss(
    logits: torch.Tensor, *negative_valid: torch.Tensor, class_balance: bool = False
) -> ItmOutput:
    """Cross-entropy with labels (1, 0, 0, ...) over `logits` ((1 + k) b, 2) = [positives;
    k groups of negatives], e.g. negative texts, negative images (and the data's negative texts).

    Each `negative_valid` (b,) drops the negatives of its group that could not be drawn (see
    `sample_hard_negatives`); positives always count. `class_balance`: the mean over positives
    and the mean over counted negatives weigh 1/2 each.
    """
    b = negative_valid[0].shape[0]
    k = len(negative_valid)
    logits = logits.float()
    labels = torch.cat([logits.new_ones(b), logits.new_zeros(k * b)]).long()
    counted = torch.cat([torch.ones_like(negative_valid[0]), *negative_valid]).float()
    # `where`, not a product, on the logits themselves: a pair left out may score NaN or inf,
    # NaN * 0 is NaN, and a NaN logit would also make the cross-entropy's gradient NaN.
    logits = torch.where(counted[:, None] > 0, logits, torch.zeros_like(logits))
    per_pair = F.cross_entropy(logits, labels, reduction="none")
    if class_balance:
        negatives = counted[b:]
        loss = 0.5 * per_pair[:b].mean() + 0.5 * (
            per_pair[b:] * negatives
        ).sum() / negatives.sum().clamp_min(1)
    else:
        loss = (per_pair * counted).sum() / counted.sum()
    with torch.no_grad():
        right = (logits.argmax(dim=1) == labels).float() * counted
        accuracy = right.sum() / counted.sum()
        accuracy_negatives = right[b:].sum() / counted[b:].sum().clamp_min(1)
        per_group = right[b:].view(k, b).sum(1) / counted[b:].view(k, b).sum(1).clamp_min(1)
    return ItmOutput(loss, accuracy, accuracy_negatives, per_group)
