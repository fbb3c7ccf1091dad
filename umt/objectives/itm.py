"""Image-text matching: a 2-way classifier on the fused CLS over positives and hard negatives."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class ItmOutput(NamedTuple):
    loss: torch.Tensor  # () mean cross-entropy over the counted pairs
    accuracy: torch.Tensor  # () fraction of counted pairs classified right
    accuracy_negatives: torch.Tensor  # () the same over the counted negatives only


def itm_loss(
    logits: torch.Tensor, text_valid: torch.Tensor, image_valid: torch.Tensor
) -> ItmOutput:
    """Cross-entropy with labels (1, 0, 0) over `logits` (3b, 2) = [positives; negative texts; negative images].

    `text_valid` / `image_valid` (b,) drop negatives that could not be drawn (see
    `sample_hard_negatives`); positives always count.
    """
    b = text_valid.shape[0]
    logits = logits.float()
    labels = torch.cat([logits.new_ones(b), logits.new_zeros(2 * b)]).long()
    counted = torch.cat([torch.ones_like(text_valid), text_valid, image_valid]).float()
    per_pair = F.cross_entropy(logits, labels, reduction="none")
    loss = (per_pair * counted).sum() / counted.sum()
    with torch.no_grad():
        right = (logits.argmax(dim=1) == labels).float() * counted
        accuracy = right.sum() / counted.sum()
        accuracy_negatives = right[b:].sum() / counted[b:].sum().clamp_min(1)
    return ItmOutput(loss, accuracy, accuracy_negatives)
