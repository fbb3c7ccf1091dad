"""Exact ITC without the global logits (`objectives.itc_impl: ring`), after Inf-CL.

The all-gathered ITC holds this rank's (b, W*b) logits, their softmax and their gradient: memory
grows with the global batch. Here the other ranks' text blocks travel around a ring instead
(send to rank+1, receive from rank-1; the next block arrives while this one is scored), and
each tile of local images x visiting texts serves both directions. Its rows update this rank's
images' statistics: an online log-sum-exp, the mean logit of the positives (soft targets over
same-key columns, across ranks too), the top-1 (for the accuracies) and a streaming Gumbel-max
for the ITM negatives. Its columns update the same statistics of the visiting texts over this
rank's images; those partial statistics reach the texts' owner in one all-to-all at the end.
Within a block the columns are taken `tile` at a time. Backward goes around the ring again,
recomputing each tile's logits; each text block's gradient is summed along the ring one hop
behind the block and reaches its owner after a last hop. That is one matmul per tile forward
and three backward, where scoring each direction on its own rank (as `ClipLoss` with
`local_loss` does) takes two and four, and peak memory O(b * tile) for the loss, no all-gather.
Accuracies (top-1 per row) are kept only on the steps that log them (`metrics`).

Loss, gradients and drawn negatives equal the all-gathered version's (`contrastive_outputs`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from umt import distributed
from umt.objectives.hard_negatives import IMAGES, TEXTS, GumbelMax, beats


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

    def to_owners(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """`parts[k]` (b, n): what this rank computed about the block of rank - k (the one here
        at hop k). Returns (W, b, n): what each rank computed about this rank's block."""
        send = torch.stack([parts[(self.rank - owner) % self.world] for owner in range(self.world)])
        return distributed.exchange(send, self.group)  # one rank: `send` itself


class _RowStats:
    """Running statistics of rows over the columns seen so far: with `softmax`, the online
    log-sum-exp and its positives' logit sum and count (the sigmoid loss needs none of these);
    with `top1`, its top column (for the accuracy; only on steps that log it). `state` (from
    `state()`) continues the statistics another rank kept."""

    def __init__(
        self,
        b: int,
        dtype: torch.dtype,
        device: torch.device,
        softmax: bool,
        top1: bool,
        state: list[torch.Tensor] | None = None,
    ):
        self.softmax, self.top1 = softmax, top1
        if state is not None:
            state = list(state)
            if softmax:
                self.max, self.sum, self.positive_sum, self.positive_count = state[:4]
                del state[:4]
            if top1:
                self.top, self.top_col, top_positive = state
                self.top_positive = top_positive.view(torch.bool)
            return
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

    def state(self) -> list[torch.Tensor]:
        """The statistics as tensors that can travel to another rank (no bool dtype)."""
        out = []
        if self.softmax:
            out += [self.max, self.sum, self.positive_sum, self.positive_count]
        if self.top1:
            out += [self.top, self.top_col, self.top_positive.view(torch.uint8)]
        return out

    def update(
        self,
        logits: torch.Tensor,
        positives: torch.Tensor,
        cols: torch.Tensor,
        part: slice = slice(None),
    ) -> None:
        """`logits` and `positives` (r, c) for the rows `part` (all by default), `cols` (c,)."""
        value, at = logits.max(dim=1)
        if self.softmax:
            old = self.max[part]
            new_max = torch.maximum(old, value)
            self.sum[part] = self.sum[part] * torch.exp(old - new_max) + torch.exp(
                logits - new_max[:, None]
            ).sum(dim=1)
            self.max[part] = new_max
            self.positive_sum[part] += (logits * positives).sum(dim=1)
            self.positive_count[part] += positives.sum(dim=1)
        if self.top1:
            col = cols[at]
            top, top_col = self.top[part], self.top_col[part]
            better = beats(value, col, top, top_col)
            self.top[part] = torch.where(better, value, top)
            self.top_col[part] = torch.where(better, col, top_col)
            self.top_positive[part] = torch.where(
                better, positives.gather(1, at[:, None])[:, 0], self.top_positive[part]
            )

    def absorb(self, other: _RowStats) -> None:
        """Fold in statistics of the same rows over other columns."""
        if self.softmax:
            new_max = torch.maximum(self.max, other.max)
            self.sum = self.sum * torch.exp(self.max - new_max) + other.sum * torch.exp(
                other.max - new_max
            )
            self.max = new_max
            self.positive_sum = self.positive_sum + other.positive_sum
            self.positive_count = self.positive_count + other.positive_count
        if self.top1:
            better = beats(other.top, other.top_col, self.top, self.top_col)
            self.top = torch.where(better, other.top, self.top)
            self.top_col = torch.where(better, other.top_col, self.top_col)
            self.top_positive = torch.where(better, other.top_positive, self.top_positive)

    def lse(self) -> torch.Tensor:
        return self.max + torch.log(self.sum)

    def accuracy(self) -> torch.Tensor | None:
        return self.top_positive.float().mean() if self.top1 else None


