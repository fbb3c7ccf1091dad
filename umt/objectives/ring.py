"""Exact ITC without the global logits (`objectives.itc_impl: ring`), after Inf-CL.

The all-gathered ITC holds this rank's (b, W*b) logits, their softmax and their gradient: memory
grows with the global batch. Here the other ranks' embedding blocks travel around a ring instead
(send to rank+1, receive from rank-1; the next block arrives while this one is scored). Each row
keeps an online log-sum-exp, the mean logit of its positives (soft targets over the same-key
columns, across ranks too), its top-1 (for the accuracies) and a streaming Gumbel-max for the
ITM negatives; within a block the columns are taken `tile` at a time. Backward goes around the
ring again, recomputing each tile's logits: the next block is on its way while this one is
scored, and the gradient of each block follows it, arriving at its owner after a last hop. Peak
memory O(b * tile) for the loss, no all-gather. Accuracies (top-1 per row) are kept only on the
steps that log them (`metrics`); the sigmoid loss then skips its text rows' logits altogether.

Loss, gradients and drawn negatives equal the all-gathered version's (`contrastive_outputs`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from umt.objectives.hard_negatives import IMAGES, TEXTS, GumbelMax


class RingOutput(NamedTuple):
    loss: torch.Tensor  # () this rank's loss, as `contrastive_outputs`
    accuracy_i2t: torch.Tensor | None  # () with `metrics`
    accuracy_t2i: torch.Tensor | None  # ()
    negatives: tuple[torch.Tensor, ...] | None  # text_index, text_valid, image_index, image_valid


class Mining(NamedTuple):
    seed: int
    sharpness: float


class _Ring:
    """This rank's place in the ring of `group`, and one hop of a list of tensors."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.distributed = dist.is_available() and dist.is_initialized()
        self.group = group
        self.world = dist.get_world_size(group) if self.distributed else 1
        self.rank = dist.get_rank(group) if self.distributed else 0
        if self.distributed:
            self.next = (
                dist.get_global_rank(group, (self.rank + 1) % self.world)
                if group
                else (self.rank + 1) % self.world
            )
            self.prev = (
                dist.get_global_rank(group, (self.rank - 1) % self.world)
                if group
                else (self.rank - 1) % self.world
            )

    def start_hop(self, tensors: list[torch.Tensor]):
        """Send `tensors` to the next rank and receive the previous rank's; (requests, buffers)."""
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in received]
        return dist.batch_isend_irecv(ops), received

    @staticmethod
    def finish_hop(pending) -> list[torch.Tensor]:
        requests, received = pending
        for request in requests:
            request.wait()
        return received


class _RowStats:
    """Running statistics of each local row over the columns seen so far: with `softmax`, the
    online log-sum-exp and its positives' logit sum and count (the sigmoid loss needs none of
    these); with `top1`, its top column (for the accuracy; only on steps that log it)."""

    def __init__(self, b: int, dtype: torch.dtype, device: torch.device, softmax: bool, top1: bool):
        self.softmax, self.top1 = softmax, top1
        if softmax:
            self.max = torch.full((b,), float("-inf"), dtype=dtype, device=device)
            self.sum = torch.zeros(b, dtype=dtype, device=device)  # of exp(logit - max)
            self.positive_sum = torch.zeros(b, dtype=dtype, device=device)
            self.positive_count = torch.zeros(b, dtype=dtype, device=device)
        if top1:
            self.top = torch.full((b,), float("-inf"), dtype=dtype, device=device)
            self.top_col = torch.full((b,), -1, dtype=torch.long, device=device)
            self.top_positive = torch.zeros(b, dtype=torch.bool, device=device)

    @property
    def needed(self) -> bool:
        return self.softmax or self.top1

    def update(self, logits: torch.Tensor, positives: torch.Tensor, cols: torch.Tensor) -> None:
        value, at = logits.max(dim=1)
        if self.softmax:
            new_max = torch.maximum(self.max, value)
            self.sum = self.sum * torch.exp(self.max - new_max) + torch.exp(
                logits - new_max[:, None]
            ).sum(dim=1)
            self.max = new_max
            self.positive_sum += (logits * positives).sum(dim=1)
            self.positive_count += positives.sum(dim=1)
        if self.top1:
            col = cols[at]
            better = (value > self.top) | ((value == self.top) & (col < self.top_col))
            self.top = torch.where(better, value, self.top)
            self.top_col = torch.where(better, col, self.top_col)
            self.top_positive = torch.where(
                better, positives.gather(1, at[:, None])[:, 0], self.top_positive
            )

    def lse(self) -> torch.Tensor:
        return self.max + torch.log(self.sum)

    def accuracy(self) -> torch.Tensor | None:
        return self.top_positive.float().mean() if self.top1 else None


