"""Hard negatives for ITM, drawn from the whole global batch and fetched from their owner ranks.

For each local image one negative text, for each local text one negative image, with probability
proportional to exp(similarity logit) over the non-positives of the row (BLIP/ALBEF's softmax
weights with positives zeroed). Sampling is Gumbel-max on the masked logits: exact for that
distribution, immune to softmax underflow at large logit scales, reproducible from a seed.

The noise of (row, column) is a hash of the seed and their global positions (`noise.gumbel`),
and the maximum is taken over column tiles (`GumbelMax`), so the all-gathered ITC, the ring
(`umt.objectives.ring`) and one contrastive batch per optimizer step (`umt.objectives.step`)
draw the same negatives, whatever the split into ranks, micro-batches and tiles.
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


def beats(value: torch.Tensor, col: torch.Tensor, best: torch.Tensor, best_col: torch.Tensor):
    """Where (value, col) beats the running (best, best_col): a higher value; on a tie, the lower
    global column, so the result does not depend on the order columns come in."""
    return (value > best) | ((value == best) & (col < best_col))


class GumbelMax:
    """Streaming argmax over columns of (logit + Gumbel(seed, stream, row, column)) among the
    non-positives of each row: columns may come in any order and tiles of any width."""

    def __init__(
        self, rows: torch.Tensor, seed: int, stream: int, state: list[torch.Tensor] | None = None
    ):
        self.rows, self.seed, self.stream = rows, seed, stream  # rows: (b,) global indices
        if state is not None:  # carried from another rank (`state`)
            self.best, self.col, seen = state
            self.any = seen.view(torch.bool)
            return
        self.best = torch.full(rows.shape, float("-inf"), dtype=torch.float64, device=rows.device)
        self.col = torch.full(rows.shape, -1, dtype=torch.long, device=rows.device)
        self.any = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)

    def state(self) -> list[torch.Tensor]:
        """The running draw as tensors that can travel to another rank (no bool dtype)."""
        return [self.best, self.col, self.any.view(torch.uint8)]

    @torch.no_grad()
    def update(
        self,
        logits: torch.Tensor,
        positives: torch.Tensor,
        cols: torch.Tensor,
        part: slice = slice(None),
    ) -> None:
        """`logits` (r, c) already scaled by the sharpness, `positives` (r, c), `cols` (c,), for
        the rows `part` (all of them by default)."""
        noisy = logits.double() + gumbel(self.seed, self.stream, self.rows[part], cols)
        noisy = noisy.masked_fill(positives, float("-inf"))
        value, at = noisy.max(dim=1)  # the first maximum: the lowest column of the tile
        col = cols[at]
        best, current = self.best[part], self.col[part]
        better = beats(value, col, best, current)  # ties: -inf, in practice
        self.best[part] = torch.where(better, value, best)
        self.col[part] = torch.where(better, col, current)
        self.any[part] |= ~positives.all(dim=1)

    def absorb(self, other: GumbelMax) -> None:
        """Fold in the draw of the same rows over other columns."""
        better = beats(other.best, other.col, self.best, self.col)
        self.best = torch.where(better, other.best, self.best)
        self.col = torch.where(better, other.col, self.col)
        self.any = self.any | other.any

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(global column of each row's draw, valid). Documented fallback: a row with no
        non-positive column (a global batch of one image) points at itself and is left out of
        the ITM loss through `valid`."""
        return torch.where(self.any, self.col, self.rows), self.any


def _draw(
    logits: torch.Tensor,
    positives: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    seed: int,
    stream: int,
    tile: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    state = GumbelMax(rows, seed, stream)
    for start in range(0, logits.shape[1], tile):
        state.update(
            logits[:, start : start + tile].detach(),
            positives[:, start : start + tile],
            cols[start : start + tile],
        )
    return state.result()


def sample_hard_negatives(
    logits_i2t: torch.Tensor,
    logits_t2i: torch.Tensor,
    positives: torch.Tensor,
    seed: int,
    rows: torch.Tensor,
    cols: torch.Tensor | None = None,
    tile: int = 4096,
) -> HardNegatives:
    """Draw one negative text per local image and one negative image per local text.

    `logits_*`: (b, n) this rank's rows against the global batch; `positives`: (b, n) bool;
    `seed`: the same on every rank; `rows` (b,) and `cols` (n,, default 0..n-1): the global
    positions of the rows and the columns, which the noise is hashed from (so any split of the
    global batch into ranks, micro-batches and tiles draws the same negatives). Returned indices
    are global positions.
    """
    if cols is None:
        cols = torch.arange(positives.shape[1], device=positives.device)
    text_index, text_valid = _draw(logits_i2t, positives, rows, cols, seed, TEXTS, tile)
    image_index, image_valid = _draw(logits_t2i, positives, rows, cols, seed, IMAGES, tile)
    return HardNegatives(text_index, text_valid, image_index, image_valid)


TEXTS, IMAGES = 0, 1  # noise streams: negative texts of images, negative images of texts
