"""Image-text contrastive loss (symmetric InfoNCE) with negatives gathered from every rank.

Each rank scores its own rows against the columns of the whole global batch ("local loss").
Samples that share an image key (COCO's five captions of one image) are positives of each other:
the target of a row is spread uniformly over its positives (ALBEF/BLIP), never a negative.

A row's soft-target loss, log-sum-exp minus the mean of its positive logits, is computed as
cross-entropy against the row's own column (what CLIP computes) plus a correction from per-key
means of the embeddings (O(W*b*D) work, not (b, W*b)). The correction is exactly zero when every
key in the global batch is distinct, and finding out whether keys are shared reads nothing back
to the host (no device sync).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

# How samples are identified belongs to the data side, the floor below (the one data_pipeline
# module the objectives use).
from data_pipeline.sample_ids import key_ids
from umt.distributed import gather_no_grad, gather_with_grad, rank
from umt.objectives.hard_negatives import HardNegatives, sample_hard_negatives
from umt.objectives.ring import Mining, ring_contrastive


class ContrastiveOutput(NamedTuple):
    loss: torch.Tensor  # () this rank's loss: mean of the i2t and t2i terms over its rows
    logits_i2t: torch.Tensor | None  # (b, W*b) local images against every text (gather only)
    logits_t2i: torch.Tensor | None  # (b, W*b) local texts against every image (gather only)
    positives: torch.Tensor | None  # (b, W*b) bool, True where the column shares the row's key
    # (gather, with `metrics` or `mining`)
    accuracy_i2t: torch.Tensor | None  # () fraction of local rows whose top column is a positive
    accuracy_t2i: torch.Tensor | None  # (both None without `metrics`)
    negatives: HardNegatives | None = None  # with `mining`: ITM's hard negatives


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    # Similarities, softmax and cross-entropy in float32 at least, even under bf16.
    return torch.promote_types(dtype, torch.float32)


def positive_mask(
    local_ids: torch.Tensor,
    global_ids: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """(b, n) bool: column j is a positive of local row i (same image key, or the same sample:
    global position `rows[i] == cols[j]`)."""
    return (local_ids[:, None] == global_ids[None, :]) | (rows[:, None] == cols[None, :])


class _KeyGroups(NamedTuple):
    """The global batch's columns grouped by image key, without reading anything to the host."""

    column_group: torch.Tensor  # (n,) a group number per column (its key's first sorted slot)
    row_group: torch.Tensor  # (b,) the group of each local row
    row_count: torch.Tensor  # (b, 1) how many columns share the row's key (>= 1: its own)

    @classmethod
    def of(cls, local_ids: torch.Tensor, global_ids: torch.Tensor, dtype) -> _KeyGroups:
        sorted_ids = global_ids.sort().values
        column_group = torch.searchsorted(sorted_ids, global_ids)
        row_group = torch.searchsorted(sorted_ids, local_ids)
        ones = torch.ones(global_ids.shape[0], dtype=dtype, device=global_ids.device)
        counts = torch.zeros_like(ones).index_add_(0, column_group, ones)
        return cls(column_group, row_group, counts[row_group][:, None])

    def positive_mean(self, columns: torch.Tensor) -> torch.Tensor:
        """(b, D): the mean of the columns (n, D) sharing each row's key; exactly the row's own
        column when no other column has its key."""
        sums = torch.zeros_like(columns).index_add(0, self.column_group, columns)
        return sums[self.row_group] / self.row_count


def _soft_target_ce(
    logits: torch.Tensor,  # (b, n) scale * local rows @ columns.T
    own: torch.Tensor,  # (b,) each row's own column
    scaled_rows: torch.Tensor,  # (b, D) scale * local rows
    own_columns: torch.Tensor,  # (b, D) the columns at `own`
    positive_mean: torch.Tensor,  # (b, D) `_KeyGroups.positive_mean` of the columns
) -> torch.Tensor:
    """Mean over rows of lse(row) - mean(row's positive logits): uniform soft targets.

    Cross-entropy against the own column is lse - own logit; adding own logit - mean positive
    logit = scaled_row . (own column - positive mean) gives the soft-target loss. That term is
    exactly zero for a row whose key no other column shares (its gradients cancel to rounding)."""
    correction = (scaled_rows * (own_columns - positive_mean)).sum(dim=1)
    return F.cross_entropy(logits, own) + correction.mean()


@torch.no_grad()
def _top1_is_positive(
    logits: torch.Tensor, local_ids: torch.Tensor, global_ids: torch.Tensor
) -> torch.Tensor:
    return (global_ids[logits.argmax(dim=1)] == local_ids).float().mean()