def _positives(
    row_ids: torch.Tensor, rows: torch.Tensor, col_ids: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """(b, c) bool: same image key, or the pair itself (global row index == column index)."""
    return (row_ids[:, None] == col_ids[None, :]) | (rows[:, None] == cols[None, :])


def _pack(state: list[torch.Tensor]) -> torch.Tensor:
    """(b, n) float64 of n per-row tensors (int64 positions < 2**53 and floats are exact)."""
    return torch.stack([t.to(torch.float64) for t in state], dim=1)


def _unpack(packed: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [packed[:, i].to(t.dtype) for i, t in enumerate(like)]


def _tiles(b: int, tile: int):
    for start in range(0, b, tile):
        yield start, min(b, start + tile)


class _RingContrastive(torch.autograd.Function):
    """`kind` softmax: symmetric InfoNCE with soft targets over same-key columns (both directions,
    online log-sum-exp). `kind` sigmoid: SigLIP's pairwise loss over image rows x text columns,
    -sum log sigmoid(z * (scale * sim + bias)) / b, z = +1 for same-key pairs and -1 otherwise;
    its text rows are scored for the accuracy and the negatives only.

    Only text blocks travel. A tile of local images x visiting texts serves both directions: its
    rows update this rank's image (i2t) statistics, its columns the visiting texts' (t2i)
    statistics over this rank's images, which go to the texts' owner in one all-to-all at the
    end (so no rank waits for another's statistics on the way). One matmul per tile forward
    and three in backward (recompute, both gradients), where scoring each direction on its own
    rank takes two and six with the recompute (`ClipLoss`: two and four, holding the logits)."""

    @staticmethod
    def forward(ctx, images, texts, scale, bias, ids, rows, group, tile, mining, kind, metrics):
        ring = _Ring(group)
        b = images.shape[0]
        softmax = kind == "softmax"

        def stats() -> _RowStats:
            return _RowStats(b, images.dtype, images.device, softmax, metrics)

        i2t = stats()
        if mining is not None:
            draw_texts = GumbelMax(rows, mining.seed, TEXTS)
        # Per visiting block: its texts' statistics over this rank's images, and their draws.
        columns = stats().needed or mining is not None
        parts = []
        pairwise = torch.zeros((), dtype=images.dtype, device=images.device)
        scaled_images = scale * images
        block = [texts, ids, rows]
        for k in range(ring.world):
            pending = ring.start_hop(block) if k < ring.world - 1 else None  # overlaps the tiles
            block_texts, block_ids, block_rows = block
            t2i = stats()
            if mining is not None:
                draw_images = GumbelMax(block_rows, mining.seed, IMAGES)
            for start, end in _tiles(b, tile):
                part, cols = slice(start, end), block_rows[start:end]  # columns' global positions
                positives = _positives(ids, rows, block_ids[start:end], cols)
                logits = scaled_images @ block_texts[start:end].T  # (b, c) images x texts
                if i2t.needed:
                    i2t.update(logits, positives, cols)
                if t2i.needed:
                    t2i.update(logits.T, positives.T, rows, part)
                if kind == "sigmoid":  # -log sigmoid(+-z) over the tile, z = logit + bias
                    z = logits + bias
                    pairwise -= F.logsigmoid(torch.where(positives, z, -z)).sum()
                if mining is not None:
                    sharp = logits * mining.sharpness
                    draw_texts.update(sharp, positives, cols)
                    draw_images.update(sharp.T, positives.T, rows, part)
            if columns:
                parts.append(_pack(t2i.state() + (draw_images.state() if mining else [])))
            if pending is not None:
                block = ring.finish_hop(pending)
        # This rank's own texts' statistics and draws over every rank's images.
        t2i = stats()
        if columns:
            template = stats().state()
            if mining is not None:
                mine = GumbelMax(rows, mining.seed, IMAGES)
                template_draw = mine.state()
            for packed in ring.to_owners(parts):
                state = _unpack(packed, template + (template_draw if mining else []))
                n = len(template)
                t2i.absorb(_RowStats(b, images.dtype, images.device, softmax, metrics, state[:n]))
                if mining is not None:
                    mine.absorb(GumbelMax(rows, mining.seed, IMAGES, state[n:]))
        if softmax:
            lse_i2t, lse_t2i = i2t.lse(), t2i.lse()
            per_row = (lse_i2t - i2t.positive_sum / i2t.positive_count) + (
                lse_t2i - t2i.positive_sum / t2i.positive_count
            )
            loss = per_row.mean() / 2
            weights = (1 / i2t.positive_count, 1 / t2i.positive_count)
            ctx.save_for_backward(images, texts, scale, bias, ids, rows, lse_i2t, lse_t2i, *weights)
        else:
            loss = pairwise / b
            ctx.save_for_backward(images, texts, scale, bias, ids, rows)
        ctx.group, ctx.tile, ctx.kind = group, tile, kind
        accuracies = (i2t.accuracy(), t2i.accuracy()) if metrics else ()
        negatives = ()
        if mining is not None:
            negatives = (*draw_texts.result(), *mine.result())
        for t in (*accuracies, *negatives):
            ctx.mark_non_differentiable(t)
        return (loss, *accuracies, *negatives)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        images, texts, scale, bias, ids, rows, *saved = ctx.saved_tensors
        softmax = ctx.kind == "softmax"
        ring = _Ring(ctx.group)
        b = images.shape[0]
        factor = grad_loss / (2 * b) if softmax else grad_loss / b  # of this rank's loss
        grad_images = torch.zeros_like(images)
        grad_scale, grad_bias = torch.zeros_like(scale), torch.zeros_like(bias)
        block = [texts, ids, rows]
        if softmax:  # a text's t2i term is its owner's loss: its statistics and factor travel
            lse_i2t, lse_t2i, weight_i2t, weight_t2i = saved
            block += [lse_t2i, weight_t2i, factor.reshape(1)]
            row_weight = (weight_i2t * factor)[:, None]
        # The sigmoid's factor is one scalar, folded into the (b, D) products; the softmax's
        # differ between its two directions, so they are in g.
        fold = scale if softmax else scale * factor
        # Each block's gradient (and, softmax, its t2i terms' share of the scale's gradient,
        # which belongs to its owner's loss) is summed along the ring behind it, one hop late:
        # a rank adds its share of block k once the sum up to the previous rank is in, while
        # it scores block k + 1; the last hop takes each sum home.
        summed = None
        for k in range(ring.world):
            # The texts move on while they are scored here.
            ahead = ring.start_hop(block) if k < ring.world - 1 else None
            block_texts, block_ids, block_rows = block[:3]
            grad_block = torch.zeros_like(texts)
            block_scale = torch.zeros(1, dtype=scale.dtype, device=scale.device)
            for start, end in _tiles(b, ctx.tile):
                other = block_texts[start:end]
                positives = _positives(ids, rows, block_ids[start:end], block_rows[start:end])
                raw = images @ other.T  # (b, c) similarities
                if softmax:  # each direction's softmax - uniform over the positives, weighted
                    block_lse, block_weight, owner = block[3:]
                    lse_cols, weight_cols = block_lse[start:end], block_weight[start:end]
                    logits = raw * scale
                    g = (logits - lse_i2t[:, None]).exp_().mul_(factor)
                    g.sub_(positives * row_weight)
                    g_cols = logits.sub_(lse_cols[None, :]).exp_().mul_(owner)
                    g_cols.sub_(positives * (weight_cols * owner)[None, :])
                    grad_scale += torch.vdot(g.view(-1), raw.view(-1))  # this rank's i2t
                    block_scale += torch.vdot(g_cols.view(-1), raw.view(-1))
                    g.add_(g_cols)
                else:  # d/dz of -log sigmoid(+-z): sigmoid(z) - [a positive]
                    g = torch.addcmul(bias, raw, scale).sigmoid_()
                    g.add_(positives, alpha=-1)
                    grad_bias += g.sum() * factor
                    grad_scale += torch.vdot(g.view(-1), raw.view(-1)) * factor
                grad_images += (g @ other) * fold
                grad_block[start:end] += (g.T @ images) * fold
            if summed is not None:  # the sums of this block up to the previous rank
                before, before_scale = ring.finish_hop(summed)
                grad_block += before
                block_scale += before_scale
            if ring.world > 1:  # on to the next rank, which scores this block next
                summed = ring.start_hop([grad_block, block_scale])
            if ahead is not None:
                block = ring.finish_hop(ahead)
        if summed is not None:  # this rank's own texts, summed over every rank
            grad_block, block_scale = ring.finish_hop(summed)
        grad_scale += block_scale[0]
        return (grad_images, grad_block, grad_scale, grad_bias, *[None] * 7)


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
