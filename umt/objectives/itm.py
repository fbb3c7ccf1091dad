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


class ItmCounts(NamedTuple):
    """The pairs a mean runs over: positives and counted negatives (() tensors or floats)."""

    positives: torch.Tensor | float
    negatives: torch.Tensor | float


def itm_counts(*negative_valid: torch.Tensor) -> ItmCounts:
    """The pairs `itm_loss` counts for these groups of negatives (valid masks (b,))."""
    return ItmCounts(
        float(negative_valid[0].shape[0]), sum(v.float().sum() for v in negative_valid)
    )


def itm_loss(
    logits: torch.Tensor,
    *negative_valid: torch.Tensor,
    class_balance: bool = False,
    over: ItmCounts | None = None,
) -> ItmOutput:
    """Cross-entropy with labels (1, 0, 0, ...) over `logits` ((1 + k) b, 2) = [positives;
    k groups of negatives], e.g. negative texts, negative images (and the data's negative texts).

    Each `negative_valid` (b,) drops the negatives of its group that could not be drawn (see
    `sample_hard_negatives`); positives always count. `class_balance`: the mean over positives
    and the mean over counted negatives weigh 1/2 each. `over`: the counts the means divide by
    (default these pairs'), so that the micro-batches of one contrastive batch add up to its mean.
    """
    b = negative_valid[0].shape[0]
    k = len(negative_valid)
    # Cross-entropy in float32 at least (bf16 logits), float64 stays float64.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    labels = torch.cat([logits.new_ones(b), logits.new_zeros(k * b)]).long()
    counted = torch.cat([torch.ones_like(negative_valid[0]), *negative_valid]).to(logits.dtype)
    over = over or ItmCounts(float(b), counted[b:].sum())
    # `where`, not a product, on the logits themselves: a pair left out may score NaN or inf,
    # NaN * 0 is NaN, and a NaN logit would also make the cross-entropy's gradient NaN.
    logits = torch.where(counted[:, None] > 0, logits, torch.zeros_like(logits))
    per_pair = F.cross_entropy(logits, labels, reduction="none")
    if class_balance:
        negatives = (per_pair[b:] * counted[b:]).sum()
        loss = 0.5 * per_pair[:b].sum() / over.positives + 0.5 * negatives / torch.clamp(
            torch.as_tensor(over.negatives, device=logits.device), min=1
        )
    else:
        loss = (per_pair * counted).sum() / (over.positives + over.negatives)
    with torch.no_grad():
        right = (logits.argmax(dim=1) == labels).to(logits.dtype) * counted
        accuracy = right.sum() / counted.sum()
        accuracy_negatives = right[b:].sum() / counted[b:].sum().clamp_min(1)
        per_group = right[b:].view(k, b).sum(1) / counted[b:].view(k, b).sum(1).clamp_min(1)
    return ItmOutput(loss, accuracy, accuracy_negatives, per_group)