def contrastive_outputs(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    image_keys: Sequence[str] | torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    impl: str = "gather",
    tile: int = 4096,
    mining: Mining | None = None,
    loss: str = "softmax",
    logit_bias: torch.Tensor | float | None = None,
    positions: torch.Tensor | None = None,
    metrics: bool = True,
) -> ContrastiveOutput:
    """ITC loss of this rank's rows, its accuracies and (with `mining`) ITM's hard negatives.

    `image_embeds`, `text_embeds`: (b, D) L2-normalised; pair i is (image i, text i). Every rank
    must pass the same b. `image_keys`: (b,) strings or int64 ids (`key_ids`): samples sharing
    one are positives of each other; None means all pairs distinct.
    `positions`: (b,) the rows' positions in the global batch (default rank * b + i), which the
    negatives' noise is hashed from and the negatives are returned as.
    `impl`: `gather` all-gathers the embeddings and holds the (b, W*b) logits (returned);
    `ring` passes embedding blocks around the ranks in O(b * tile) memory (`umt.objectives.ring`).
    Both give the same loss, gradients and negatives. `loss`: `softmax` (InfoNCE) or `sigmoid`
    (SigLIP's pairwise loss with `logit_bias`, every same-key pair a positive), which is always
    computed by neighbour exchange (the ring), never with an all-gather. `metrics`: also the
    accuracies (None otherwise: the trainer asks on the steps it logs).
    """
    dtype = _loss_dtype(image_embeds.dtype)
    # Contiguous: a matmul's rounding depends on the operands' strides, the loss must not.
    image_embeds = image_embeds.to(dtype).contiguous()
    text_embeds = text_embeds.to(dtype).contiguous()
    b = image_embeds.shape[0]
    device = image_embeds.device
    default_positions = positions is None
    if default_positions:
        positions = torch.arange(b, device=device) + rank(group) * b
    if image_keys is None:  # every sample its own image: its position is its key
        local_ids = positions
    elif isinstance(image_keys, torch.Tensor):
        local_ids = image_keys.to(device=device, dtype=torch.long)
    else:
        local_ids = key_ids(image_keys, device)
    if impl == "ring" or loss == "sigmoid":
        bias = 0.0 if logit_bias is None else logit_bias
        out = ring_contrastive(
            image_embeds, text_embeds, logit_scale, local_ids, group, tile, mining, loss, bias,
            positions, metrics,
        )  # fmt: skip
        negatives = HardNegatives(*out.negatives) if out.negatives is not None else None
        return ContrastiveOutput(
            out.loss, None, None, None, out.accuracy_i2t, out.accuracy_t2i, negatives
        )
    if impl != "gather":
        raise ValueError(f"objectives.itc_impl must be gather or ring (got {impl!r})")
    all_images = gather_with_grad(image_embeds, group)  # (W*b, D)
    all_texts = gather_with_grad(text_embeds, group)
    global_ids = gather_no_grad(local_ids, group)
    # Default positions are the global row numbers: known here, not sent.
    n_cols = all_texts.shape[0]
    cols = (
        torch.arange(n_cols, device=device)
        if default_positions
        else gather_no_grad(positions, group)
    )
    # The columns are gathered from the local rows, so a row's own column always has its key:
    # sharing a key is the whole positive relation here. (b, W*b): only for the negatives' draw
    # and with `metrics`; the loss itself needs no such mask (`_KeyGroups`).
    positives = None
    if mining is not None or metrics:
        positives = local_ids[:, None] == global_ids[None, :]
    own = torch.arange(b, device=device) + rank(group) * b  # the rows' columns, gather order
    groups = _KeyGroups.of(local_ids, global_ids, dtype)

    scale = torch.as_tensor(logit_scale, device=device).to(dtype)
    scaled_images, scaled_texts = scale * image_embeds, scale * text_embeds
    logits_i2t = scaled_images @ all_texts.T
    logits_t2i = scaled_texts @ all_images.T
    loss_i2t = _soft_target_ce(
        logits_i2t, own, scaled_images, text_embeds, groups.positive_mean(all_texts)
    )
    loss_t2i = _soft_target_ce(
        logits_t2i, own, scaled_texts, image_embeds, groups.positive_mean(all_images)
    )
    loss = (loss_i2t + loss_t2i) / 2
    acc_i2t = acc_t2i = None
    if metrics:
        acc_i2t = _top1_is_positive(logits_i2t, local_ids, global_ids)
        acc_t2i = _top1_is_positive(logits_t2i, local_ids, global_ids)
    negatives = None
    if mining is not None:
        negatives = sample_hard_negatives(
            logits_i2t * mining.sharpness,
            logits_t2i * mining.sharpness,
            positives,
            mining.seed,
            positions,
            cols,
            tile,
        )
    return ContrastiveOutput(loss, logits_i2t, logits_t2i, positives, acc_i2t, acc_t2i, negatives)


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    image_keys: Sequence[str] | torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """This rank's scalar ITC loss, gathering negatives over `group` (default: the world) if initialised."""
    return contrastive_outputs(image_embeds, text_embeds, logit_scale, image_keys, group).loss
