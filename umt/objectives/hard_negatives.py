"""Hard negatives for ITM, drawn from the whole global batch and fetched from their owner ranks.

For each local image one negative text, for each local text one negative image, with probability
proportional to exp(similarity logit) over the non-positives of the row (BLIP/ALBEF's softmax
weights with positives zeroed). Sampling is Gumbel-max on the masked logits: exact for that
distribution, immune to softmax underflow at large logit scales, reproducible from a seed.

Given an int seed, the noise of (row, column) is a hash of their global indices (`noise.gumbel`)
and the maximum is taken over column tiles (`GumbelMax`), so the all-gathered ITC and the ring
(`umt.objectives.ring`) draw the same negatives; a `torch.Generator` draws from its stream.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from umt.objectives.noise import gumbel


class HardNegatives(NamedTuple):
    text_index: torch.Tensor  # (b,) global index of the negative text of each local image
    text_valid: torch.Tensor  # (b,) bool; False where the row has no non-positive column
    image_index: torch.Tensor  # (b,) global index of the negative image of each local text
    image_valid: torch.Tensor  # (b,) bool


class GumbelMax:
    """Streaming argmax over columns of (logit + Gumbel(seed, stream, row, column)) among the
    non-positives of each row: columns may come in any order and tiles of any width."""

    def __init__(self, rows: torch.Tensor, seed: int, stream: int):
        self.rows, self.seed, self.stream = rows, seed, stream  # rows: (b,) global indices
        self.best = torch.full(rows.shape, float("-inf"), dtype=torch.float64, device=rows.device)
        self.col = torch.full(rows.shape, -1, dtype=torch.long, device=rows.device)
        self.any = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, positives: torch.Tensor, cols: torch.Tensor) -> None:
        """`logits` (b, c) already scaled by the sharpness, `positives` (b, c), `cols` (c,)."""
        noisy = logits.double() + gumbel(self.seed, self.stream, self.rows, cols)
        noisy = noisy.masked_fill(positives, float("-inf"))
        value, at = noisy.max(dim=1)  # the first maximum: the lowest column of the tile
        col = cols[at]
        # Ties (of -inf, in practice) go to the lower global column, whatever the order.
        better = (value > self.best) | ((value == self.best) & (col < self.col))
        self.best = torch.where(better, value, self.best)
        self.col = torch.where(better, col, self.col)
        self.any |= ~positives.all(dim=1)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(global column of each row's draw, valid); a row with no non-positive points at itself."""
        return torch.where(self.any, self.col, self.rows), self.any


def _draw_hashed(
    logits: torch.Tensor, positives: torch.Tensor, offset: int, seed: int, stream: int, tile: int
) -> tuple[torch.Tensor, torch.Tensor]:
    b, n = logits.shape
    rows = torch.arange(b, device=logits.device) + offset
    state = GumbelMax(rows, seed, stream)
    for start in range(0, n, tile):
        cols = torch.arange(start, min(n, start + tile), device=logits.device)
        state.update(
            logits[:, start : start + tile].detach(), positives[:, start : start + tile], cols
        )
    return state.result()


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
    noise: torch.Generator | int,
    tile: int = 4096,
) -> HardNegatives:
    """Draw one negative text per local image and one negative image per local text.

    `logits_*`: (b, W*b) this rank's rows against the global batch; `positives`: (b, W*b) bool;
    `offset`: global index of this rank's first row (rank * b); `noise`: an int seed (the same
    on every rank: noise hashed from global indices, as the ring draws it) or a generator on the
    logits' device.
    """
    if isinstance(noise, torch.Generator):
        text_index, text_valid = _draw(logits_i2t, positives, offset, noise)
        image_index, image_valid = _draw(logits_t2i, positives, offset, noise)
    else:
        text_index, text_valid = _draw_hashed(logits_i2t, positives, offset, noise, TEXTS, tile)
        image_index, image_valid = _draw_hashed(logits_t2i, positives, offset, noise, IMAGES, tile)
    return HardNegatives(text_index, text_valid, image_index, image_valid)


TEXTS, IMAGES = 0, 1  # noise streams: negative texts of images, negative images of texts


def negatives_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator seeded only from `seed` (the caller mixes in step and rank), never global RNG."""
    return torch.Generator(device=device).manual_seed(seed)
