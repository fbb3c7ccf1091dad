"""Hard negatives for ITM, drawn from the whole global batch and fetched from their owner ranks.

For each local image one negative text, for each local text one negative image, with probability
proportional to exp(similarity logit) over the non-positives of the row (BLIP/ALBEF's softmax
weights with positives zeroed). Sampling is Gumbel-max on the masked logits: exact for that
distribution, immune to softmax underflow at large logit scales, reproducible from a seed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class HardNegatives(NamedTuple):
    text_index: torch.Tensor  # (b,) global index of the negative text of each local image
    text_valid: torch.Tensor  # (b,) bool; False where the row has no non-positive column
    image_index: torch.Tensor  # (b,) global index of the negative image of each local text
    image_valid: torch.Tensor  # (b,) bool


def _draw(
    logits: torch.Tensor, positives: torch.Tensor, offset: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.detach().float().masked_fill(positives, float("-inf"))
    u = torch.rand(logits.shape, generator=generator, device=logits.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))
    index = (logits + gumbel).argmax(dim=1)
    valid = ~positives.all(dim=1)
    # Documented fallback: a row with no valid negative (global batch of 1, or every sample of
    # one image) points at its own positive and is left out of the ITM loss through `valid`.
    own = torch.arange(logits.shape[0], device=logits.device) + offset
    return torch.where(valid, index, own), valid


def sample_hard_negatives(
    logits_i2t: torch.Tensor,
    logits_t2i: torch.Tensor,
    positives: torch.Tensor,
    offset: int,
    generator: torch.Generator,
) -> HardNegatives:
    """Draw one negative text per local image and one negative image per local text.

    `logits_*`: (b, W*b) this rank's rows against the global batch; `positives`: (b, W*b) bool;
    `offset`: global index of this rank's first row (rank * b); `generator` on the logits' device.
    """
    text_index, text_valid = _draw(logits_i2t, positives, offset, generator)
    image_index, image_valid = _draw(logits_t2i, positives, offset, generator)
    return HardNegatives(text_index, text_valid, image_index, image_valid)


def negatives_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator seeded only from `seed` (the caller mixes in step and rank), never global RNG."""
    return torch.Generator(device=device).manual_seed(seed)