def _positives(
    row_ids: torch.Tensor, rows: torch.Tensor, col_ids: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """(b, c) bool: same image key, or the pair itself (global row index == column index)."""
    return (row_ids[:, None] == col_ids[None, :]) | (rows[:, None] == cols[None, :])


def _tiles(b: int, tile: int):
    for start in range(0, b, tile):
        yield start, min(b, start + tile)


class _RingContrastive(torch.autograd.Function):
    """`kind` softmax: symmetric InfoNCE with soft targets over same-key columns (both directions,
    online log-sum-exp). `kind` sigmoid: SigLIP's pairwise loss over image rows x text columns,
    -sum log sigmoid(z * (scale * sim + bias)) / b, z = +1 for same-key pairs and -1 otherwise;
    its text rows are scored for the accuracy and the negatives only."""

    @staticmethod
    def forward(ctx, images, texts, scale, bias, ids, rows, group, tile, mining, kind, metrics):
        ring = _Ring(group)
        b = images.shape[0]
        softmax = kind == "softmax"
        i2t = _RowStats(b, images.dtype, images.device, softmax, metrics)
        t2i = _RowStats(b, images.dtype, images.device, softmax, metrics)
        # The sigmoid loss scores image rows against text columns; the text rows only feed the
        # accuracy and the negatives, so steps that need neither skip their logits.
        score_texts = t2i.needed or mining is not None
        pairwise = torch.zeros((), dtype=images.dtype, device=images.device)
        if mining is not None:
            draw_texts = GumbelMax(rows, mining.seed, TEXTS)
            draw_images = GumbelMax(rows, mining.seed, IMAGES)
        scaled_images, scaled_texts = scale * images, scale * texts
        block = [texts, images, ids, rows]
        for k in range(ring.world):
            pending = ring.start_hop(block) if k < ring.world - 1 else None  # overlaps the tiles
            block_texts, block_images, block_ids, block_rows = block
            for start, end in _tiles(b, tile):
                cols = block_rows[start:end]  # the columns' global positions
                positives = _positives(ids, rows, block_ids[start:end], cols)
                logits_i2t = scaled_images @ block_texts[start:end].T
                if i2t.needed:
                    i2t.update(logits_i2t, positives, cols)
                if kind == "sigmoid":  # -log sigmoid(+-z) over the tile, z = logit + bias
                    z = logits_i2t + bias
                    pairwise -= F.logsigmoid(torch.where(positives, z, -z)).sum()
                if score_texts:
                    logits_t2i = scaled_texts @ block_images[start:end].T
                    if t2i.needed:
                        t2i.update(logits_t2i, positives, cols)
                if mining is not None:
                    draw_texts.update(logits_i2t * mining.sharpness, positives, cols)
                    draw_images.update(logits_t2i * mining.sharpness, positives, cols)
            if pending is not None:
                block = ring.finish_hop(pending)
        if softmax:
            lse_i2t, lse_t2i = i2t.lse(), t2i.lse()
            per_row = (lse_i2t - i2t.positive_sum / i2t.positive_count) + (
                lse_t2i - t2i.positive_sum / t2i.positive_count
            )
            loss = per_row.mean() / 2
            ctx.save_for_backward(images, texts, scale, bias, ids, rows, lse_i2t, lse_t2i)
            ctx.counts = (i2t.positive_count, t2i.positive_count)
        else:
            loss = pairwise / b
            ctx.save_for_backward(images, texts, scale, bias, ids, rows)
        ctx.group, ctx.tile, ctx.kind = group, tile, kind
        accuracies = (i2t.accuracy(), t2i.accuracy()) if metrics else ()
        negatives = ()
        if mining is not None:
            negatives = (*draw_texts.result(), *draw_images.result())
        for t in (*accuracies, *negatives):
            ctx.mark_non_differentiable(t)
        return (loss, *accuracies, *negatives)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        images, texts, scale, bias, ids, rows, *lse = ctx.saved_tensors
        softmax = ctx.kind == "softmax"
        ring = _Ring(ctx.group)
        b = images.shape[0]
        grad_images = torch.zeros_like(images)
        grad_texts = torch.zeros_like(texts) if softmax else None  # sigmoid: all of it comes home
        grad_scale, grad_bias = torch.zeros_like(scale), torch.zeros_like(bias)
        # What travels: the columns each direction scores against, and their gradients. The
        # sigmoid loss scores image rows against text columns only: no image block and no image
        # gradient buffer travel.
        columns = [texts, images] if softmax else [texts]
        block = [ids, rows, *columns, *(torch.zeros_like(c) for c in columns)]
        n = len(columns)
        # Per-element factors of the (b, c) gradient are folded into its (b, D) products.
        factor = grad_loss / (2 * b) if softmax else grad_loss / b
        for k in range(ring.world):
            # The columns move on while they are scored here; their gradients follow after.
            ahead = ring.start_hop(block[: 2 + n]) if k < ring.world - 1 else None
            block_ids, block_rows = block[:2]
            block_columns, block_grads = block[2 : 2 + n], block[2 + n :]
            directions = [(images, block_columns[0], grad_images, block_grads[0])]
            if softmax:
                directions.append((texts, block_columns[1], grad_texts, block_grads[1]))
            for start, end in _tiles(b, ctx.tile):
                cols = block_rows[start:end]
                positives = _positives(ids, rows, block_ids[start:end], cols)
                for d, (local, other, grad_local, grad_other) in enumerate(directions):
                    raw = local @ other[start:end].T  # (b, c) similarities
                    if softmax:  # softmax(row) - uniform over the row's positives
                        g = torch.addcmul(-lse[d][:, None], raw, scale).exp_()
                        g.sub_(positives / ctx.counts[d][:, None])
                    else:  # d/dz of -log sigmoid(+-z): sigmoid(z) - [a positive]
                        g = torch.addcmul(bias, raw, scale).sigmoid_()
                        g.add_(positives, alpha=-1)
                        grad_bias += g.sum() * factor
                    grad_local += (g @ other[start:end]) * (scale * factor)
                    grad_other[start:end] += (g.T @ local) * (scale * factor)
                    grad_scale += torch.vdot(g.view(-1), raw.view(-1)) * factor
            if ring.world > 1:  # the gradients hop too (home after a last hop)
                grads = ring.finish_hop(ring.start_hop(block_grads))
                columns_now = ring.finish_hop(ahead) if ahead is not None else block[: 2 + n]
                block = columns_now + grads
        home = block[2 + n :]  # the gradients of this rank's own columns
        if softmax:
            grad_texts += home[0]
            grad_images += home[1]
        else:
            grad_texts = home[0]
        return (grad_images, grad_texts, grad_scale, grad_bias, *[None] * 7)


def ring_contrastive(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    ids: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    tile: int = 4096,
    mining: Mining | None = None,
    loss: str = "softmax",
    logit_bias: torch.Tensor | float = 0.0,
    positions: torch.Tensor | None = None,
    metrics: bool = True,
) -> RingOutput:
    """ITC of this rank's rows (b, D) against every rank's, exact, in O(b * tile) memory.

    `ids` (b,) int64 image keys (`data_pipeline.sample_ids.key_ids`); `mining`: also draw ITM
    hard negatives (as `sample_hard_negatives`); `loss`: `softmax` (InfoNCE) or `sigmoid`
    (SigLIP, with `logit_bias`); `positions` (b,): the rows' global positions (default
    rank * b + i), travelling with their block; `metrics`: also the accuracies (the step logs
    them), else None. Every rank calls it with the same b.
    """
    if loss not in ("softmax", "sigmoid"):
        raise ValueError(f"objectives.itc_loss must be softmax or sigmoid (got {loss!r})")
    dtype = torch.promote_types(image_embeds.dtype, torch.float32)  # fp32 at least, as gather
    images, texts = image_embeds.to(dtype), text_embeds.to(dtype)
    scale = torch.as_tensor(logit_scale, device=images.device).to(dtype).reshape(())
    bias = torch.as_tensor(logit_bias, device=images.device).to(dtype).reshape(())
    if positions is None:
        positions = (
            torch.arange(images.shape[0], device=images.device)
            + _Ring(group).rank * (images.shape[0])
        )
    out = _RingContrastive.apply(
        images, texts, scale, bias, ids, positions, group, tile, mining, loss, metrics
    )
    loss, *rest = out
    accuracies, negatives = (rest[:2], rest[2:]) if metrics else ((None, None), rest)
    return RingOutput(loss, *accuracies, tuple(negatives) if negatives else None)
